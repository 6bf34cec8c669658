"""CLIP's zero-shot classification head, frozen: the image classifier of the paper's CLIP experiments.

The class weights are CLIP's own text embeddings of one prompt per class (``"a photo of a {name}."``), computed once
from the checkpoint's text tower and kept fixed; an image is classified by the cosine similarity of its embedding
with each class's, times CLIP's learned logit scale::

    t_c    = normalize(text_projection(text_model(prompt(c)).pooler_output))           (C, d)
    v      = normalize(visual_projection(vision_model(pixels).pooler_output))          (B, d)
             (pooler_output of the vision tower: the class token after post_layernorm)
    logits = exp(logit_scale) * v @ t_c^T                                              (B, C)

exactly ``CLIPModel(input_ids=prompts, pixel_values=pixels).logits_per_image``. With several prompt templates the
class embedding is the normalized mean of the normalized per-template embeddings (CLIP's prompt ensembling). Only
the vision tower is fine-tuned (LoRA); the text tower is used to build the head and then dropped.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn


def class_prompts(names: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """``[[template.format(name=...) for each template] for each class]``; underscores in a class name (CIFAR-100's
    ``aquarium_fish``) read as spaces."""
    out = []
    for name in names:
        readable = str(name).replace("_", " ")
        out.append([t.format(name=readable) for t in templates])
    return out


@torch.no_grad()
def text_head(clip: Any, tokenizer: Any, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(C, d) unit class embeddings of ``names`` from ``clip``'s text tower (fp32; see the module docstring)."""
    device = clip.text_projection.weight.device
    rows = []
    for prompts in class_prompts(names, templates):
        enc = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(device)
        emb = clip.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        emb = getattr(emb, "pooler_output", emb).float()
        emb = emb / emb.norm(dim=-1, keepdim=True)
        mean = emb.mean(dim=0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


class ZeroShotCLIP(nn.Module):
    """CLIP's vision tower and projection with a frozen zero-shot head; ``forward(pixel_values, labels=None)`` ->
    ``ImageClassifierOutput(loss, logits)`` (cross-entropy when labels are given), as the Trainer expects."""

    main_input_name = "pixel_values"
    base_model_prefix = ""  # no wrapped base model: PEFT's weight-conversion scan (for a model with a config) asks

    def __init__(self, clip: Any, head: torch.Tensor) -> None:
        super().__init__()
        self.config = clip.config
        self.vision_model = clip.vision_model
        self.visual_projection = clip.visual_projection
        self.register_buffer("head", head.detach().float().clone())  # (C, d), not a parameter: never trained
        self.register_buffer("logit_scale", clip.logit_scale.detach().float().clone())

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import ImageClassifierOutput

        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        image = self.visual_projection(pooled).float()
        image = image / image.norm(dim=-1, keepdim=True)
        logits = self.logit_scale.exp() * image @ self.head.t()
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels.to(logits.device))
        return ImageClassifierOutput(loss=loss, logits=logits)


def load(path: str, names: Sequence[str], templates: Sequence[str], tokenizer: str | None = None,
         **kwargs: Any) -> ZeroShotCLIP:
    """A `ZeroShotCLIP` from a ``CLIPModel`` checkpoint (folder or hub id) and its tokenizer (``tokenizer``, default
    ``path``); ``kwargs`` go to ``CLIPModel.from_pretrained`` (dtype, revision, ...). Rebuild the model of a run
    the same way, then ``peft.PeftModel.from_pretrained(model, RUN_FOLDER)``."""
    from transformers import AutoTokenizer, CLIPModel

    clip = CLIPModel.from_pretrained(path, **kwargs)
    tok_kwargs = {k: kwargs[k] for k in ("revision", "trust_remote_code") if k in kwargs}
    tokenizer = AutoTokenizer.from_pretrained(tokenizer or path, **tok_kwargs)
    return ZeroShotCLIP(clip, text_head(clip, tokenizer, names, templates))


__all__ = ["ZeroShotCLIP", "class_prompts", "load", "text_head"]
