"""The compared training steps, all on one model, one batch and one optimizer.

Every step is ``gradients -> optimizer.step() -> zero_grad(set_to_none=True)``; only the gradient rule
differs:

* ``lora``: ``model(**batch).loss.backward()``.
* ``flat-exact`` / ``flat-inplace``: the same line inside ``FlatLora.perturbed(t)`` (``mode="exact"``: the
  default, the base weights are never written; ``mode="inplace"``: the paper's ``W += E`` / ``W -= E``).
* ``lora-sam``: SAM on the LoRA factors, two forward/backward passes: the experiments' own step
  (`flatlora.experiments.methods.Method`, rule ``sam-ab``) when that module is importable, else the same
  rule written out here (`_MinimalLoraSam`).

A variant's step counter ``t`` runs 1, 2, ... up to ``total_steps`` (the cosine schedule's ``T``), so every
Flat-LoRA step has ``sigma_t > 0`` (at ``sigma = 0`` the engine installs nothing and the step is LoRA's).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from flatlora import FlatLora, FlatLoraConfig

VARIANTS = ("lora", "flat-exact", "flat-inplace", "lora-sam")
Step = Callable[[int], None]


def _loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


class _MinimalLoraSam:
    """LoRA-SAM (SAM on A and B, davda54/sam): ``g1 = grad L``; ``e = rho g1 / ||g1||`` over all LoRA
    parameters; gradients at ``(A, B) + e``; parameters restored from a copy before the optimizer step."""

    def __init__(self, model: nn.Module, rho: float) -> None:
        self.model, self.rho = model, rho
        self.params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
        self.trainable = [p for p in model.parameters() if p.requires_grad]

    def grads(self, t: int, batch: dict) -> float:
        loss = _loss(self.model, batch)
        loss.backward()
        grads = [p.grad for p in self.params]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads if g is not None]))
        scale = self.rho / (float(norm) + 1e-12)
        eps = [None if g is None else g * scale for g in grads]
        for p in self.trainable:
            p.grad = None
        saved = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, e in zip(self.params, eps):
                    if e is not None:
                        p.add_(e)
            _loss(self.model, batch).backward()
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)
        return float(loss.detach())


def _lora_sam(model: nn.Module, rho: float, total_steps: int, seed: int):
    """The experiments' LoRA-SAM step if available (returns it and its origin), else the minimal one."""
    try:
        from flatlora.experiments.methods import Method, get_method
    except ImportError:
        return _MinimalLoraSam(model, rho), "benchmarks/_bench/variants.py (_MinimalLoraSam)"
    method = Method(get_method("lora-sam"), model, _loss, total_steps=total_steps, seed=seed, rho=0.0,
                    sam_rho=rho, sam_w_rho=rho)
    return method, "flatlora.experiments.methods.Method (rule sam-ab)"


def build_steps(model: nn.Module, batch: dict, *, variants: list[str], total_steps: int, rho: float,
                sam_rho: float, seed: int, lr: float = 1e-5
                ) -> tuple[dict[str, Step], dict[str, str], torch.optim.Optimizer]:
    """One step function per variant (all sharing ``model``, ``batch`` and one AdamW), notes on them, and
    the optimizer (its state counts towards the memory held between steps)."""
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    notes: dict[str, str] = {}

    def finish() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    def plain(t: int) -> None:
        _loss(model, batch).backward()
        finish()

    def flat_step(flat: FlatLora) -> Step:
        def step(t: int) -> None:
            with flat.perturbed(t):
                _loss(model, batch).backward()
            finish()

        return step

    steps: dict[str, Step] = {}
    for name in variants:
        if name == "lora":
            steps[name] = plain
        elif name in ("flat-exact", "flat-inplace"):
            mode = name.split("-")[1]
            flat = FlatLora(model, FlatLoraConfig(rho=rho, seed=seed, mode=mode), total_steps=total_steps)
            steps[name] = flat_step(flat)
            notes[name] = f"FlatLora(mode={mode!r}, rho={rho}), {len(flat.targets)} layers"
        else:
            sam, origin = _lora_sam(model, sam_rho, total_steps, seed)

            def sam_step(t: int, sam=sam) -> None:
                sam.grads(t, batch)
                finish()

            steps[name] = sam_step
            notes[name] = f"LoRA-SAM (rho={sam_rho}) from {origin}"
    return steps, notes, opt
