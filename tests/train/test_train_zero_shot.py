"""CLIP's zero-shot head (`flatlora.train.zero_shot`) against transformers' own ``CLIPModel`` on a tiny random CLIP
built offline: the logits are ``CLIPModel(input_ids=prompts, pixel_values=...).logits_per_image``, prompt ensembling
is the normalized mean of CLIPModel's normalized text embeddings, and the head stays frozen through training."""

from __future__ import annotations

import pytest
import torch

import _train_fixtures as fx
from flatlora.train import zero_shot

NAMES = fx.CIFAR10_NAMES[:4]


def clip_and_pixels(assets):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    path = assets("clip")
    clip = CLIPModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    pixels = CLIPImageProcessor.from_pretrained(path)(images=fx.random_images(5, seed=3),
                                                      return_tensors="pt")["pixel_values"]
    return path, clip, tok, pixels


def test_logits_equal_clipmodel_zero_shot_logits(assets):
    path, clip, tok, pixels = clip_and_pixels(assets)
    prompts = [f"a photo of a {n}." for n in NAMES]
    enc = tok(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = clip(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                         pixel_values=pixels).logits_per_image
        ours = zero_shot.load(path, NAMES, ["a photo of a {name}."]).eval()(pixel_values=pixels).logits
    assert ours.shape == (5, len(NAMES))
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    assert clip.logit_scale.item() == 2.0  # the fixture's scale, e^2 in the logits: a missing scale would show


def test_prompt_ensemble_is_the_normalized_mean_of_clip_text_embeddings(assets):
    path, clip, tok, pixels = clip_and_pixels(assets)
    templates = ["a photo of a {name}.", "a blurry photo of the {name}."]
    with torch.no_grad():
        classes = []
        for n in NAMES:
            enc = tok([t.format(name=n) for t in templates], padding=True, return_tensors="pt")
            out = clip(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels)
            mean = out.text_embeds.mean(0)  # CLIPModel's text_embeds are unit vectors
            classes.append(mean / mean.norm())
        head = torch.stack(classes)
        reference = clip.logit_scale.exp() * out.image_embeds @ head.t()
        ours = zero_shot.load(path, NAMES, templates).eval()(pixel_values=pixels).logits
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_underscores_in_class_names_read_as_spaces():
    assert zero_shot.class_prompts(["aquarium_fish", "bed"], ["a photo of a {name}."]) == [
        ["a photo of a aquarium fish."], ["a photo of a bed."]]


def test_loss_is_cross_entropy_and_the_head_has_no_parameters(assets):
    path, _, _, pixels = clip_and_pixels(assets)
    model = zero_shot.load(path, NAMES, ["a photo of a {name}."]).eval()
    labels = torch.tensor([0, 1, 2, 3, 0])
    out = model(pixel_values=pixels, labels=labels)
    assert out.loss.item() == pytest.approx(torch.nn.functional.cross_entropy(out.logits, labels).item())
    names = [n for n, _ in model.named_parameters()]
    assert names and all(n.startswith(("vision_model.", "visual_projection.")) for n in names)
    assert {n for n, _ in model.named_buffers()} >= {"head", "logit_scale"}
