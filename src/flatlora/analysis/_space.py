"""The two weight spaces the diagnostics move in, and exact, scoped evaluation of the loss at an offset.

A point of a space is the model's current weights plus an *offset*: a list of tensors, one per coordinate.

* ``full``: one coordinate per LoRA layer (`flatlora.targets.find_targets`): the merged weight
  ``W = W_base + delta`` (DoRA: its own merged weight) in logical layout ``(out, *fan_in)``. The loss at
  ``W + D`` is computed with a forward hook on the LoRA layer that adds ``op(x, D)`` to the layer's output
  (`flatlora.ops.Op.offset_output`: ``F.linear(x, D)``, the layer's convolution with ``D``, or the lookup
  ``D[x]``): the layer's own output is ``op(x, W, b)`` whatever its implementation (LoRA, DoRA, AdaLoRA, a
  bitsandbytes kernel), and ``op`` is linear in the weight, so the sum is ``op(x, W + D, b)`` exactly. This is
  the core engine's exact mode for DoRA/bitsandbytes layers, used here for every layer: nothing is written,
  removing the hooks restores the model. Because ``D`` enters the graph as an ordinary tensor, autograd gives
  ``dL/dW`` (a zero offset with ``requires_grad``) and, by double backward, Hessian-vector products
  ``d/dD (dL/dD . v)``.
* ``lora``: one coordinate per adapter parameter of those layers (``lora_A``/``lora_B``, AdaLoRA's
  ``lora_E``, DoRA's magnitude; active adapters only). The loss at ``theta + d`` is evaluated with
  ``torch.func.functional_call``, which swaps the module's parameter entries for ``theta + d`` during the
  call and puts the original `Parameter` objects back in a ``finally``: the stored tensors are never written.

The loss of a point is the mean of ``loss_fn(model, batch)`` over the given batches (equal weights).
Vectors are plain lists of tensors; ``dot``/``norm`` reduce in fp32 (fp64 accumulation across tensors).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .._checks import check_batches, check_choice
from ..noise import NoiseSpec
from ..targets import Target, find_targets

LossFn = Callable[[nn.Module, object], torch.Tensor]
Vector = list[torch.Tensor]
SPACES = ("full", "lora")


def check_space(space: str) -> str:
    return check_choice("space", space, {"full": "merged weights", "lora": "adapter parameters"})


# --- vector helpers (lists of tensors) -----------------------------------------------------------------
def dot(a: Vector, b: Vector) -> float:
    """``sum_i <a_i, b_i>``: each term in at least fp32 (fp64 stays fp64), summed exactly across tensors."""
    out = []
    for x, y in zip(a, b):
        dt = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
        out.append(float(torch.sum(x.to(dt) * y.to(dt))))
    return math.fsum(out)


def norm(a: Vector) -> float:
    return math.sqrt(max(dot(a, a), 0.0))


def scale(a: Vector, c: float) -> Vector:
    return [x * c for x in a]


def axpy(c: float, x: Vector, y: Vector) -> Vector:
    """``y + c * x``."""
    return [yi + c * xi for xi, yi in zip(x, y)]


# --- scoped model state ---------------------------------------------------------------------------------
@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the body; every submodule's own ``training`` flag is put back afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    for key in ("x", "input", "hidden_states"):
        if key in kwargs:
            return kwargs[key]
    return next(iter(kwargs.values()))


class Space:
    """A weight space of a PEFT model (see the module docstring): coordinates, their values, and the loss
    at ``current + offset``.

    Args:
        model: a model holding PEFT LoRA layers.
        space: ``"full"`` (merged weights of the LoRA layers) or ``"lora"`` (their adapter parameters).
    """

    def __init__(self, model: nn.Module, space: str = "full") -> None:
        self.model = model
        self.kind = check_space(space)
        self.targets: list[Target] = find_targets(model)  # ValueError for a model without LoRA layers
        if self.kind == "full":
            self.names = [t.name for t in self.targets]
        else:
            self.names, params = [], []
            for target in self.targets:
                for adapter in target.active_adapters():
                    for name, p in target.module.named_parameters():
                        parts = name.split(".")
                        if parts[0].startswith("lora_") and adapter in parts[1:]:
                            self.names.append(f"{target.name}.{name}" if target.name else name)
                            params.append(p)
            if not params:
                raise ValueError("the model's LoRA layers have no active, unmerged adapter parameters; "
                                 "set_adapter(...) / unmerge the adapter before measuring the LoRA space")
            self._params = params
        self._shapes: list[torch.Size] | None = None

    def values(self) -> Vector:
        """Current values of the coordinates (fp32 copies; for row norms and filter normalisation)."""
        if self.kind == "full":
            return [t.merged_weight() for t in self.targets]
        return [p.detach().float().clone() for p in self._params]

    def shapes(self) -> list[torch.Size]:
        if self._shapes is None:
            self._shapes = ([t.merged_weight().shape for t in self.targets] if self.kind == "full"
                            else [p.shape for p in self._params])
        return list(self._shapes)

    def devices(self) -> list[torch.device]:
        if self.kind == "full":
            return [t.base.weight.device for t in self.targets]
        return [p.device for p in self._params]

    def dtypes(self) -> list[torch.dtype]:
        """Dtype of each coordinate's vectors: fp32, or fp64 for fp64 weights (never below fp32)."""
        stored = ([t.base.weight.dtype if t.base.weight.dtype.is_floating_point else torch.float32
                   for t in self.targets] if self.kind == "full" else [p.dtype for p in self._params])
        return [torch.promote_types(d, torch.float32) for d in stored]

    def zeros(self, requires_grad: bool = False) -> Vector:
        """A zero offset (a leaf with ``requires_grad`` to differentiate the loss w.r.t. the space)."""
        return [torch.zeros(s, device=d, dtype=t, requires_grad=requires_grad)
                for s, d, t in zip(self.shapes(), self.devices(), self.dtypes())]

    def loss(self, loss_fn: LossFn, batch: object, offset: Sequence[torch.Tensor | NoiseSpec] | None) -> torch.Tensor:
        """``loss_fn(model, batch)`` at ``current + offset`` (``None``: at the current weights).

        Differentiable w.r.t. the offset tensors. In the full space an offset entry may be a `NoiseSpec`,
        sampled (fp32) when its layer runs, so only one layer's noise exists at a time.
        """
        if offset is None:
            return loss_fn(self.model, batch)
        if len(offset) != len(self.names):
            raise ValueError(f"offset has {len(offset)} tensors, the {self.kind} space has {len(self.names)} "
                             "coordinates")
        if self.kind == "full":
            with self._hooks(offset):
                return loss_fn(self.model, batch)
        wrapper = _LossModule(self.model, loss_fn)
        # theta + d in at least fp32, stored back in the parameter's dtype (theta itself at d = 0)
        params = {"model." + n: (p.detach().to(torch.promote_types(p.dtype, torch.float32)) + d).to(p.dtype)
                  for n, p, d in zip(self.names, self._params, offset)}
        return torch.func.functional_call(wrapper, params, (batch,), strict=False)

    @contextlib.contextmanager
    def _hooks(self, offset: Sequence[torch.Tensor | NoiseSpec]) -> Iterator[None]:
        handles = []
        try:
            for target, d in zip(self.targets, offset):
                def add(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor,
                        target: Target = target, d: torch.Tensor | NoiseSpec = d) -> torch.Tensor:
                    dd = d.sample() if isinstance(d, NoiseSpec) else d
                    return output + target.op.offset_output(_layer_input(args, kwargs), dd).to(output.dtype)

                handles.append(target.module.register_forward_hook(add, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()


class _LossModule(nn.Module):
    """``forward(batch) = loss_fn(model, batch)``, so `torch.func.functional_call` can reparametrise the model
    for a loss function that calls the model itself. Holds the model as a submodule; changes nothing in it."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch: object) -> torch.Tensor:
        return self._loss_fn(self.model, batch)


def _scalar(loss: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
                         f"{'' if not isinstance(loss, torch.Tensor) else ' of shape ' + str(tuple(loss.shape))}"
                         f" ({what})")
    return loss.reshape(())


class Objective:
    """``L(offset) = mean_b loss_fn(model, batch_b)`` in a `Space`: value, gradient and Hessian-vector products.

    Every call runs in eval mode (restored afterwards) and leaves ``.grad`` of the model's parameters alone
    (``torch.autograd.grad`` w.r.t. the offset only).
    """

    def __init__(self, space: Space, loss_fn: LossFn, batches: Sequence, progress: object = None) -> None:
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be a callable loss_fn(model, batch) -> scalar tensor, got {loss_fn!r}")
        self.space = space
        self.loss_fn = loss_fn
        self.batches = check_batches(batches)
        self.progress = progress  # a tqdm bar advanced once per batch evaluated (or None)

    def _tick(self) -> None:
        if self.progress is not None:
            self.progress.update(1)

    def value(self, offset: Sequence[torch.Tensor | NoiseSpec] | None = None) -> float:
        total = 0.0
        with eval_mode(self.space.model), torch.no_grad():
            for batch in self.batches:
                total += float(_scalar(self.space.loss(self.loss_fn, batch, offset), "value"))
                self._tick()
        return total / len(self.batches)

    def value_and_grad(self) -> tuple[float, Vector]:
        """``L`` and ``dL/d(offset)`` at offset 0."""
        n = len(self.batches)
        grad = self.space.zeros()
        total = 0.0
        with eval_mode(self.space.model), torch.enable_grad():
            for batch in self.batches:
                z = self.space.zeros(requires_grad=True)
                loss = _scalar(self.space.loss(self.loss_fn, batch, z), "gradient")
                gs = torch.autograd.grad(loss, z, allow_unused=True)
                grad = [a + (g.to(a.dtype) / n if g is not None else 0) for a, g in zip(grad, gs)]
                total += float(loss.detach())
                self._tick()
        return total / n, grad

    def hvp(self, v: Vector) -> Vector:
        """``H v`` with ``H = d^2 L / d(offset)^2`` at 0, by double backward (no dense Hessian).

        Per batch: ``g = dL_b/dz`` with ``create_graph=True`` at ``z = 0``, then ``d(g . v)/dz = H_b v``.
        """
        n = len(self.batches)
        out = self.space.zeros()
        # the fused CPU/flash attention kernels have no double backward: use SDPA's math kernel here
        with eval_mode(self.space.model), torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
            for batch in self.batches:
                z = self.space.zeros(requires_grad=True)
                loss = _scalar(self.space.loss(self.loss_fn, batch, z), "Hessian-vector product")
                gs = torch.autograd.grad(loss, z, create_graph=True, allow_unused=True)
                pairs = [(g, vi, zi) for g, vi, zi in zip(gs, v, z) if g is not None and g.requires_grad]
                if pairs:
                    gv = sum(torch.sum(g * vi.to(g.dtype)) for g, vi, _ in pairs)
                    hv = torch.autograd.grad(gv, z, allow_unused=True)
                    out = [o + (h.to(o.dtype) / n if h is not None else 0) for o, h in zip(out, hv)]
                self._tick()
        return out

    def hvp_central(self, v: Vector, eps: float) -> Vector:
        """``H v ~ (g(eps v) - g(-eps v)) / (2 eps)``: central differences of exact gradients ``g = dL/d(offset)``.

        Two ordinary backward passes per batch instead of one double backward (about 1.5x cheaper on MiniLM on a
        CPU, where SDPA's math kernel has to be used for double backward); the error is ``O(eps^2)`` (third
        derivatives) plus rounding ``O(u ||g|| / eps)``.
        """
        n = len(self.batches)
        out = self.space.zeros()
        with eval_mode(self.space.model), torch.enable_grad():
            for batch in self.batches:
                gs = []
                for sign in (1.0, -1.0):
                    z = [(sign * eps * vi.detach()).to(zi.dtype).requires_grad_() for vi, zi in zip(v, out)]
                    loss = _scalar(self.space.loss(self.loss_fn, batch, z), "Hessian-vector product")
                    gs.append(torch.autograd.grad(loss, z, allow_unused=True))
                out = [o + ((gp if gp is not None else 0) - (gm if gm is not None else 0)) / (2 * eps * n)
                       for o, gp, gm in zip(out, *gs)]
                self._tick()
        return out


__all__: list[str] = []  # private plumbing of flatlora.analysis
