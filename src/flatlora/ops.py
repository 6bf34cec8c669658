"""A base layer as its functional form ``y = op(x, W, b)``, and whether noise can go through it.

Every weight here is in logical layout ``(m, *fan_in)`` (row ``i`` = output filter ``i``, see
`flatlora.targets`). Three kinds of layer:

* ``linear``: ``F.linear(x, W, b)`` (``nn.Linear``, and GPT-2's ``Conv1D`` on its transposed weight);
* ``conv``: the layer's own ``_conv_forward(x, W, b)`` (``nn.Conv1d/2d/3d``: stride, padding, dilation, groups
  and ``padding_mode`` read from the module);
* ``embedding``: ``F.embedding(x, W, ...)``, ``x`` integer ids.

Each is linear in ``W``: ``op(x, W + E, b) = op(x, W, b) + op(x, E)``. That is what lets the exact mode add the
noise term beside a layer it cannot swap (`flatlora.targets.noise_beside`) and the diagnostics move a layer's weight by an
offset ``D`` with a hook adding ``op(x, D)`` (`Op.offset_output`). The same dispatch written with ints instead of
a module (`apply_op`, `op_input_grad`, `op_bias_grad`) serves the ``torch.compile`` custom operators
(`flatlora._compiled`), which cannot take a module as an argument.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_INPUT_GRAD = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}
_PLAIN_FORWARDS = (nn.Linear.forward, nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.Embedding.forward)


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

    def offset_output(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """``op(x, D)``: what an offset ``D`` of the weight (logical layout) adds to the layer's output.

        ``D`` is cast to ``x``'s dtype for linear and conv. The embedding lookup is plain ``D[x]`` (no
        ``padding_idx``, no ``max_norm``): its derivative w.r.t. ``D`` is the true one at every row, padding
        row included, and ``D`` is never renormalised in place.
        """
        if self.kind == "embedding":
            return F.embedding(x, d)
        return self(x, d.to(x.dtype), None)

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
        in place). Anything else takes `flatlora.exact.PerturbedOp`."""
        if weight is not None and weight.requires_grad:
            return False
        if self.kind == "embedding":
            return self.module.max_norm is None
        return self.has_closed_form_input_grad()

    def has_closed_form_input_grad(self) -> bool:
        """Linear, and conv with zero padding given as ints (what `params` can express)."""
        if self.kind == "linear":
            return True
        if self.kind == "conv":
            m = self.module
            return m.padding_mode == "zeros" and not isinstance(m.padding, str)
        return False

    def input_grad(self, g: torch.Tensor, x_shape: torch.Size, w: torch.Tensor) -> torch.Tensor:
        """``d<g, op(x, w)>/dx`` (only where `has_closed_form_input_grad`), in ``g``'s dtype."""
        return op_input_grad(self.kind, g, list(x_shape), w, self.params())

    def bias_grad(self, g: torch.Tensor) -> torch.Tensor:
        return op_bias_grad(self.kind, g)


# --- the same dispatch from ints (for the torch.compile custom operators) -------------------------------------
def apply_op(kind: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, params: list[int]) -> torch.Tensor:
    """``op(x, w, b)`` from `Op.kind` and `Op.params`: zero-padded conv, linear, or the plain embedding lookup
    (the custom op's cases, `Op.fits_custom_op`)."""
    if kind == "linear":
        return F.linear(x, w, b)
    if kind == "conv":
        d = w.dim() - 2
        return _CONV_FN[d](x, w, b, params[:d], params[d:2 * d], params[2 * d:3 * d], params[3 * d])
    return F.embedding(x, w)


def op_input_grad(kind: str, g: torch.Tensor, x_shape: list[int], w: torch.Tensor, params: list[int]) -> torch.Tensor:
    """``d<g, op(x, w)>/dx`` for linear (``g @ w``) and conv (the transposed convolution), computed in ``g``'s
    dtype (as autocast's forward ran)."""
    w = w.to(g.dtype)
    if kind == "linear":
        return g.matmul(w)
    d = w.dim() - 2
    return _CONV_INPUT_GRAD[d](x_shape, w, g, params[:d], params[d:2 * d], params[2 * d:3 * d], params[3 * d])


def op_bias_grad(kind: str, g: torch.Tensor) -> torch.Tensor:
    """``d<g, op(x, w, b)>/db``: ``g`` summed over every dim but the channel (conv: dim 1; linear: the last)."""
    if kind == "conv":
        return g.sum(dim=[d for d in range(g.dim()) if d != 1])
    return g.reshape(-1, g.shape[-1]).sum(0)


# --- how the exact mode routes a layer through the op ---------------------------------------------------------
def plain_forward(base: nn.Module) -> bool:
    """Whether the layer's class computes exactly ``op(x, W, b)``: torch's own Linear/ConvNd/Embedding forward,
    or GPT-2's Conv1D; a subclass overriding forward (e.g. an embedding that scales its output) is not."""
    return type(base).__name__ == "Conv1D" or type(base).forward in _PLAIN_FORWARDS
