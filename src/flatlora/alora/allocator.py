"""`ALoRA`: AB-LoRA scoring and rank reallocation on a gated PEFT LoRA model, a few times during training.

The paper's workflow (Algorithm 1 of arXiv 2403.16187), in optimizer steps:

    train warmup_steps                                   (K1, paper: 1 epoch)
    repeat rounds times (N_A, paper: 8):
        score every open rank on the held-out batches    (eq. 6, `flatlora.alora.scores`)
        prune the n lowest, open n reserve slots         (n = ranks_per_round, paper: 1 x modules per block)
        train interval_steps                             (K2, paper: 0.25 epoch)

Call `ALoRA.update` after every ``optimizer.step()`` with the number of optimizer steps taken (``t = 1..T``):
it scores and reallocates when ``t`` is a round's step and does nothing otherwise. It runs on the clean
weights (outside ``FlatLora.perturbed``; the Trainer callback calls it at ``on_optimizer_step``, after
Flat-LoRA's noise is gone), in eval mode (no dropout), under ``no_grad``, and puts the training mode back.

A reopened slot starts like a fresh PEFT LoRA rank: its row of ``A`` (a conv layer: its filter ``A[i]``,
``(c, kh, kw)``) is drawn Kaiming-uniform (``U(-1/sqrt(n), 1/sqrt(n))``, ``n`` its fan-in, ``c·kh·kw`` for a conv,
PEFT's ``kaiming_uniform_(a=sqrt(5))``) from a private generator keyed by ``(seed, round, module index, slot)``,
its column of ``B`` (``B[:, i]``, ``(m, 1, 1)`` for a conv) is zero, so opening a rank does not change the model;
the optimizer's state of that row and column (Adam's moments, ...) is zeroed when ``update`` is given the
optimizer, and Adam's bias correction of the slice restarts with it (`flatlora.alora.restart`). Pruned slots keep
their values behind a zero gate.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .gates import attach_gates, gate_of, gated_layers
from .restart import restart_slice
from .scores import LossFn, Plan, plan_reallocation, rank_scores


@dataclass(frozen=True)
class ALoRAConfig:
    """ALoRA's schedule (in optimizer steps) and sizes; see the module docstring.

    ``init_rank``: open ranks per module at the start (the budget is ``init_rank x modules``); the
    ``LoraConfig``'s ``r`` is the most a module may reach. ``ranks_per_round``: ranks moved per round
    (``None``: the number of distinct module kinds, e.g. 2 for ``query``/``value``, the paper's ``1 x N_mod``).
    """

    init_rank: int
    warmup_steps: int
    interval_steps: int
    rounds: int = 8
    ranks_per_round: int | None = None
    seed: int = 0
    adapter: str = "default"

    def __post_init__(self) -> None:
        for name, lo in (("init_rank", 1), ("warmup_steps", 1), ("interval_steps", 1), ("rounds", 0), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}={v!r} must be an int >= {lo}")
        n = self.ranks_per_round
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"ranks_per_round={n!r} must be a positive int or None (one per module kind)")
        if not isinstance(self.adapter, str) or not self.adapter:
            raise ValueError(f"adapter={self.adapter!r} must be the name of the LoRA adapter to allocate")

    def round_steps(self) -> list[int]:
        """The optimizer steps after which a round runs: ``warmup + k * interval``, ``k = 0..rounds-1``."""
        return [self.warmup_steps + k * self.interval_steps for k in range(self.rounds)]


@dataclass(frozen=True)
class RoundReport:
    """What one round did: module names, their open ranks after it, the moves and ``S(M)`` before it."""

    round: int
    step: int
    score_full: float
    pruned: tuple[tuple[str, int], ...]
    opened: tuple[tuple[str, int], ...]
    ranks: dict[str, int]


def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    out = model(**batch)
    return out["loss"] if isinstance(out, dict) else out.loss


def slot_seed(seed: int, round_: int, module: int, slot: int) -> int:
    """63-bit seed of a reopened slot's ``A`` row: a blake2b mix of the four keys (never the global RNG)."""
    digest = hashlib.blake2b(f"alora/{seed}/{round_}/{module}/{slot}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class ALoRA:
    """Allocates the ranks of a gated PEFT LoRA model (see the module docstring).

    Args:
        model: a PEFT model whose LoRA layers hold ``config.adapter`` at rank ``R >= config.init_rank``; gated
            here (`flatlora.alora.attach_gates`) unless already gated with ``init_rank`` open ranks each.
        config: the `ALoRAConfig`.
        batches: the held-out batches of ``S(.)`` (the paper: one batch of 32 validation examples), each
            passed as ``loss_fn(model, batch)``; moved to the model's device by the caller.
        loss_fn: the loss of one batch (default ``model(**batch).loss``); ``S = -mean loss``.
    """

    def __init__(self, model: nn.Module, config: ALoRAConfig, batches: Sequence[Any],
                 loss_fn: LossFn | None = None) -> None:
        if not isinstance(config, ALoRAConfig):
            raise ValueError(f"config must be an ALoRAConfig, got {type(config).__name__}")
        batches = list(batches)
        if not batches:
            raise ValueError("batches is empty: ALoRA scores ranks on held-out batches (e.g. 32 validation "
                             "examples); pass at least one")
        self.model, self.config, self.batches = model, config, batches
        self.loss_fn = loss_fn or _default_loss
        if not gated_layers(model, config.adapter):
            attach_gates(model, config.init_rank, config.adapter)
        self.layers = gated_layers(model, config.adapter)
        opened = {name: int((gate_of(m) != 0).sum()) for name, m in self.layers}
        if set(opened.values()) != {config.init_rank}:
            raise ValueError(f"the model is already gated with open ranks {sorted(set(opened.values()))} per "
                             f"module, not init_rank={config.init_rank}; pass the same init_rank or a fresh model")
        self.budget = sum(opened.values())
        kinds = {name.rsplit(".", 1)[-1] for name, _ in self.layers}
        self.ranks_per_round = config.ranks_per_round or len(kinds)
        self.history: list[RoundReport] = []

    # --- inspection ------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.layers]

    def gates(self) -> list[torch.Tensor]:
        return [gate_of(m) for _, m in self.layers]

    def ranks(self) -> dict[str, int]:
        """Open ranks per module."""
        return {name: int((gate_of(m) != 0).sum()) for name, m in self.layers}

    # --- the rounds ------------------------------------------------------------------------------------
    def update(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> RoundReport | None:
        """Call after optimizer step ``step`` (1-based); runs a round when ``step`` is scheduled."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"step={step!r} must be the number of optimizer steps taken (an int >= 1)")
        steps = self.config.round_steps()
        if step not in steps:
            return None
        return self.reallocate(steps.index(step), step, optimizer)

    def reallocate(self, round_: int, step: int = 0, optimizer: torch.optim.Optimizer | None = None) -> RoundReport:
        """Score every open rank, prune the lowest, open reserve slots (one round, whatever the schedule)."""
        was_training = self.model.training
        self.model.eval()
        try:
            s_full, scores = rank_scores(self.model, self.gates(), self.batches, self.loss_fn)
        finally:
            self.model.train(was_training)
        plan = plan_reallocation(self.gates(), scores, self.ranks_per_round)
        self._apply(plan, round_, optimizer)
        total = sum(self.ranks().values())
        if total != self.budget:  # pragma: no cover - plan_reallocation moves as many as it prunes
            raise RuntimeError(f"ALoRA round {round_} changed the total open ranks {self.budget} -> {total}")
        report = RoundReport(round_, step, s_full, tuple((self.names[m], i) for m, i in plan.prune),
                             tuple((self.names[m], i) for m, i in plan.grow), self.ranks())
        self.history.append(report)
        return report

    @torch.no_grad()
    def _apply(self, plan: Plan, round_: int, optimizer: torch.optim.Optimizer | None) -> None:
        adapter = self.config.adapter
        for m, i in plan.prune:
            gate_of(self.layers[m][1])[i] = 0.0
        for m, i in plan.grow:
            layer = self.layers[m][1]
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            gen = torch.Generator().manual_seed(slot_seed(self.config.seed, round_, m, i))
            fan_in = a[i].numel()  # n (linear), c * kh * kw (conv): kaiming_uniform_'s fan-in of A
            row = (torch.rand(fan_in, generator=gen, dtype=torch.float64) * 2 - 1) / math.sqrt(fan_in)
            a[i].copy_(row.view(a[i].shape).to(a.dtype))
            b[:, i].zero_()
            gate_of(layer)[i] = 1.0
            if optimizer is not None:
                restart_slice(optimizer, a, i)
                restart_slice(optimizer, b, (slice(None), i))

    # --- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Gates (as lists) per module and the rounds done: JSON-serialisable."""
        return {"config": asdict(self.config), "gates": {n: gate_of(m).tolist() for n, m in self.layers},
                "history": [asdict(r) for r in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the gates saved by `state_dict` (same model layout)."""
        gates = state.get("gates") if isinstance(state, dict) else None
        if not isinstance(gates, dict) or set(gates) != set(self.names):
            raise ValueError("state does not hold the gates of this model's gated layers; pass ALoRA.state_dict() "
                             "of the same model")
        for name, m in self.layers:
            g = torch.tensor(gates[name], dtype=torch.float32)
            if g.shape != gate_of(m).shape:
                raise ValueError(f"gate of {name!r} has {g.numel()} slots, the layer {gate_of(m).numel()}")
            gate_of(m).copy_(g)
        self.budget = sum(self.ranks().values())
        self.history = [RoundReport(**{**r, "pruned": tuple(map(tuple, r["pruned"])),
                                       "opened": tuple(map(tuple, r["opened"]))}) for r in state.get("history", [])]


__all__ = ["ALoRA", "ALoRAConfig", "RoundReport", "slot_seed"]
