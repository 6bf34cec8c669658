"""The peers of Flat-LoRA as step rules of `flatlora compare`: Bi-LoRA and EFlat-LoRA (docs/peers.md).

**Bi-LoRA** (Liu, Li et al., ICLR 2026, arXiv 2508.19564, Algorithm 1). Every LoRA layer carries a second,
auxiliary LoRA adapter: ``W = W0 + s1 B1 A1 + s2 B2 A2``. One forward/backward at ``W`` gives the gradients of
both; the primary adapter descends, the auxiliary one ascends (eq. 9: ``B2 <- B2 + eta2 (dL/dW) A2^T``, same for
``A2``), with the same optimizer and learning rate (the paper: ``eta2 = eta1``), and after each update the
auxiliary adapters are clipped into a global ball (eq. 10):

    c = sqrt(sum_layers ||s2 B2 A2||_F^2);   if c > rho:  B2 <- sqrt(rho / c) B2,  A2 <- sqrt(rho / c) A2

so the total weight perturbation ``s2 B2 A2`` has Frobenius norm at most ``rho``. The paper writes ``||B2 A2||_F``,
"omitting the scaling factor s", which it "can be incorporated into B and A"; ``norm="unscaled"`` takes the
formula literally (``c = sqrt(sum ||B2 A2||^2)``, a radius of ``rho s2`` in the merged weight). After training
the auxiliary adapter is deleted; the model is ``W0 + s1 B1 A1``. Defaults from the paper: ``rho = 0.05`` (its
GLUE/T5 and Llama settings), auxiliary rank 8 (its "task-agnostic default"), auxiliary init PEFT's (``B2 = 0``).

**EFlat-LoRA** (Deng, Zhu et al., arXiv 2508.00522; v3 calls it EFMLoRA; Algorithm 2, eqs. 12, 13, 15, 18).
SAM's perturbation of the full weight, estimated from the LoRA gradients and put on ``B`` alone:

    G = (1/2) ((1/s) dL/dB (A^T)^+ + (1/s) (B^T)^+ dL/dA)          the full-weight gradient, eq. 12
    E_W = rho_t G / ||G||_F                                           eq. 13 (per layer, see below)
    E_B = (1/s) E_W A^+                                               eq. 15: s (B + E_B) A = s B A + E_W A^+ A

and reused one step late through an exponential moving average so that a step costs one pass: at step ``t``
the gradients are taken at ``B + Ê_{t-1}`` (``Ê_0 = 0``), ``E_B`` is computed from them (with the ``A`` and the
perturbed ``B`` they were taken at), ``Ê_t = E_B`` at ``t = 1`` and ``(1 - beta) Ê_{t-1} + beta E_B`` after, and the
optimizer updates the clean ``B`` with those gradients. ``^+`` is the pseudo-inverse (``torch.linalg.pinv``, SVD:
``B = 0`` at init gives ``(B^T)^+ = 0`` rather than a failure). Published: ``rho`` between 0.05 and 0.2 (its
Qwen-VL table), "we reduce rho progressively" with ``rho_t = rho / sqrt(t)`` the only schedule it writes down
(Theorem 2). Not published in the text available here: ``beta`` and the per-task ``rho`` (tables given as images);
the choices ``rho = 0.05``, ``beta = 0.5`` are ours (docs/peers.md). The norm of ``E_W`` is per layer by default
(eq. 9 and Theorem 1's proof, docs/peers.md) or global (``norm="global"``, SAM's); ``rho``, ``beta``, the
schedule and the norm are `flatlora compare` options (``--eflat-*``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

BI_LORA_RHO = 0.05
BI_LORA_AUX_RANK = 8
BI_LORA_AUX = "bilora_aux"
EFLAT_RHO = 0.05
EFLAT_BETA = 0.5


def _factors(model: nn.Module, adapter: str) -> list[tuple[str, nn.Parameter, nn.Parameter, float]]:
    """``(name, A, B, s)`` of every PEFT LoRA layer holding ``adapter`` as ``lora_A``/``lora_B`` modules whose
    delta is ``s * B @ A`` on flattened kernels (Linear, GPT-2 Conv1D, ConvNd with PEFT's 1x1 ``lora_B``)."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, m in model.named_modules():
        if not isinstance(m, LoraLayer) or adapter not in m.lora_A:
            continue
        a, b = m.lora_A[adapter].weight, m.lora_B[adapter].weight
        if adapter in getattr(m, "lora_variant", {}) or (b.dim() > 2 and b[0, 0].numel() != 1):
            raise ValueError(f"layer {name!r}: its adapter {adapter!r} is not a plain s * B @ A (LoRA variant or a "
                             "conv lora_B with a kernel); Bi-LoRA and EFlat-LoRA need plain LoRA layers")
        out.append((name, a, b, float(m.scaling[adapter])))
    if not out:
        raise ValueError(f"the model has no PEFT LoRA layer holding adapter {adapter!r}")
    return out


def _mat(w: torch.Tensor) -> torch.Tensor:
    """A conv kernel as the matrix of its delta: ``(rows, rest)``."""
    return w.reshape(w.shape[0], -1)


# --- Bi-LoRA ---------------------------------------------------------------------------------------------
def add_auxiliary_adapter(model: nn.Module, rank: int = BI_LORA_AUX_RANK, name: str = BI_LORA_AUX,
                          primary: str = "default") -> None:
    """Add Bi-LoRA's auxiliary adapter beside ``primary`` on the same layers (PEFT's init: ``B2 = 0``), with the
    primary's ``alpha / r`` ratio, and make both active and trainable on every LoRA layer.

    The auxiliary adapter has no ``modules_to_save``: PEFT's task models (``SEQ_CLS``) would add a copy of the
    classifier to every new adapter, and a ``ModulesToSaveWrapper`` serves one adapter at a time, so it is added
    through the generic ``PeftModel.add_adapter`` and activated on the LoRA layers only (the head stays the
    primary adapter's).
    """
    from peft import LoraConfig, PeftModel
    from peft.tuners.lora import LoraLayer

    cfg = model.peft_config[primary]
    layers = [n.removeprefix("base_model.model.") for n, _, _, _ in _factors(model, primary)]
    ratio = cfg.lora_alpha / cfg.r
    PeftModel.add_adapter(model, name, LoraConfig(r=rank, lora_alpha=ratio * rank, lora_dropout=cfg.lora_dropout,
                                                  target_modules=layers, fan_in_fan_out=cfg.fan_in_fan_out))
    for m in model.modules():
        if isinstance(m, LoraLayer) and name in m.lora_A:
            m.set_adapter([primary, name])


def aux_norm(pairs: list[tuple[torch.Tensor, torch.Tensor, float]]) -> float:
    """``c = sqrt(sum ||s B A||_F^2)`` over ``(A, B, s)`` (conv kernels flattened), in float64."""
    return math.sqrt(sum(float(((s * _mat(b).detach().double()) @ _mat(a).detach().double()).square().sum())
                         for a, b, s in pairs))


BI_LORA_NORMS = {"scaled": "||s2 B2 A2||: the perturbation the merged weight really gets (the paper folds s into "
                            "B and A)",
                 "unscaled": "||B2 A2||: the paper's formula taken literally, omitting s (the radius is then "
                             "rho * s2 in the merged weight)"}


class BiLoRA:
    """Bi-LoRA's rule on a PEFT model holding the auxiliary adapter (`add_auxiliary_adapter`).

    ``norm``: which norm eq. 10 clips (`BI_LORA_NORMS`): ``scaled`` (``sqrt(sum ||s2 B2 A2||^2)``, default) or
    ``unscaled`` (``sqrt(sum ||B2 A2||^2)``, the paper's formula with ``s`` omitted)."""

    def __init__(self, model: nn.Module, rho: float = BI_LORA_RHO, aux: str = BI_LORA_AUX,
                 primary: str = "default", norm: str = "scaled") -> None:
        from .._checks import check_choice

        if isinstance(rho, bool) or not (isinstance(rho, (int, float)) and rho > 0):
            raise ValueError(f"rho={rho!r} must be > 0: the radius of the auxiliary perturbation")
        check_choice("norm", norm, BI_LORA_NORMS)
        self.model, self.rho, self.aux, self.primary, self.norm = model, float(rho), aux, primary, norm
        self.layers = [(a, b, s if norm == "scaled" else 1.0) for _, a, b, s in _factors(model, aux)]

    def ascend(self) -> None:
        """Negate the auxiliary gradients: the optimizer's descent step is then eq. 9's ascent."""
        for a, b, _ in self.layers:
            for p in (a, b):
                if p.grad is not None:
                    p.grad.neg_()

    @torch.no_grad()
    def clip(self) -> float:
        """Eq. 10 after an update; returns ``c`` before clipping."""
        c = aux_norm(self.layers)
        if c > self.rho:
            f = math.sqrt(self.rho / c)
            for a, b, _ in self.layers:
                a.mul_(f)
                b.mul_(f)
        return c

    def discard(self) -> None:
        """Delete the auxiliary adapter: the model is ``W0 + s1 B1 A1`` again."""
        self.model.base_model.set_adapter(self.primary)
        self.model.delete_adapter(self.aux)


# --- EFlat-LoRA ------------------------------------------------------------------------------------------
def full_weight_gradient(grad_a: torch.Tensor, grad_b: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                         scaling: float) -> torch.Tensor:
    """Eq. 12: ``G = (1/2) ((1/s) dL/dB (A^T)^+ + (1/s) (B^T)^+ dL/dA)``, ``(m, n)`` in float64.

    Shapes: ``A (r, n)``, ``B (m, r)`` and their gradients (conv kernels flattened)."""
    a2, b2 = _mat(a).double(), _mat(b).double()
    ga, gb = _mat(grad_a).double(), _mat(grad_b).double()
    return 0.5 * (gb @ torch.linalg.pinv(a2.T) + torch.linalg.pinv(b2.T) @ ga) / scaling


def onto_b(e_w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Eq. 15: ``E_B = (1/s) E_W A^+``, shaped and typed as ``B`` (``s E_B A = E_W A^+ A``, the part of ``E_W`` in
    ``A``'s row space)."""
    return ((e_w @ torch.linalg.pinv(_mat(a).double())) / scaling).reshape(b.shape).to(b.dtype)


def eflat_perturbation(grad_a: torch.Tensor, grad_b: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       scaling: float, rho: float) -> torch.Tensor:
    """``E_B = (1/s) E_W A^+`` with ``E_W = rho G / ||G||_F`` (one layer's own norm) and ``G`` from eq. 12; zero
    when ``G`` is zero. Shapes as `full_weight_gradient`, ``E_B`` as ``B``."""
    g = full_weight_gradient(grad_a, grad_b, a, b, scaling)
    norm = torch.linalg.matrix_norm(g)
    if not bool(norm > 0):
        return torch.zeros_like(b)
    return onto_b((rho / norm) * g, a, b, scaling)


EFLAT_NORMS = {"layer": "each layer's E_W has norm rho_t (||G||_F of that layer; the reading of eq. 9 / Theorem 1)",
               "global": "all layers' E_W together have norm rho_t (one norm over every layer's G, as SAM)"}
EFLAT_SCHEDULES = {"inv-sqrt": "rho_t = rho / sqrt(t), t the optimizer step (the paper's Theorem 2)",
                   "constant": "rho_t = rho at every step (SAM's)"}


class EFlatLoRA:
    """EFlat-LoRA's rule (module docstring).

    ``rho``: ``rho_0``; ``schedule``: ``inv-sqrt`` (``rho_t = rho / sqrt(t)``) or ``constant``; ``norm``: ``layer``
    (each layer's ``E_W`` has norm ``rho_t``) or ``global`` (``E_W = rho_t G / ||[G_1, ..., G_L]||``, SAM's one
    norm); ``beta``: the EMA weight of the newest perturbation (``1``: no averaging, the previous step's)."""

    def __init__(self, model: nn.Module, rho: float = EFLAT_RHO, beta: float = EFLAT_BETA,
                 schedule: str = "inv-sqrt", norm: str = "layer", adapter: str = "default") -> None:
        from .._checks import check_choice

        if isinstance(rho, bool) or not (isinstance(rho, (int, float)) and rho >= 0):
            raise ValueError(f"rho={rho!r} must be >= 0")
        if isinstance(beta, bool) or not (isinstance(beta, (int, float)) and 0 < beta <= 1):
            raise ValueError(f"beta={beta!r} must be in (0, 1]: the EMA weight of the newest perturbation")
        check_choice("schedule", schedule, EFLAT_SCHEDULES)
        check_choice("norm", norm, EFLAT_NORMS)
        self.rho, self.beta, self.schedule, self.norm = float(rho), float(beta), schedule, norm
        self.layers = [(a, b, s) for _, a, b, s in _factors(model, adapter)]
        self.ema: list[torch.Tensor | None] = [None] * len(self.layers)

    def rho_at(self, t: int) -> float:
        return self.rho / math.sqrt(t) if self.schedule == "inv-sqrt" else self.rho

    def size(self) -> float:
        """``sqrt(sum_l ||s Ê_l A_l||_F^2)``: the Frobenius norm of the full-weight perturbation the next step's
        gradients are taken at (0 before the first step)."""
        total = 0.0
        for (a, _, s), e in zip(self.layers, self.ema):
            if e is not None:
                total += float((s * _mat(e).double() @ _mat(a.detach()).double()).square().sum())
        return math.sqrt(total)

    def step(self, t: int, backward: Callable[[], float]) -> float:
        """Gradients of step ``t`` at ``B + Ê_{t-1}`` (``backward()`` runs forward/backward and returns the loss);
        the model is back at ``B`` exactly afterwards (also if ``backward`` raises) and ``Ê_t`` is updated."""
        saved = [b.detach().clone() for _, b, _ in self.layers]
        try:
            with torch.no_grad():
                for (_, b, _), e in zip(self.layers, self.ema):
                    if e is not None:
                        b.add_(e)
            perturbed = [b.detach().clone() for _, b, _ in self.layers]
            loss = backward()
        finally:
            with torch.no_grad():
                for (_, b, _), s in zip(self.layers, saved):
                    b.copy_(s)
        grads = {k: full_weight_gradient(a.grad, b.grad, a.detach(), bt, s)
                 for k, ((a, b, s), bt) in enumerate(zip(self.layers, perturbed))
                 if a.grad is not None and b.grad is not None}
        norms = {k: torch.linalg.matrix_norm(g) for k, g in grads.items()}
        if self.norm == "global":
            total = torch.sqrt(sum(n.square() for n in norms.values())) if norms else None
            norms = {k: total for k in norms}
        rho = self.rho_at(t)
        for k, g in grads.items():
            a, b, s = self.layers[k]
            e = onto_b((rho / norms[k]) * g, a.detach(), b, s) if bool(norms[k] > 0) else torch.zeros_like(b)
            self.ema[k] = e if self.ema[k] is None else (1 - self.beta) * self.ema[k] + self.beta * e
        return loss


__all__ = ["BI_LORA_AUX", "BI_LORA_AUX_RANK", "BI_LORA_NORMS", "BI_LORA_RHO", "BiLoRA", "EFLAT_BETA", "EFLAT_NORMS",
           "EFLAT_RHO", "EFLAT_SCHEDULES", "EFlatLoRA", "add_auxiliary_adapter", "aux_norm", "eflat_perturbation",
           "full_weight_gradient", "onto_b"]
