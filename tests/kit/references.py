"""Independent references: what Flat-LoRA must reproduce, computed without any flatlora code.

The tests compare the library against these, so they must not share its code paths (a shared bug would pass):

* the noise schedule ``sigma_t = rho (1 - cos(pi t / T)) / 2`` and the closed-form row std
  ``sigma_t * ||W[i, :]|| / sqrt(n)`` (n = fan-in), written out here;
* the true merged weight: PEFT's own ``merge_and_unload`` on a deep copy (``merged_by_peft``), or
  ``W_base + (alpha / r) B A`` in float64 from the raw tensors (``merged_by_hand``); quantized bases get theirs
  from bitsandbytes' own dequantization (tests/variants/test_bnb.py);
* the model at ``W + E`` for a materialised ``E``, on a deep copy: either ``W_base + E`` written into the base
  weights (``with_base_at``; LoRA variants whose output is ``base(x) + adapter(x)``), or a plain forward hook
  adding ``op(x, E)`` to the layer output (``with_output_plus``; DoRA and quantized bases, whose output is
  not one base matmul).
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

PREFIX = "base_model.model."


def cosine_sigma(t: int, total: int, rho: float) -> float:
    return rho * (1 - math.cos(math.pi * t / total)) / 2


def logical(module: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """GPT-2 Conv1D stores ``(in, out)``; everything else stores rows (output filters) first."""
    return w.t() if type(module).__name__ == "Conv1D" else w


def row_std(w: torch.Tensor, sigma: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``sigma * ||W[i, :]|| / sqrt(n)`` for a logical ``(m, *fan_in)`` weight, computed in float64 and returned
    in ``dtype``."""
    flat = w.reshape(w.shape[0], -1).double()
    return (sigma * flat.norm(dim=1) / math.sqrt(flat.shape[1])).to(dtype)


def fitted_row_std(e: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Least-squares ``s`` with ``E[i, :] = s_i z[i, :]`` and the relative residual of that fit."""
    e, z = e.double(), z.double()
    s = (e * z).sum(1) / (z * z).sum(1)
    resid = (e - s[:, None] * z).norm() / e.norm()
    return s, float(resid)


# --- merged weights -------------------------------------------------------------------------------------------
def merged_by_peft(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The logical fp32 weight of each named layer after PEFT's ``merge_and_unload`` on a deep copy."""
    ref = copy.deepcopy(model)
    unloaded = ref.merge_and_unload() if hasattr(ref, "merge_and_unload") else ref.base_model.merge_and_unload()
    modules = dict(unloaded.named_modules())
    out = {}
    for name in names:
        m = modules[name.removeprefix(PREFIX)]
        out[name] = logical(m, m.weight.detach()).float().clone()
    return out


def merged_by_hand(layer: nn.Module) -> torch.Tensor:
    """``W_base + (alpha / r) B A`` of a plain LoRA layer, in float64 from the raw tensors (no PEFT code)."""
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    delta = b.detach().double() @ a.detach().double()
    return layer.base_layer.weight.detach().double() + layer.scaling["default"] * delta


# --- the model at W + E ---------------------------------------------------------------------------------------
def with_base_at(model: nn.Module, noise: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy whose base weights hold ``W_base + E`` (``noise`` maps layer names to E in logical layout;
    the sum is taken in fp32 and stored in the weight's dtype)."""
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for name, e in noise.items():
            layer = modules[name]
            base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
            w = base.weight
            w.copy_((w.float() + logical(base, e)).to(w.dtype))
    return ref


def _op_of(base: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if isinstance(base, nn.Embedding):
        return lambda x, e: F.embedding(x, e)
    if isinstance(base, nn.Conv2d):
        return lambda x, e: F.conv2d(x, e, None, base.stride, base.padding, base.dilation, base.groups)
    return lambda x, e: F.linear(x, e)  # Linear, bitsandbytes Linear4bit/8bitLt, Conv1D (E is logical)


def with_output_plus(model: nn.Module, noise: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy where each named layer's output gets ``+ op(x, E)``: the layer computed at ``W + E``."""
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    for name, e in noise.items():
        layer = modules[name]
        op = _op_of(layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer)

        def hook(module, args, output, e=e, op=op):
            return output + op(args[0], e.to(output.dtype))

        layer.register_forward_hook(hook)
    return ref
