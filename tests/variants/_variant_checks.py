"""The checks every LoRA variant must pass (issue 5), and the tiny models they run on (built from configs).

`check_variant` runs, for each requested mode on a deep copy of one PEFT model:

1. the noise scale of every layer equals the closed form on the *true* merged weight (PEFT's own merge, or a
   caller-supplied independent merge);
2. loss and trainable-parameter gradients inside ``flat.perturbed(t)`` equal those of an independent forward
   at ``W + E`` built from the materialised ``E`` (and differ clearly from the unperturbed ones);
3. base weights are bit-identical afterwards (exact) or within fp32 rounding (inplace);
4. a few Flat-LoRA training steps run, move the adapter, and leave the base clean and nothing swapped;

and finally that exact and inplace give the same gradients (they draw the same ``E``).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from _variant_refs import (assert_grads_close, assert_same_state, assert_scales_match, merged_by_peft,
                           randomize_adapters, state_without_adapters, step_grads, with_base_at, with_output_plus)
from conftest import ToyMLP, loss_of
from flatlora import FlatLora, FlatLoraConfig

REFERENCES = {"base": with_base_at, "output": with_output_plus}


def toy(seed: int = 0, randomize: bool = True, **lora_kwargs) -> nn.Module:
    """ToyMLP (16 -> 32 -> 4) with a PEFT LoRA adapter on fc1 and fc2; adapters randomised by default."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = dict(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], lora_dropout=0.0)
    cfg.update(lora_kwargs)
    model = get_peft_model(ToyMLP(), LoraConfig(**cfg))
    if randomize:
        randomize_adapters(model, seed)
    return model


def mlp_batch(seed: int = 0, n: int = 8) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 16, generator=gen), "labels": torch.randint(0, 4, (n,), generator=gen)}


def swapped(model: nn.Module) -> list[str]:
    """Modules whose forward is overridden on the instance or that carry hooks (must be none outside a step)."""
    return [n for n, m in model.named_modules() if "forward" in m.__dict__ or m._forward_hooks
            or m._forward_pre_hooks]


def train_steps(model: nn.Module, flat: FlatLora, batch: dict, steps: int = 3, lr: float = 0.05,
                after_step: Callable[[int], None] | None = None) -> list[float]:
    """A plain Flat-LoRA loop; returns the losses. ``after_step(t)`` runs after optimizer.step, before zero_grad."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    start = [p.detach().clone() for p in params]
    losses = []
    for t in range(1, steps + 1):
        with flat.perturbed(t):
            loss = loss_of(model, batch)
            loss.backward()
        opt.step()
        if after_step is not None:
            after_step(t)
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert any(not torch.equal(a, p) for a, p in zip(start, params)), "training did not move the adapter"
    assert not flat.is_perturbed and swapped(model) == []
    return losses


def check_variant(proto: nn.Module, batch: dict, *, modes=("exact", "inplace"), reference: str = "base",
                  merged: Callable[[nn.Module, list[str]], dict] | None = None, rng: int | None = None,
                  rho: float = 0.5, total: int = 10, t: int | None = None, steps: int = 3,
                  rtol: float = 1e-4, atol: float = 1e-6, loss_tol: float = 1e-5,
                  after_step: Callable[[nn.Module], Callable[[int], None]] | None = None) -> dict:
    """Run checks 1-4 for each mode on a deep copy of ``proto``, then compare the modes' gradients.

    ``reference``: "base" writes ``W_base + E`` into a copy's base weights; "output" adds ``op(x, E)`` to the
    layer output (DoRA, quantized bases). ``merged(model, names)`` overrides PEFT's merge as the source of the
    true merged weight. ``rng`` fixes the global RNG before each compared forward (dropout masks).
    Returns ``{mode: (FlatLora, gradients)}``.
    """
    t = total if t is None else t
    out = {}
    for mode in modes:
        model = copy.deepcopy(proto)
        flat = FlatLora(model, FlatLoraConfig(rho=rho, mode=mode, seed=5), total_steps=total)
        true_w = merged(model, flat.targets) if merged is not None else merged_by_peft(model, flat.targets)
        assert_scales_match(flat, t, true_w, rho, total)

        noise = flat.noise(t)
        ref = REFERENCES[reference](model, noise)
        before = state_without_adapters(model)
        _, clean = step_grads(model, batch, rng=rng)
        ref_loss, want = step_grads(ref, batch, rng=rng)
        loss, got = step_grads(model, batch, flat.perturbed(t), rng=rng)
        torch.testing.assert_close(loss, ref_loss, rtol=loss_tol, atol=loss_tol)
        assert_grads_close(got, want, clean, rtol=rtol, atol=atol)
        tol = 0.0 if mode == "exact" else 1e-6
        assert_same_state(before, state_without_adapters(model), atol=tol)
        assert not flat.is_perturbed and swapped(model) == []

        train_steps(model, flat, batch, steps=steps, after_step=after_step(model) if after_step else None)
        assert_same_state(before, state_without_adapters(model), atol=tol * steps)
        out[mode] = (flat, got)
    if len(out) == 2:
        assert_grads_close(out["exact"][1], out["inplace"][1], rtol=rtol, atol=atol)
    return out


class TinyConvNet(nn.Module):
    """conv1 (3 -> 6, 3x3) -> conv2 (6 -> 8, 3x3, stride 2) -> mean -> head; returns {'loss', 'logits'}."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        h = nn.functional.gelu(self.conv1(x))
        logits = self.head(nn.functional.gelu(self.conv2(h)).mean(dim=(2, 3)))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def conv_model(seed: int = 0, **lora_kwargs) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = dict(r=2, lora_alpha=4, target_modules=["conv1", "conv2"])
    cfg.update(lora_kwargs)
    model = get_peft_model(TinyConvNet(), LoraConfig(**cfg))
    randomize_adapters(model, seed)
    return model


def conv_batch(seed: int = 0, n: int = 4) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 3, 9, 9, generator=gen), "labels": torch.randint(0, 4, (n,), generator=gen)}


def gpt2(seed: int = 0, **lora_kwargs) -> nn.Module:
    """A 2-layer GPT-2 (Conv1D layers storing (in, out)) with LoRA on c_attn and c_fc."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    lora = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    lora.update(lora_kwargs)
    model = get_peft_model(GPT2LMHeadModel(cfg), LoraConfig(**lora))
    randomize_adapters(model, seed)
    return model


def lm_batch(seed: int = 0, n: int = 4, length: int = 8) -> dict:
    ids = torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


class TinyEmbedNet(nn.Module):
    """emb (20 tokens x 8) -> mean over the sequence -> fc (8 -> 4); returns {'loss', 'logits'}."""

    def __init__(self, embedding: nn.Embedding | None = None) -> None:
        super().__init__()
        self.emb = embedding if embedding is not None else nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.fc(self.emb(input_ids).mean(dim=1))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def embed_model(seed: int = 0, embedding: nn.Embedding | None = None, **lora_kwargs) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = dict(r=2, lora_alpha=4, target_modules=["emb", "fc"])
    cfg.update(lora_kwargs)
    model = get_peft_model(TinyEmbedNet(embedding), LoraConfig(**cfg))
    randomize_adapters(model, seed)
    return model


def embed_batch(seed: int = 0, n: int = 4) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 20, (n, 6), generator=gen), "labels": torch.randint(0, 4, (n,), generator=gen)}
