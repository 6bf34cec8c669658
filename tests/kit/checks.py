"""The checks every LoRA variant must pass (tests/variants), built on the references of ``references.py``.

`check_variant` runs, for each requested mode on a deep copy of one PEFT model:

1. the noise scale of every layer equals the closed form on the *true* merged weight (PEFT's own merge, or a
   caller-supplied independent merge);
2. loss and trainable-parameter gradients inside ``flat.perturbed(t)`` equal those of an independent forward
   at ``W + E`` built from the materialised ``E`` (and differ clearly from the unperturbed ones);
3. base weights are bit-identical afterwards (exact) or within fp32 rounding (inplace);
4. a few Flat-LoRA training steps run, move the adapter, and leave the base clean and nothing swapped;

and finally that exact and inplace give the same gradients (they draw the same ``E``). Unlike the other kit
modules these drive flatlora (``FlatLora``, ``flat.noise_specs``, ``flat.noise``); what they compare against
is independent of it.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from flatlora import FlatLora, FlatLoraConfig
from kit.compare import assert_grads_close, assert_same_state, state_without_adapters, step_grads
from kit.models import loss_of
from kit.references import cosine_sigma, merged_by_peft, row_std, with_base_at, with_output_plus

REFERENCES = {"base": with_base_at, "output": with_output_plus}


def assert_scales_match(flat, t: int, merged: dict[str, torch.Tensor], rho: float, total: int,
                        rtol: float = 1e-5) -> None:
    """``flat.noise_specs(t)`` against the closed form on independently merged weights."""
    sigma = cosine_sigma(t, total, rho)
    specs = flat.noise_specs(t)
    assert {target.name for target, _ in specs} == set(merged)
    for target, spec in specs:
        want = row_std(merged[target.name], sigma)
        assert spec.shape == tuple(merged[target.name].shape), target.name
        torch.testing.assert_close(spec.scale, want, rtol=rtol, atol=0, msg=target.name)


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
