"""AB-LoRA importance scores and the ALoRA reallocation plan (Liu et al., NAACL 2024, arXiv 2403.16187, Sec. 3.3-3.4).

Score of an open rank ``r`` (eq. 6 of the paper), with ``S(.)`` the negative cross-entropy of a model on a
fixed batch of held-out data:

    IS(r) = S(M) - S(M \\ r) + S(M_r)

``M`` is the gated super-network as it is, ``M \\ r`` the same with rank ``r`` switched off, ``M_r`` the model with
*only* rank ``r`` open (every other LoRA rank of every module switched off). A rank whose removal hurts, or
which alone already helps, scores high. ``2K + 1`` evaluations for ``K`` open ranks.

Reallocation of one round (Algorithm 1 and footnote 3 of the paper): prune the ``n`` open ranks of lowest
score; give ``n`` ranks to the modules none of whose ranks was pruned, as evenly as possible, the remainder
first to the modules of higher average score. Where the paper is silent or lets the budget shrink (its
footnote 4), this module keeps the total fixed: a receiver must hold open ranks (a module pruned to zero has
no score that could call it important, and stays out); a module takes at most its closed slots; what the
receivers cannot take goes to the modules that lost a rank this round (higher average score first, never a
slot pruned in this round); ranks that fit nowhere are not pruned (the highest-scored candidates are kept).
The plan is a pure function of the gates and scores, so it is tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def ab_scores(s_full: float, s_without: torch.Tensor, s_alone: torch.Tensor) -> torch.Tensor:
    """``IS(r) = S(M) - S(M \\ r) + S(M_r)`` elementwise (float64 tensors of the same shape)."""
    return s_full - s_without.double() + s_alone.double()


@dataclass(frozen=True)
class Plan:
    """One round's moves: ``(module index, slot)`` pairs to close and to open (``len(prune) == len(grow)``)."""

    prune: tuple[tuple[int, int], ...]
    grow: tuple[tuple[int, int], ...]


def plan_reallocation(gates: Sequence[torch.Tensor], scores: Sequence[torch.Tensor], n: int) -> Plan:
    """The moves of one round (see the module docstring).

    ``gates[m]``: module ``m``'s gate ``(R_m,)``, non-zero = open; ``scores[m]``: ``(R_m,)``, read at open slots only.
    Ties are broken by ``(module, slot)`` order, so the plan is deterministic.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r} must be an int >= 0: the ranks moved per round")
    open_ = [g != 0 for g in gates]
    ranked = sorted(((float(scores[m][i]), m, i) for m, o in enumerate(open_) for i in o.nonzero().flatten().tolist()))
    candidates = [(m, i) for _, m, i in ranked[:n]]  # lowest scores first
    pruned_modules = {m for m, _ in candidates}

    def mean_score(m: int) -> float:
        idx = open_[m].nonzero().flatten()
        return float(scores[m][idx].double().mean()) if len(idx) else float("-inf")

    priority = sorted(range(len(gates)), key=lambda m: (-mean_score(m), m))
    free = {m: [i for i in (~open_[m]).nonzero().flatten().tolist()] for m in range(len(gates))}
    pruned_slots = set(candidates)
    free = {m: [i for i in slots if (m, i) not in pruned_slots] for m, slots in free.items()}
    grow: list[tuple[int, int]] = []
    remaining = len(candidates)
    # the paper's receivers: modules with open ranks none of which was pruned; a module without open ranks has no
    # score that could call it important, so it receives nothing (pruned to zero, it stays out)
    first = [m for m in priority if m not in pruned_modules and bool(open_[m].any())]
    others = [m for m in priority if m in pruned_modules]  # only if the receivers are full (budget kept fixed)
    for group in (first, others):
        while remaining and any(free[m] for m in group):
            takers = [m for m in group if free[m]]
            share, extra = divmod(remaining, len(takers))
            for k, m in enumerate(takers):  # as evenly as possible, the remainder to higher average scores
                want = min(share + (1 if k < extra else 0), len(free[m]))
                grow += [(m, free[m].pop(0)) for _ in range(want)]
                remaining -= want
    kept = len(candidates) - len(grow)  # ranks that fit nowhere stay open: drop the highest-scored candidates
    prune = candidates[: len(candidates) - kept]
    return Plan(prune=tuple(prune), grow=tuple(grow))


@torch.no_grad()
def batch_score(model: nn.Module, batches: Sequence[Any], loss_fn: LossFn) -> float:
    """``S = -mean loss`` over ``batches`` (the model in whatever mode the caller set)."""
    total = 0.0
    for batch in batches:
        total += float(loss_fn(model, batch).detach().float())
    return -total / len(batches)


@torch.no_grad()
def rank_scores(model: nn.Module, gates: Sequence[torch.Tensor], batches: Sequence[Any],
                loss_fn: LossFn) -> tuple[float, list[torch.Tensor]]:
    """``(S(M), IS per module)``: every open rank scored by eq. 6 (NaN at closed slots).

    ``gates`` are the live gate buffers: they are written for each ablation and restored exactly (the model
    leaves with the gates it came with, also if a forward raises). The caller sets eval mode.
    """
    saved = [g.clone() for g in gates]
    try:
        s_full = batch_score(model, batches, loss_fn)
        out = [torch.full(g.shape, float("nan"), dtype=torch.float64) for g in gates]
        for m, g in enumerate(gates):
            for i in (saved[m] != 0).nonzero().flatten().tolist():
                g[i] = 0.0
                s_without = batch_score(model, batches, loss_fn)
                g[i] = saved[m][i]
                for other in gates:
                    other.zero_()
                g[i] = saved[m][i]
                s_alone = batch_score(model, batches, loss_fn)
                for other, s in zip(gates, saved):
                    other.copy_(s)
                out[m][i] = float(ab_scores(s_full, torch.tensor(s_without), torch.tensor(s_alone)))
    finally:
        for g, s in zip(gates, saved):
            g.copy_(s)
    return s_full, out


__all__ = ["LossFn", "Plan", "ab_scores", "batch_score", "plan_reallocation", "rank_scores"]
