"""Exact perturbation: compute a layer at ``W + E`` without ever writing ``W``.

``PerturbedOp`` is a custom autograd function ``x -> op(x, W + E, b)`` (or ``x -> op(x, E)`` when the noise
is added beside an unchanged layer). Forward draws ``E`` from its `NoiseSpec`; backward draws it again from
the same seed. Between the two only the seed and the fp32 row std are kept: no ``E`` and no copy of ``W``,
so the base weights stay bit-identical whatever their dtype, and the memory cost is one transient
``m x n`` buffer while a single layer runs.

``op`` is the layer's own functional form (``Op``): linear (GPT-2 ``Conv1D`` is linear on the transposed
weight), ``convNd`` and embedding. The input gradient has a closed form for the first two (the frozen-base
fast path: one matmul/convolution, like the unperturbed layer); anything else (a trainable base weight or
bias-only training on an unusual layer) recomputes the op under autograd in backward, which costs one more
forward of that layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .noise import NoiseSpec

_CONV_INPUT_GRAD = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}


@dataclass(frozen=True)
class Op:
    """The functional form of a base layer ``y = op(x, w, b)`` with ``w`` in logical (rows-first) layout."""

    kind: str  # "linear" | "conv" | "embedding"
    module: nn.Module  # the base layer (hyper-parameters of conv/embedding are read from it)

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(x, w, b)
        if self.kind == "conv":
            return self.module._conv_forward(x, w, b)
        m = self.module
        return F.embedding(x, w, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)

    def has_closed_form_input_grad(self) -> bool:
        if self.kind == "linear":
            return True
        if self.kind == "conv":
            m = self.module
            return m.padding_mode == "zeros" and not isinstance(m.padding, str)
        return False

    def input_grad(self, g: torch.Tensor, x_shape: torch.Size, w: torch.Tensor) -> torch.Tensor:
        """``d<g, op(x, w)>/dx`` for the linear ops, computed in ``g``'s dtype (as autocast's forward ran)."""
        w = w.to(g.dtype)
        if self.kind == "linear":
            return g.matmul(w)
        m = self.module
        return _CONV_INPUT_GRAD[w.dim() - 2](x_shape, w, g, m.stride, m.padding, m.dilation, m.groups)

    def bias_grad(self, g: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv":
            return g.sum(dim=[d for d in range(g.dim()) if d != 1])
        return g.reshape(-1, g.shape[-1]).sum(0)


class PerturbedOp(torch.autograd.Function):
    """``y = op(x, (weight or 0) + E, bias)`` with ``E`` regenerated from ``spec`` in backward.

    Shapes: ``x`` as the layer takes it; ``weight`` in logical layout ``spec.shape`` (or ``None`` to compute
    only the noise term ``op(x, E)``); ``bias`` ``(m,)`` or ``None``.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                spec: NoiseSpec, op: Op) -> torch.Tensor:
        w = _effective_weight(weight, spec, x)
        ctx.spec, ctx.op, ctx.x_shape, ctx.x_dtype = spec, op, x.shape, x.dtype
        dev = x.device.type
        ctx.amp = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.has_weight = weight is not None
        w_grad = weight is not None and weight.requires_grad
        ctx.fast = op.has_closed_form_input_grad() and not w_grad
        # the fast path needs no activation; the generic one recomputes op(x, ...) and needs x
        ctx.save_for_backward(weight, bias, None if ctx.fast else x)
        out = op(x, w, bias)
        # F.linear with a bias returns a view for inputs of 3+ dims, and autograd forbids in-place updates of a
        # custom Function's view outputs, which PEFT layers do (AdaLoRA: ``result += ...``): hand out a copy
        # (`perturbed_op` folds linear inputs to 2-D first, so this copy is the exception).
        return out.clone() if out._base is not None else out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        weight, bias, x = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        ref = x if x is not None else g
        w = _effective_weight(weight, ctx.spec, ref if weight is None else weight)
        if ctx.fast:
            gx = ctx.op.input_grad(g, ctx.x_shape, w).to(ctx.x_dtype) if need_x else None
            gb = ctx.op.bias_grad(g).to(bias.dtype) if need_b else None
            return gx, None, gb, None, None
        dev, amp_on, amp_dtype = ctx.amp
        with torch.enable_grad(), torch.autocast(dev, dtype=amp_dtype, enabled=amp_on):
            xs = x.detach().requires_grad_(need_x)
            ws = w.detach().requires_grad_(need_w)
            bs = bias.detach().requires_grad_(need_b) if bias is not None else None
            out = ctx.op(xs, ws, bs)
            wrt = [t for t, need in ((xs, need_x), (ws, need_w), (bs, need_b)) if need]
            grads = iter(torch.autograd.grad(out, wrt, g, allow_unused=True)) if wrt else iter(())
        gx = next(grads) if need_x else None
        gw = next(grads) if need_w else None
        gb = next(grads) if need_b else None
        return gx, gw, gb, None, None


def perturbed_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, spec: NoiseSpec,
                 op: Op) -> torch.Tensor:
    """``PerturbedOp.apply(x, weight, bias, spec, op)``, with a linear layer's leading dims folded into one.

    ``F.linear`` on a ``(..., n)`` input returns a view of a ``(tokens, m)`` matrix, which `PerturbedOp` would
    have to copy (see its forward); folding first makes the op's output that matrix itself, and the view back
    to ``(..., m)`` is ordinary autograd, which allows in-place updates. Saves one activation-sized copy per
    layer and micro-batch.
    """
    if op.kind == "linear" and x.dim() > 2:
        y = PerturbedOp.apply(x.reshape(-1, x.shape[-1]), weight, bias, spec, op)
        return y.view(*x.shape[:-1], y.shape[-1])
    return PerturbedOp.apply(x, weight, bias, spec, op)


def _effective_weight(weight: torch.Tensor | None, spec: NoiseSpec, like: torch.Tensor) -> torch.Tensor:
    """``weight + E`` in the weight's dtype, or ``E`` alone in the dtype of ``like`` (the input)."""
    if weight is None:
        dtype = like.dtype if like.dtype.is_floating_point else torch.float32
        return spec.sample(dtype)
    return spec.add_to(weight.detach())  # blockwise: no full E beside W + E (flatlora.noise)
