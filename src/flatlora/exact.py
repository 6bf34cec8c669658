"""Exact perturbation: compute a layer at ``W + E`` without ever writing ``W``.

``PerturbedOp`` is a custom autograd function ``x -> op(x, W + E, b)`` (or ``x -> op(x, E)`` when the noise
is added beside an unchanged layer). Forward draws ``E`` from its `NoiseSpec`; backward draws it again from
the same seed. Between the two only the seed and the fp32 row std are kept: no ``E`` and no copy of ``W``,
so the base weights stay bit-identical whatever their dtype, and the memory cost is the transient ``W + E``
while a single layer runs (on CUDA with Triton written in one pass, `flatlora._triton_noise`; on CPU block
by block, `flatlora.noise`). A spec with ``keep=True`` (opt-in) keeps forward's ``W + E`` for backward instead.

``op`` is the layer's own functional form (``Op``): linear (GPT-2 ``Conv1D`` is linear on the transposed
weight), ``convNd`` and embedding. The input gradient has a closed form for the first two (the frozen-base
fast path: one matmul/convolution, like the unperturbed layer); anything else (a trainable base weight or
bias-only training on an unusual layer) recomputes the op under autograd in backward, which costs one more
forward of that layer.

Under ``torch.compile`` the same computation runs as two custom operators, ``flatlora::perturbed`` and
``flatlora::perturbed_input_grad`` (`perturbed_op_compiled`): Dynamo cannot trace the seeded draws (Python
hashing, private ``torch.Generator``s), so each is one opaque node with a fake implementation for shapes and
a registered autograd formula; the seed travels as an int64 tensor, so a new seed every step is new data for
the same graph, not a new graph. They cover the frozen-base fast path; the rest falls back to `PerturbedOp`
outside the graph (a graph break).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .noise import NoiseSpec, add_filter_noise, filter_noise

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

    def params(self) -> list[int]:
        """The conv hyper-parameters as ints for the custom op: ``stride + padding + dilation + [groups]``
        (``d`` each for a ``d``-dim conv); empty for linear and embedding (whose forward needs none: an
        embedding's ``padding_idx`` only shapes its weight gradient, which the custom op never computes)."""
        if self.kind != "conv":
            return []
        m = self.module
        return [*m.stride, *m.padding, *m.dilation, m.groups]

    def fits_custom_op(self, weight: torch.Tensor | None) -> bool:
        """Whether the custom op computes this call: the frozen-base fast path (its backward is the closed-form
        input gradient), and embeddings with a frozen weight and no ``max_norm`` (which renormalises the weight
        in place). Anything else takes `PerturbedOp`."""
        if weight is not None and weight.requires_grad:
            return False
        if self.kind == "embedding":
            return self.module.max_norm is None
        return self.has_closed_form_input_grad()

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
        return _bias_grad(self.kind, g)


def _bias_grad(kind: str, g: torch.Tensor) -> torch.Tensor:
    """``d<g, op(x, w, b)>/db``: ``g`` summed over every dim but the channel (conv: dim 1; linear: the last)."""
    if kind == "conv":
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
        # the fast path needs no activation; the generic one recomputes op(x, ...) and needs x. With spec.keep,
        # W + E itself is kept for backward (one draw instead of two, one weight-sized tensor held meanwhile)
        ctx.save_for_backward(weight, bias, None if ctx.fast else x, w if spec.keep else None)
        out = op(x, w, bias)
        # F.linear with a bias returns a view for inputs of 3+ dims, and autograd forbids in-place updates of a
        # custom Function's view outputs, which PEFT layers do (AdaLoRA: ``result += ...``): hand out a copy
        # (`perturbed_op` folds linear inputs to 2-D first, so this copy is the exception).
        return out.clone() if out._base is not None else out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        weight, bias, x, kept = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        ref = x if x is not None else g
        w = kept if kept is not None else _effective_weight(weight, ctx.spec, ref if weight is None else weight)
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


# --- torch.compile: the same computation as custom operators ---------------------------------------------------
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _noisy_weight(weight: torch.Tensor | None, scale: torch.Tensor, seed: torch.Tensor, shape: list[int],
                  like: torch.Tensor) -> torch.Tensor:
    """`_effective_weight` with the spec as tensors: ``weight + E`` in the weight's dtype, or ``E`` in ``like``'s
    floating dtype (fp32 for integer ids). The seed is read back as a Python int here, inside the op."""
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
    x, w, b = _amp_cast(x, amp_dtype), _amp_cast(w, amp_dtype), _amp_cast(b, amp_dtype)
    if kind == "linear":
        return F.linear(x, w, b)
    if kind == "conv":
        d = w.dim() - 2
        return _CONV_FN[d](x, w, b, params[:d], params[d:2 * d], params[2 * d:3 * d], params[3 * d])
    return F.embedding(x, w)


@torch.library.custom_op("flatlora::perturbed", mutates_args=())
def _perturbed(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], scale: torch.Tensor,
               seed: torch.Tensor, shape: list[int], kind: str, params: list[int],
               amp_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """``op(x, (weight or 0) + E, bias)``: `PerturbedOp`'s forward with ``E`` drawn from (``seed``, ``scale``).

    ``seed``: int64 scalar tensor (the 63-bit layer seed); ``scale``: ``(m,)`` fp32 row std; ``shape``: the
    logical weight shape; ``kind``/``params``: `Op.kind`/`Op.params`; ``amp_dtype``: autocast dtype or None.
    """
    out = _functional(kind, x, _noisy_weight(weight, scale, seed, shape, x), bias, params, amp_dtype)
    return out.clone() if out._base is not None else out  # an op's output may not be a view (conv1d's is)


@_perturbed.register_fake
def _perturbed_fake(x, weight, bias, scale, seed, shape, kind, params, amp_dtype):
    # the functional op itself on fake tensors gives the output's shape and dtype
    dtype = x.dtype if x.dtype.is_floating_point else torch.float32
    w = x.new_empty(shape, dtype=dtype) if weight is None else weight.new_empty(weight.shape)
    return _functional(kind, x, w, bias, params, amp_dtype)


@torch.library.custom_op("flatlora::perturbed_input_grad", mutates_args=())
def _perturbed_input_grad(g: torch.Tensor, weight: Optional[torch.Tensor], scale: torch.Tensor, seed: torch.Tensor,
                          shape: list[int], x_shape: list[int], x_dtype: torch.dtype, kind: str,
                          params: list[int]) -> torch.Tensor:
    """``d<g, op(x, (weight or 0) + E)>/dx`` (linear: ``g @ (W + E)``; conv: the transposed convolution), with ``E``
    redrawn from its seed, computed in ``g``'s dtype (as autocast's forward ran) and returned in ``x_dtype``."""
    w = _noisy_weight(weight, scale, seed, shape, g).to(g.dtype)
    if kind == "linear":
        gx = g.matmul(w)
    else:
        d = w.dim() - 2
        gx = _CONV_INPUT_GRAD[d](x_shape, w, g, params[:d], params[d:2 * d], params[2 * d:3 * d], params[3 * d])
    return gx.to(x_dtype)


@_perturbed_input_grad.register_fake
def _perturbed_input_grad_fake(g, weight, scale, seed, shape, x_shape, x_dtype, kind, params):
    return g.new_empty(x_shape, dtype=x_dtype)


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, bias, scale, seed, shape, kind, params, _ = inputs
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
    gx = _perturbed_input_grad(g, weight, scale, seed, shape, x_shape, x_dtype, kind, params) if need_x else None
    gb = _bias_grad(kind, g).to(bias_dtype) if need_b else None
    return gx, None, gb, None, None, None, None, None, None


_perturbed.register_autograd(_backward, setup_context=_setup_context)


@torch.compiler.disable
def _perturbed_op_eager(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                        seed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...], op: Op) -> torch.Tensor:
    """The cases the custom op does not cover, outside the compiled graph (a graph break)."""
    return perturbed_op(x, weight, bias, NoiseSpec(int(seed), scale, tuple(shape)), op)


def perturbed_op_compiled(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                          seed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...], op: Op) -> torch.Tensor:
    """`perturbed_op` for code that ``torch.compile`` traces, with the spec as tensors.

    ``perturbed_op_compiled(x, w, b, torch.tensor(s.seed), s.scale, s.shape, op)`` computes the same numbers
    as ``perturbed_op(x, w, b, s, op)``, forward and backward. The seed (int64 scalar tensor) and ``scale``
    (``(m,)`` fp32) are graph inputs, so a new step reuses the compiled graph. A trainable base weight, a conv
    without a closed-form input gradient (``padding_mode != "zeros"`` or string padding) or an embedding with
    ``max_norm`` goes through `PerturbedOp` in eager mode (a graph break: correct, slower).
    """
    if not op.fits_custom_op(weight):
        return _perturbed_op_eager(x, weight, bias, seed, scale, shape, op)
    dev = x.device.type
    amp_dtype = torch.get_autocast_dtype(dev) if op.kind != "embedding" and torch.is_autocast_enabled(dev) else None
    args = (bias, scale, seed, list(shape), op.kind, op.params(), amp_dtype)
    if op.kind == "linear" and x.dim() > 2:  # fold to 2-D, as perturbed_op does: the view back allows `+=`
        y = _perturbed(x.reshape(-1, x.shape[-1]), weight, *args)
        return y.view(*x.shape[:-1], y.shape[-1])
    return _perturbed(x, weight, *args)


# --- one layer's route, installed by FlatLora._apply_exact -----------------------------------------------------
@torch.compiler.disable
def _take_spec(layer: "ExactLayer") -> None:
    """Take the step's spec (Python: blake2b seed, merged-weight norms) outside any compiled graph."""
    layer.spec()


class ExactLayer:
    """One layer's exact-mode route: created once per `FlatLora` and target, installed by every ``perturb(t)``.

    ``forward`` (swapped in for the base layer's) and the ``take_spec``/``add_noise`` hooks (for layers whose
    output is not one base op: noise added beside them) are the same function objects at every step:
    ``torch.compile`` guards on the identity of a swapped forward or hook, and a new closure per step would
    recompile per step. What changes per step is the spec given to `begin`: a callable for eager code, and for
    compiled code its seed and row std as tensors (graph inputs) and its shape (the same every step).
    """

    def __init__(self, base: nn.Module, op: Op, transposed: bool) -> None:
        self.op = op
        self.ready = False  # the step's spec is taken (and seed/scale/shape set)
        self.seed: torch.Tensor | None = None  # int64 scalar: the 63-bit layer seed
        self.scale: torch.Tensor | None = None  # (m,) fp32 row std
        self.shape: tuple[int, ...] = ()
        self._spec_fn: Callable[[], NoiseSpec] | None = None

        def weights() -> tuple[torch.Tensor, torch.Tensor | None]:  # read at call time (FSDP2: all-gathered)
            w = base.weight
            return (w.t() if transposed else w), getattr(base, "bias", None)

        def forward(x: torch.Tensor) -> torch.Tensor:
            w, b = weights()
            if torch.compiler.is_compiling():
                if not self.ready:  # only under FSDP2 (see FlatLora._apply_exact): a graph break
                    _take_spec(self)
                return perturbed_op_compiled(x, w, b, self.seed, self.scale, self.shape, op)
            return perturbed_op(x, w, b, self.spec(), op)

        def take_spec(module: nn.Module, args: tuple) -> None:  # a pre-hook: the layer's weights are whole here
            if not self.ready:
                _take_spec(self)

        def add_noise(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if torch.compiler.is_compiling():
                noise = perturbed_op_compiled(args[0], None, None, self.seed, self.scale, self.shape, op)
            else:
                noise = perturbed_op(args[0], None, None, self.spec(), op)
            return output + noise.to(output.dtype)

        self.forward, self.take_spec, self.add_noise = forward, take_spec, add_noise

    def begin(self, spec_fn: Callable[[], NoiseSpec], now: bool) -> None:
        """Route the next forwards through the spec that ``spec_fn()`` gives (computed once per step by the
        caller); ``now``: take it at once rather than at the layer's first forward."""
        self._spec_fn, self.ready = spec_fn, False
        if now:
            self.spec()

    def end(self) -> None:
        self._spec_fn, self.ready, self.seed, self.scale = None, False, None, None

    def spec(self) -> NoiseSpec:
        """The step's `NoiseSpec`; the first call of a step also sets its tensor form for compiled code."""
        if self._spec_fn is None:  # a forward reached a route that restore() has already removed
            raise RuntimeError("this layer's Flat-LoRA noise was already removed (restore() ran), but its perturbed "
                               "forward was still called; keep forwards of a step inside perturbed(t)")
        spec = self._spec_fn()
        if not self.ready:
            self.seed = torch.tensor(spec.seed, dtype=torch.int64)
            self.scale, self.shape, self.ready = spec.scale, tuple(spec.shape), True
        return spec
