"""The exact op as two ``torch.compile`` custom operators: ``flatlora::perturbed`` and its input gradient.

Dynamo cannot trace the seeded draws (Python hashing, private ``torch.Generator``s), so the exact op runs as
opaque nodes: `perturbed` computes ``op(x, (W or 0) + E, b)`` and `perturbed_input_grad` its closed-form
``d/dx`` with ``E`` drawn again from its seed, each with a fake implementation for shapes and a registered
autograd formula. A custom operator takes tensors, ints and strings only, so the `flatlora.noise.NoiseSpec`
travels as its tensors (the 63-bit seed as an int64 scalar, the ``(m,)`` fp32 row std) and the layer as
``kind`` + ``params`` (`flatlora.ops.Op.kind`, `flatlora.ops.Op.params`): a new seed every step is new data
for the same graph, not a new graph. They cover the frozen-base fast path (`flatlora.ops.Op.fits_custom_op`);
`flatlora.exact.perturbed_op_compiled` calls them and sends the rest to the eager `flatlora.exact.PerturbedOp`.
Like the eager op, they keep nothing between forward and backward but the weight reference and the spec.

Both are tagged ``torch.Tag.cudagraph_unsafe`` (torch versions that have the tag): each reads its seed back as
a Python int and launches the draw with it, so a CUDA graph captured around them would replay the capture
step's seed, the same ``E`` every step. Inductor therefore keeps them out of CUDA graphs: under
``mode="reduce-overhead"`` with graph partitioning (the default in torch 2.13) it captures the pieces between
them and runs the ops eagerly; without partitioning it does not capture that graph (docs/cost.md).

`perturbed` also records, in `ran_layers`, the id of the layer it computed (``layer``, an int constant of the
graph): a compiled forward runs the Python of the swapped forward only while tracing, but this op's Python on
every call, so this is where `flatlora.core.FlatLora` learns, step by step, which layers really ran perturbed.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .noise import add_filter_noise, filter_noise
from .ops import apply_op, op_bias_grad, op_input_grad

# keep the ops out of CUDA graphs (see the module docstring); a torch without the tag gets no tags
_TAGS = {"tags": (torch.Tag.cudagraph_unsafe,)} if hasattr(torch.Tag, "cudagraph_unsafe") else {}
ran_layers: set[int] = set()  # ids (`flatlora.exact.ExactLayer.uid`) of the layers computed perturbed this step


def _noisy_weight(weight: torch.Tensor | None, scale: torch.Tensor, seed: torch.Tensor, shape: list[int],
                  like: torch.Tensor) -> torch.Tensor:
    """``weight + E`` in the weight's dtype, or ``E`` in ``like``'s floating dtype (fp32 for integer ids), with
    the spec as tensors. The seed is read back as a Python int here, inside the op."""
    if weight is None:
        return filter_noise(shape, scale, int(seed), like.dtype if like.dtype.is_floating_point else torch.float32)
    return add_filter_noise(weight, scale, int(seed))


def _amp_cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """What autocast does to an argument of linear/conv: floating tensors other than fp64 go to ``dtype``."""
    if t is None or dtype is None or not t.dtype.is_floating_point or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def _functional(kind: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, params: list[int],
                amp_dtype: torch.dtype | None) -> torch.Tensor:
    """``op(x, w, b)`` from ints; ``amp_dtype`` is the autocast dtype the caller ran under (cast explicitly
    here, so the result does not depend on whether autocast is still on where the compiled graph calls the op)."""
    return apply_op(kind, _amp_cast(x, amp_dtype), _amp_cast(w, amp_dtype), _amp_cast(b, amp_dtype), params)


@torch.library.custom_op("flatlora::perturbed", mutates_args=(), **_TAGS)
def perturbed(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], scale: torch.Tensor,
              seed: torch.Tensor, shape: list[int], kind: str, params: list[int],
              amp_dtype: Optional[torch.dtype], layer: int = -1) -> torch.Tensor:
    """``op(x, (weight or 0) + E, bias)``: `PerturbedOp`'s forward with ``E`` drawn from (``seed``, ``scale``).

    ``seed``: int64 scalar tensor (the 63-bit layer seed); ``scale``: ``(m,)`` fp32 row std; ``shape``: the
    logical weight shape; ``kind``/``params``: `Op.kind`/`Op.params`; ``amp_dtype``: autocast dtype or None;
    ``layer``: the calling layer's id, added to `ran_layers` (``-1``: none).
    """
    if layer >= 0:
        ran_layers.add(layer)
    out = _functional(kind, x, _noisy_weight(weight, scale, seed, shape, x), bias, params, amp_dtype)
    return out.clone() if out._base is not None else out  # an op's output may not be a view (conv1d's is)


@perturbed.register_fake
def _perturbed_fake(x, weight, bias, scale, seed, shape, kind, params, amp_dtype, layer=-1):
    # the functional op itself on fake tensors gives the output's shape and dtype
    dtype = x.dtype if x.dtype.is_floating_point else torch.float32
    w = x.new_empty(shape, dtype=dtype) if weight is None else weight.new_empty(weight.shape)
    return _functional(kind, x, w, bias, params, amp_dtype)


@torch.library.custom_op("flatlora::perturbed_input_grad", mutates_args=(), **_TAGS)
def perturbed_input_grad(g: torch.Tensor, weight: Optional[torch.Tensor], scale: torch.Tensor, seed: torch.Tensor,
                         shape: list[int], x_shape: list[int], x_dtype: torch.dtype, kind: str,
                         params: list[int]) -> torch.Tensor:
    """``d<g, op(x, (weight or 0) + E)>/dx`` (linear: ``g @ (W + E)``; conv: the transposed convolution), with ``E``
    redrawn from its seed, computed in ``g``'s dtype (as autocast's forward ran) and returned in ``x_dtype``."""
    w = _noisy_weight(weight, scale, seed, shape, g)
    return op_input_grad(kind, g, x_shape, w, params).to(x_dtype)


@perturbed_input_grad.register_fake
def _perturbed_input_grad_fake(g, weight, scale, seed, shape, x_shape, x_dtype, kind, params):
    return g.new_empty(x_shape, dtype=x_dtype)


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, bias, scale, seed, shape, kind, params = inputs[:8]
    # as `PerturbedOp`'s fast path: no activation, only the weight reference and the spec's two tensors
    ctx.save_for_backward(weight, scale, seed)
    ctx.args = (list(shape), list(x.shape), x.dtype, kind, list(params), None if bias is None else bias.dtype)


def _backward(ctx: Any, g: torch.Tensor) -> tuple:
    weight, scale, seed = ctx.saved_tensors
    shape, x_shape, x_dtype, kind, params, bias_dtype = ctx.args
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if need_w:  # perturbed_op_compiled sends trainable weights to PerturbedOp; a direct call must not lose them
        raise RuntimeError("flatlora::perturbed has no gradient for a trainable base weight; "
                           "call perturbed_op_compiled, which routes it through PerturbedOp")
    gx = perturbed_input_grad(g, weight, scale, seed, shape, x_shape, x_dtype, kind, params) if need_x else None
    gb = op_bias_grad(kind, g).to(bias_dtype) if need_b else None
    return gx, None, gb, None, None, None, None, None, None, None


perturbed.register_autograd(_backward, setup_context=_setup_context)
