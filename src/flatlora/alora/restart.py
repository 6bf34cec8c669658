"""A reopened ALoRA rank starts its optimizer state afresh, Adam's bias correction included.

Reopening slot ``i`` zeroes the per-element optimizer state of row ``i`` of ``A`` and column ``i`` of ``B``
(``A[i]`` and ``B[:, i]``, whatever the tensors' other dims: a conv layer's ``(R, c, kh, kw)`` ``A`` and
``(m, R, 1, 1)`` ``B``; Adam's moments ``m``, ``v``), as for a new parameter. Adam's step counter ``T`` is one
scalar per tensor, so the slice keeps the tensor's bias correction: at its ``k``-th update since reopening the
slice moves by

    lr · m / (1 - b1^T) / (sqrt(v / (1 - b2^T)) + eps)       instead of a fresh rank's
    lr · m / (1 - b1^k) / (sqrt(v / (1 - b2^k)) + eps)

(the same ``m``, ``v``: only the corrections differ). For the defaults (0.9, 0.999) the first update of a slice
reopened at ``T = 10`` is 0.48x a fresh rank's, at ``T = 200`` 1.35x, at ``T = 1000`` 2.5x (the ratio
``sqrt(1 - b2^k)/(1 - b1^k) · (1 - b1^T)/sqrt(1 - b2^T)``, ``eps`` aside), and the gap closes only as ``b2^k``
vanishes (thousands of steps).

The correction is exact: a post-step hook on the optimizer adds, to every reopened slice, the difference
between the update Adam applied and the fresh one, computed from the state after the step (``m``, ``v`` or
AMSGrad's ``max_exp_avg_sq``) and the learning rate the step used (read by a pre-step hook, so a scheduler
stepping before or after does not matter). Weight decay (AdamW's decoupled, Adam's in the gradient) is the same
for both and left alone. A slice is dropped from the hook once its two corrections equal the tensor's to
``1e-12``. Only ``torch.optim.Adam`` and ``AdamW`` (their per-element formula, ``step`` a scalar) are corrected;
for any other optimizer the zeroed state is all there is. The reopened slices live on the optimizer object, not
in its ``state_dict``: a run resumed from a checkpoint gives slices reopened before it the tensor's correction.
"""

from __future__ import annotations

import math
from typing import Any

import torch

_HOOKS = "_alora_restart"  # attribute on the optimizer: its `_Restarts`


def _inner(optimizer: Any) -> Any:
    """The torch optimizer under accelerate's (or another) wrapper."""
    while not hasattr(optimizer, "state") and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _step_of(state: dict) -> int:
    step = state.get("step", 0)
    return int(step.item() if isinstance(step, torch.Tensor) else step)


class _Restarts:
    """The reopened slices of one Adam optimizer and the two hooks that correct their updates."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.slices: list[tuple[torch.Tensor, dict, Any, int]] = []  # (param, group, index, tensor step at reopen)
        self.lrs: dict[int, float] = {}
        optimizer.register_step_pre_hook(self._pre)
        optimizer.register_step_post_hook(self._post)

    def _pre(self, optimizer, args, kwargs) -> None:
        self.lrs = {id(g): float(g["lr"]) for g in optimizer.param_groups}

    @torch.no_grad()
    def _post(self, optimizer, args, kwargs) -> None:
        keep = []
        for param, group, index, born in self.slices:
            state = optimizer.state.get(param, {})
            big_t = _step_of(state)
            k = big_t - born
            if k <= 0 or param.grad is None:  # no update of this tensor in this step
                keep.append((param, group, index, born))
                continue
            b1, b2 = group["betas"]
            b1, b2, eps = float(b1), float(b2), float(group["eps"])
            m = state["exp_avg"][index].double()
            v = state["max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"][index].double()
            lr = self.lrs.get(id(group), float(group["lr"]))

            def update(n: int) -> torch.Tensor:
                return lr / (1 - b1 ** n) * m / (v.sqrt() / math.sqrt(1 - b2 ** n) + eps)

            param[index] += (update(big_t) - update(k)).to(param.dtype)  # maximize: m holds the flipped sign
            if abs(b1 ** k - b1 ** big_t) > 1e-12 or abs(b2 ** k - b2 ** big_t) > 1e-12:
                keep.append((param, group, index, born))
        self.slices = keep


def restart_slice(optimizer: Any, param: torch.Tensor, index: Any) -> None:
    """Zero the per-element optimizer state of ``param[index]`` (a row ``i`` or ``(slice(None), i)``) and, for
    Adam/AdamW, give it its own bias correction from the next step on (module docstring)."""
    optimizer = _inner(optimizer)
    state = optimizer.state.get(param, {})
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            value[index] = 0
    if not isinstance(optimizer, torch.optim.Adam) or not state:  # AdamW subclasses Adam; no state: fresh already
        return
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    if group.get("capturable") or group.get("fused") or group.get("differentiable"):
        raise ValueError("ALoRA corrects Adam's bias correction of reopened ranks for the default (foreach or "
                         "single-tensor) Adam only; build the optimizer without capturable/fused/differentiable")
    restarts = getattr(optimizer, _HOOKS, None)
    if restarts is None:
        restarts = _Restarts(optimizer)
        setattr(optimizer, _HOOKS, restarts)
    born = _step_of(state)
    restarts.slices = [s for s in restarts.slices if not (s[0] is param and s[2] == index)]
    restarts.slices.append((param, group, index, born))


__all__ = ["restart_slice"]
