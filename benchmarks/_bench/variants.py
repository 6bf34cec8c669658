"""The compared training steps, all on one model, one batch and one optimizer.

Every step is ``gradients -> optimizer.step() -> zero_grad(set_to_none=True)``; only the gradient rule
differs:

* ``lora``: ``model(**batch).loss.backward()``.
* ``flat-exact`` / ``flat-inplace``: the same line inside ``FlatLora.perturbed(t)`` (``mode="exact"``: the
  default, the base weights are never written; ``mode="inplace"``: the paper's ``W += E`` / ``W -= E``).
* ``lora-sam``: SAM on the LoRA factors, two forward/backward passes: the experiments' own step
  (`flatlora.experiments.methods.Method`, rule ``sam-ab``).
* ``bi-lora``, ``eflat-lora``: the experiments' steps of the two peers (`flatlora.experiments.peers`): Bi-LoRA
  on its own copy of the model holding the auxiliary adapter (rank 8) beside LoRA's, with its own AdamW;
  EFlat-LoRA on the shared model (its step leaves ``B`` exactly as it found it).
* ``alora``: a step of the gated super-network (`flatlora.alora`): its own model at rank ``2r`` with ``r`` ranks
  open per module, so every LoRA matmul runs at ``2r``. Its reallocation rounds are timed apart
  (`time_alora_round`): a few per run, each ``2K + 1`` forwards for ``K`` open ranks.

The variants with their own model carry it as ``step.held_by = (model, optimizer)`` for the memory figures.

A variant's step counter ``t`` runs 1, 2, ... up to ``total_steps`` (the cosine schedule's ``T``), so every
Flat-LoRA step has ``sigma_t > 0`` (at ``sigma = 0`` the engine installs nothing and the step is LoRA's).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from flatlora import FlatLora, FlatLoraConfig

VARIANTS = ("lora", "flat-exact", "flat-inplace", "lora-sam", "bi-lora", "eflat-lora", "alora")
OWN_MODEL = ("bi-lora", "alora")  # variants that need ``make_model(rank)``
Step = Callable[[int], None]


def _loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


def _lora_sam(model: nn.Module, rho: float, total_steps: int, seed: int):
    """The experiments' LoRA-SAM step and its origin."""
    from flatlora.experiments.methods import Method, get_method

    method = Method(get_method("lora-sam"), model, _loss, total_steps=total_steps, seed=seed, rho=0.0,
                    sam_rho=rho, sam_w_rho=rho)
    return method, "flatlora.experiments.methods.Method (rule sam-ab)"


def _own_step(name: str, make_model: Callable[[int], nn.Module], rank: int, batch: dict, lr: float, seed: int,
              total_steps: int) -> tuple[Step, str]:
    """The step of a variant on its own model (see the module docstring); ``step.held_by = (model, opt)``."""
    from flatlora.experiments.methods import Method, get_method

    if name == "bi-lora":
        from flatlora.experiments.peers import BI_LORA_AUX_RANK, add_auxiliary_adapter

        model = make_model(rank)
        add_auxiliary_adapter(model)
        note = f"Bi-LoRA: own model, auxiliary adapter of rank {BI_LORA_AUX_RANK}"
    else:
        from flatlora.alora import attach_gates

        model = make_model(2 * rank)
        attach_gates(model, init_rank=rank)
        note = f"ALoRA super-network: own model at rank {2 * rank}, {rank} open per module (rounds timed apart)"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    method = Method(get_method(name if name == "bi-lora" else "lora"), model, _loss, total_steps=total_steps,
                    seed=seed, rho=0.0, sam_rho=0.0, sam_w_rho=0.0)

    def step(t: int) -> None:
        method.grads(t, batch)
        opt.step()
        method.after_step(t, opt)
        opt.zero_grad(set_to_none=True)

    step.held_by = (model, opt)
    step.init_rank = rank
    return step, note


def time_alora_round(step: Step, batch: dict, repeats: int = 1) -> dict:
    """Seconds of one ALoRA round (score every open rank on ``batch``, reallocate) on the ``alora`` variant's
    model, the fastest of ``repeats``; the round changes the gates, which the step timing no longer needs."""
    import time

    from flatlora.alora import ALoRA, ALoRAConfig

    model, _ = step.held_by
    alora = ALoRA(model, ALoRAConfig(init_rank=step.init_rank, warmup_steps=1, interval_steps=1), [batch], _loss)
    best = float("inf")
    for k in range(repeats):
        t0 = time.perf_counter()
        alora.reallocate(k)
        best = min(best, time.perf_counter() - t0)
    return {"seconds": best, "forwards": 2 * alora.budget + 1, "open_ranks": alora.budget}


def build_steps(model: nn.Module, batch: dict, *, variants: list[str], total_steps: int, rho: float,
                sam_rho: float, seed: int, lr: float = 1e-5, rank: int = 8,
                make_model: Callable[[int], nn.Module] | None = None
                ) -> tuple[dict[str, Step], dict[str, str], torch.optim.Optimizer]:
    """One step function per variant (sharing ``model``, ``batch`` and one AdamW, except the ``OWN_MODEL``
    variants, built by ``make_model(rank)``), notes on them, and the shared optimizer (its state counts towards
    the memory held between steps)."""
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if make_model is None and set(variants) & set(OWN_MODEL):
        raise ValueError(f"variants {sorted(set(variants) & set(OWN_MODEL))} need make_model (a rank -> model builder)")
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
        elif name in OWN_MODEL:
            steps[name], notes[name] = _own_step(name, make_model, rank, batch, lr, seed, total_steps)
        elif name == "eflat-lora":
            from flatlora.experiments.methods import Method, get_method
            from flatlora.experiments.peers import EFLAT_BETA, EFLAT_RHO

            eflat = Method(get_method("eflat-lora"), model, _loss, total_steps=total_steps, seed=seed, rho=0.0,
                           sam_rho=0.0, sam_w_rho=0.0)

            def eflat_step(t: int, eflat=eflat) -> None:
                eflat.grads(t, batch)
                finish()

            steps[name] = eflat_step
            notes[name] = f"EFlat-LoRA (rho={EFLAT_RHO} / sqrt(t), beta={EFLAT_BETA}) on the shared model"
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
