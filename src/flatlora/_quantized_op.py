"""A bitsandbytes layer computed at ``deq(W0) + E`` with one matmul: the exact mode's route for quantized bases.

bitsandbytes trains a 4-bit layer (and, on CPU, an 8-bit one) by dequantizing the weight into a dense buffer
in the compute dtype and running one dense matmul, forward and for the input gradient
(`flatlora._quantized.fuses_noise` says where). Such a layer at ``W0 + E`` is the same computation with ``E``
added to that buffer in place before the matmul:

    forward:   w = deq(W0) (new buffer);  w += E  (same buffer);  y = x · wᵀ + b
    backward:  w = deq(W0);  w += E  (the same E, from the seed);  ∂L/∂x = g · w

instead of bitsandbytes' own forward plus ``x · Eᵀ`` beside it (a second matmul and a second full-size
product in backward). ``E`` comes from the layer's `flatlora.noise.NoiseSpec` (on CPU drawn and added block
by block, on CUDA with Triton in one pass, `flatlora.noise.add_filter_noise`); between forward and backward
only the spec (seed and fp32 row std) and a reference to the layer are kept, unless ``keep_noisy_weight``.
The 4-bit/8-bit storage is only read (the buffer is new), and bitsandbytes' own ``forward`` never runs during
the step, so it cannot repack a CPU 4-bit weight in place either. LoRA's branch ``B(A(dropout(x))) * s`` stays
PEFT's: only the base layer's forward is swapped, for the step, as for float layers.

Under ``torch.compile`` the swapped forward runs outside the graph (a graph break per quantized layer: the
same numbers; bitsandbytes' dequantization and the CPU generator are not traceable).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import _compiled
from ._quantized import dequantize_as
from .exact import ExactLayer, _OutsideGraph
from .noise import NoiseSpec
from .ops import Op
from .targets import runs_reference


def noisy_weight(base: nn.Module, spec: NoiseSpec, dtype: torch.dtype) -> torch.Tensor:
    """``deq(W0) + E`` ``(out, in)`` in ``dtype``: the noise added in place into the fresh dequantized buffer."""
    return spec.add_to(dequantize_as(base, dtype), inplace=True)


class FusedQuantizedLinear(torch.autograd.Function):
    """``y = F.linear(x, deq(W0) + E, b)`` for a `fuses_noise` bitsandbytes layer ``base``; ``x`` ``(tokens, in)``
    already in the compute ``dtype``, ``b`` ``(out,)`` or ``None``. Backward forms ``deq(W0) + E`` again for the
    input gradient (only when one is needed); the base weight gets none (it is frozen, integer storage)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, base: nn.Module, spec: NoiseSpec,
                dtype: torch.dtype) -> torch.Tensor:
        w = noisy_weight(base, spec, dtype)
        ctx.base, ctx.spec, ctx.dtype, ctx.x_dtype = base, spec, dtype, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(w if spec.keep else None)  # keep_noisy_weight: one draw instead of two
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        need_x, need_b = ctx.needs_input_grad[:2]
        gx = gb = None
        if need_x:
            (kept,) = ctx.saved_tensors
            w = kept if kept is not None else noisy_weight(ctx.base, ctx.spec, ctx.dtype)
            gx = g.matmul(w.to(g.dtype)).to(ctx.x_dtype)
        if need_b:
            gb = g.sum(0).to(ctx.bias_dtype)
        return gx, gb, None, None, None


def _compute_dtype(base: nn.Module, x: torch.Tensor) -> torch.dtype | None:
    """The dtype bitsandbytes' forward computes in, without setting it on the layer as that forward does:
    ``Linear4bit`` switches to the input's dtype at its first call for fp32/bf16 inputs and otherwise uses
    ``compute_dtype`` (``None``: the input's); ``Linear8bitLt`` computes in the input's dtype. ``None`` for 8-bit."""
    if type(base.weight).__name__ != "Params4bit":
        return None
    if not getattr(base, "compute_type_is_set", True) and x.dtype in (torch.float32, torch.bfloat16):
        return x.dtype
    return base.compute_dtype


def fused_linear(x: torch.Tensor, base: nn.Module, spec: NoiseSpec) -> torch.Tensor:
    """``base``'s forward at ``deq(W0) + E``: input and bias cast to the compute dtype as bitsandbytes does, the
    input folded to 2-D (so the output is a matrix, not a view of one, see `flatlora.exact.perturbed_op`), a 4-bit
    layer's output cast back to the input's dtype as ``Linear4bit.forward`` does."""
    dtype = _compute_dtype(base, x)
    xc = x if dtype is None else x.to(dtype)
    bias = base.bias
    if bias is not None:
        bias = bias.to(xc.dtype)
    y = FusedQuantizedLinear.apply(xc.reshape(-1, xc.shape[-1]), bias, base, spec, xc.dtype)
    y = y.view(*x.shape[:-1], y.shape[-1])
    return y if dtype is None else y.to(x.dtype)


class QuantizedExactLayer(ExactLayer):
    """`ExactLayer` of a bitsandbytes layer: ``forward`` (swapped in for the base layer's where
    `flatlora.targets.noise_beside` allows it) is `fused_linear`; the noise-beside hooks are `ExactLayer`'s, for steps
    where the layer cannot fuse (a CPU-packed 4-bit weight, 8-bit on CUDA, DoRA)."""

    def __init__(self, base: nn.Module, op: Op, transposed: bool, switch: nn.Module | None = None) -> None:
        super().__init__(base, op, transposed, switch)

        def noisy(x: torch.Tensor) -> torch.Tensor:  # runs eagerly, also under compile: it records the run itself
            if runs_reference(switch, self.trained):  # a reference forward: bitsandbytes' own, clean layer
                return type(base).forward(base, x)
            _compiled.ran_layers.add(self.uid)
            return fused_linear(x, base, self.spec())

        outside = self._outside = _OutsideGraph(noisy)

        def forward(x: torch.Tensor) -> torch.Tensor:  # one function object for all steps (compile guards)
            if torch.compiler.is_compiling():
                return outside(x)  # a graph break: bitsandbytes and the CPU generator run eagerly
            return noisy(x)

        self.forward = forward

    def begin(self, spec_fn: Callable[[], NoiseSpec], now: bool) -> None:
        super().begin(spec_fn, now)
        self._outside.prepare()
