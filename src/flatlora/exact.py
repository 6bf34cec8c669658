"""Exact perturbation: compute a layer at ``W + E`` without ever writing ``W``.

``PerturbedOp`` is a custom autograd function ``x -> op(x, W + E, b)`` (or ``x -> op(x, E)`` when the noise
is added beside an unchanged layer). Forward draws ``E`` from its `NoiseSpec`; backward draws it again from
the same seed. Between the two only the seed and the fp32 row std are kept: no ``E`` and no copy of ``W``,
so the base weights stay bit-identical whatever their dtype, and the memory cost is the transient ``W + E``
while a single layer runs (on CUDA with Triton written in one pass, `flatlora._triton_noise`; on CPU block
by block, `flatlora.noise`). A spec with ``keep=True`` (opt-in) keeps forward's ``W + E`` for backward instead.

``op`` is the layer's own functional form (`flatlora.ops.Op`): linear (GPT-2 ``Conv1D`` is linear on the
transposed weight), ``convNd`` and embedding. The input gradient has a closed form for the first two (the
frozen-base fast path: one matmul/convolution, like the unperturbed layer); anything else (a trainable base
weight or bias-only training on an unusual layer) recomputes the op under autograd in backward, which costs one
more forward of that layer.

Under ``torch.compile`` the same computation runs as two custom operators (`flatlora._compiled`), called by
`perturbed_op_compiled` with the spec as tensors; it sends the cases they do not cover to `PerturbedOp` outside
the graph (a graph break). `ExactLayer` is one layer's route, installed by `flatlora.core.FlatLora` for a
step: the eager or the compiled op, swapped in for the base layer's forward or added beside the layer
(`flatlora.targets.noise_beside` decides which).
"""

from __future__ import annotations

import itertools
import sys
from typing import Any, Callable

import torch
from torch import nn

from . import _compiled
from .noise import NoiseSpec
from .ops import Op
from .targets import runs_reference, trained_adapters


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


# --- torch.compile: the custom operators of flatlora._compiled, and the eager fallback ----------------------
class _OutsideGraph:
    """``fn`` run outside any ``torch.compile`` graph (a graph break), as ``torch.compiler.disable(fn)`` would.

    Not applied at import: ``torch.compiler.disable`` imports ``torch._dynamo`` (with sympy, and triton where it
    is installed), which doubled the time and added ~140 MiB to ``import flatlora`` for users who never compile.
    `prepare` wraps ``fn`` once ``torch._dynamo`` is loaded (``torch.compile`` loads it); `ExactLayer.begin` calls
    it from eager code at every ``perturb``, so a traced call finds the wrapper ready. A call traced before
    that (``torch.compile`` first used inside a perturbed step) wraps on the spot: the same numbers, one more
    graph break.
    """

    def __init__(self, fn: Callable) -> None:
        self.fn, self.disabled = fn, None

    def prepare(self) -> None:
        if self.disabled is None and "torch._dynamo" in sys.modules:
            self.disabled = torch.compiler.disable(self.fn)

    def __call__(self, *args: Any) -> Any:
        if self.disabled is not None:
            return self.disabled(*args)
        if torch.compiler.is_compiling():
            return torch.compiler.disable(self.fn)(*args)
        return self.fn(*args)


def _perturbed_op_eager_fn(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                           seed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...], op: Op,
                           layer: int) -> torch.Tensor:
    """The cases the custom op does not cover, outside the compiled graph (a graph break)."""
    if layer >= 0:  # runs at every call, as the custom op does: record the layer as it would
        _compiled.ran_layers.add(layer)
    return perturbed_op(x, weight, bias, NoiseSpec(int(seed), scale, tuple(shape)), op)


_perturbed_op_eager = _OutsideGraph(_perturbed_op_eager_fn)


def perturbed_op_compiled(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                          seed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...], op: Op,
                          layer: int = -1) -> torch.Tensor:
    """`perturbed_op` for code that ``torch.compile`` traces, with the spec as tensors.

    ``perturbed_op_compiled(x, w, b, torch.tensor(s.seed), s.scale, s.shape, op)`` computes the same numbers
    as ``perturbed_op(x, w, b, s, op)``, forward and backward. The seed (int64 scalar tensor) and ``scale``
    (``(m,)`` fp32) are graph inputs, so a new step reuses the compiled graph. A trainable base weight, a conv
    without a closed-form input gradient (``padding_mode != "zeros"`` or string padding) or an embedding with
    ``max_norm`` goes through `PerturbedOp` in eager mode (a graph break: correct, slower). ``layer``: the
    calling `ExactLayer`'s ``uid``, recorded in ``flatlora._compiled.ran_layers`` each time the op runs.
    """
    if not op.fits_custom_op(weight):
        return _perturbed_op_eager(x, weight, bias, seed, scale, shape, op, layer)
    dev = x.device.type
    amp_dtype = torch.get_autocast_dtype(dev) if op.kind != "embedding" and torch.is_autocast_enabled(dev) else None
    args = (bias, scale, seed, list(shape), op.kind, op.params(), amp_dtype, layer)
    if op.kind == "linear" and x.dim() > 2:  # fold to 2-D, as perturbed_op does: the view back allows `+=`
        y = _compiled.perturbed(x.reshape(-1, x.shape[-1]), weight, *args)
        return y.view(*x.shape[:-1], y.shape[-1])
    return _compiled.perturbed(x, weight, *args)


# --- one layer's route, installed by FlatLora._apply_exact -----------------------------------------------------
_uids = itertools.count()  # ExactLayer.uid


def _take_spec_fn(layer: "ExactLayer") -> None:
    """Take the step's spec (Python: blake2b seed, merged-weight norms) outside any compiled graph."""
    layer.spec()


_take_spec = _OutsideGraph(_take_spec_fn)


class ExactLayer:
    """One layer's exact-mode route: created once per `FlatLora` and target, installed by every ``perturb(t)``.

    ``forward`` (swapped in for the base layer's) and the ``take_spec``/``add_noise`` hooks (for layers whose
    output is not one base op: noise added beside them) are the same function objects at every step:
    ``torch.compile`` guards on the identity of a swapped forward or hook, and a new closure per step would
    recompile per step. What changes per step is the spec given to `begin`: a callable for eager code, and for
    compiled code its seed and row std as tensors (graph inputs) and its shape (the same every step).

    ``switch``: the LoRA layer whose adapter state is read at every forward (`flatlora.targets.adapter_switch`).
    While its adapters are disabled, or others are active than when the step began (a reference model:
    `flatlora.targets.runs_reference`), the route computes the clean layer: no noise, nothing recorded, no spec
    taken.

    `ran` says whether the layer computed with noise since `begin`: the eager route records it itself, a
    compiled one through the custom op, which runs at every call where the traced Python does not
    (``flatlora._compiled.ran_layers``, keyed by `uid`; a plain set add per call, no device sync).
    """

    def __init__(self, base: nn.Module, op: Op, transposed: bool, switch: nn.Module | None = None) -> None:
        self.op = op
        self.uid = next(_uids)  # unique in the process; a constant of the compiled graph
        self.switch = switch
        self.trained: tuple[str, ...] = ()  # the switch's active adapters when the step began
        self.ready = False  # the step's spec is taken (and seed/scale/shape set)
        self.seed: torch.Tensor | None = None  # int64 scalar: the 63-bit layer seed
        self.scale: torch.Tensor | None = None  # (m,) fp32 row std
        self.shape: tuple[int, ...] = ()
        self._spec_fn: Callable[[], NoiseSpec] | None = None

        def weights() -> tuple[torch.Tensor, torch.Tensor | None]:  # read at call time (FSDP2: all-gathered)
            w = base.weight
            return (w.t() if transposed else w), getattr(base, "bias", None)

        def reference() -> bool:  # read at every forward: the adapters may be switched inside a step
            return runs_reference(switch, self.trained)

        def forward(x: torch.Tensor) -> torch.Tensor:
            if reference():  # the clean layer: its class's own forward (the swap needs a plain one, targets.noise_beside)
                return type(base).forward(base, x)
            w, b = weights()
            if torch.compiler.is_compiling():
                if not self.ready:  # only under FSDP2 or ZeRO-3 (see FlatLora._apply_exact): a graph break
                    _take_spec(self)
                return perturbed_op_compiled(x, w, b, self.seed, self.scale, self.shape, op, self.uid)
            _compiled.ran_layers.add(self.uid)
            return perturbed_op(x, w, b, self.spec(), op)

        def take_spec(module: nn.Module, args: tuple) -> None:  # a pre-hook: the layer's weights are whole here
            if not self.ready and not reference():  # the merged weight is the trained adapters' only
                _take_spec(self)

        def add_noise(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if reference():
                return output
            if torch.compiler.is_compiling():
                noise = perturbed_op_compiled(args[0], None, None, self.seed, self.scale, self.shape, op, self.uid)
            else:
                _compiled.ran_layers.add(self.uid)
                noise = perturbed_op(args[0], None, None, self.spec(), op)
            return output + noise.to(output.dtype)

        self.forward, self.take_spec, self.add_noise = forward, take_spec, add_noise

    def begin(self, spec_fn: Callable[[], NoiseSpec], now: bool) -> None:
        """Route the next forwards through the spec that ``spec_fn()`` gives (computed once per step by the
        caller); ``now``: take it at once rather than at the layer's first forward."""
        self._spec_fn, self.ready = spec_fn, False
        self.trained = trained_adapters(self.switch)
        _compiled.ran_layers.discard(self.uid)
        _take_spec.prepare()  # eager code: ready the graph breaks before any compiled forward traces them
        _perturbed_op_eager.prepare()
        if now:
            self.spec()

    def end(self) -> None:
        self._spec_fn, self.ready, self.seed, self.scale = None, False, None, None
        _compiled.ran_layers.discard(self.uid)

    def ran(self) -> bool:
        """Whether the layer computed with noise since `begin` (read it before `end`)."""
        return self.uid in _compiled.ran_layers

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
