"""The benchmarked models: BERT classifiers built from a transformers ``BertConfig``, LoRA through PEFT.

Random weights, seeded: the cost of a step does not depend on the values (all tensors are normal floats,
no denormals at init), and nothing is downloaded. ``minilm`` has the architecture of all-MiniLM-L6-v2, the
default experiment model (6 layers, hidden 384, 12 heads, intermediate 1536, 22.7M parameters); ``wide``
is a ~107M-parameter BERT of hidden 1024 (6 layers, 16 heads, intermediate 4096); the sweep varies the
hidden size of a 2-layer BERT. LoRA as in the experiments: r 8, alpha 16, no dropout, on ``query`` and
``value``, the new classifier trained in full (PEFT's ``SEQ_CLS`` task type).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

VOCAB = 30522  # BERT's uncased WordPiece vocabulary (all-MiniLM-L6-v2's)


@dataclass(frozen=True)
class ModelSpec:
    """A BERT encoder shape; ``heads`` divides ``hidden``."""

    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int = VOCAB

    def describe(self) -> str:
        return f"BERT {self.layers}x{self.hidden}, {self.heads} heads, FFN {self.intermediate}, vocab {self.vocab}"


PRESETS = {
    "minilm": ModelSpec("minilm", 384, 6, 12, 1536),
    "wide": ModelSpec("wide", 1024, 6, 16, 4096),
    # --quick: tiny stand-ins for the two, seconds on a laptop CPU
    "tiny": ModelSpec("tiny", 64, 2, 2, 128, vocab=1000),
    "tiny-wide": ModelSpec("tiny-wide", 128, 2, 2, 256, vocab=1000),
}


def sweep_spec(hidden: int, layers: int, vocab: int = VOCAB) -> ModelSpec:
    """A BERT of the given width for the scaling sweep: 64-dim heads (at least 1), FFN 4x hidden."""
    return ModelSpec(f"sweep-h{hidden}", hidden, layers, max(1, hidden // 64), 4 * hidden, vocab)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """transformers and PEFT initialise from the global RNG: fork it so the caller's state is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_model(spec: ModelSpec, *, rank: int, seed: int, device: torch.device,
                dtype: torch.dtype = torch.float32) -> nn.Module:
    """``BertForSequenceClassification`` (2 labels) with PEFT LoRA, in train mode, on ``device``.

    The backbone is cast to ``dtype``; PEFT keeps the adapter in fp32 (``autocast_adapter_dtype``).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=spec.vocab, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                        num_attention_heads=spec.heads, intermediate_size=spec.intermediate, num_labels=2)
    with _seeded(seed):
        model = BertForSequenceClassification(config).to(device=device, dtype=dtype)
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                 target_modules=["query", "value"], task_type="SEQ_CLS"))
    return model.train()


def make_batch(spec: ModelSpec, batch: int, seq: int, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random token ids (no padding: every step costs the same), binary labels."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, spec.vocab, (batch, seq), generator=gen)
    labels = torch.randint(0, 2, (batch,), generator=gen)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": labels.to(device)}


def count_params(model: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
