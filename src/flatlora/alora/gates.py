"""Per-rank gates on ordinary PEFT LoRA layers: the ALoRA super-network.

A gated LoRA layer computes, for its gated adapter,

    y = base(x) + s · B · diag(g) · A · dropout(x)          W = W0 + s · B · diag(g) · A

with ``A (R, n)``, ``B (m, R)``, ``g (R,)`` and ``R`` the adapter's rank in the ``LoraConfig`` (the largest rank
the module may reach). For a ``Conv2d`` LoRA layer ``A`` is PEFT's ``(R, c, kh, kw)`` conv (the base layer's
kernel, stride and padding) and ``B`` its ``(m, R, 1, 1)`` pointwise conv: the same formula with the rank as the
channel dimension (``W = W0 + s · Σ_r g_r · B[:, r] ⊗ A[r]``, ``(m, c, kh, kw)``). ALoRA keeps ``g`` in {0, 1}:
``g_i = 1`` is an *open* rank, ``g_i = 0`` a pruned one or a slot of the reserve. Growing or shrinking a module
flips gates; no tensor is ever resized, so optimizer state, DDP buckets and the parameter list stay valid.

How the gate enters PEFT, without subclassing PEFT's model classes:

* **forward**: a forward hook on ``lora_A[adapter]`` multiplies its output by ``g`` (a non-persistent buffer
  ``rank_gate`` on that ``lora_A`` module) along the rank: the last dim of a linear ``(..., R)`` output, the
  channel dim of a conv ``(N, R, H, W)`` output. Every PEFT path that computes the adapter (``forward``,
  ``_mixed_batch_forward``) calls ``lora_A`` as a module, so every path is gated.
* **merged weight**: the layer's class is switched to `GatedLoraLinear` (`GatedLoraConv2d`), a subclass of
  PEFT's ``lora.Linear`` (``lora.Conv2d``) whose only change is ``get_delta_weight``: PEFT's delta with ``B``
  replaced by ``B · diag(g)`` (``B * g`` over ``B``'s rank dim 1), including PEFT's fp32 product of (b)float16
  factors on the CPU. PEFT's merge/unmerge and ``merge_and_unload`` go through it, and so does Flat-LoRA:
  `flatlora.targets.Target.merged_weight` takes PEFT's ``B @ A`` fast path only for layers using PEFT's own
  ``Linear.get_delta_weight`` (and always calls ``get_delta_weight`` for a conv layer), so the noise of a gated
  layer is scaled from ``W0 + s · B · diag(g) · A``.

The gate is not a parameter (ALoRA's gates are set by the allocator, not trained) and not in the state dict,
so ``save_pretrained`` of a gated model writes the ungated ``R``-rank tensors: export with
`flatlora.alora.export_adapter`, which keeps only the open ranks.

Supported: PEFT ``lora.Linear`` layers (``nn.Linear`` and GPT-2 ``Conv1D`` with ``fan_in_fan_out``) and
``lora.Conv2d`` layers (any kernel, stride and padding; ``groups=1``, as PEFT's merge needs), in any mix, one
gated adapter per layer, no LoRA variant (DoRA & co. compute their own merged weight). Anything else (conv
``groups > 1``, ``lora.Conv1d``/``Conv3d``, embeddings, ...) is a ``ValueError`` naming the layer.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from peft.tuners.lora import layer as _lora_layer
from peft.utils import transpose
from torch import nn

GATE = "rank_gate"  # buffer name on the gated lora_A module


def gated_delta(b: torch.Tensor, a: torch.Tensor, gate: torch.Tensor, scaling: float,
                fan_in_fan_out: bool = False) -> torch.Tensor:
    """``s · B · diag(g) · A`` in the layer's stored layout: ``B (m, R)``, ``A (R, n)``, ``g (R,)`` -> ``(m, n)``
    (``(n, m)`` when ``fan_in_fan_out``, as PEFT stores GPT-2 ``Conv1D``)."""
    return transpose((b * gate.to(b.dtype)) @ a, fan_in_fan_out) * scaling


def gated_conv2d_delta(b: torch.Tensor, a: torch.Tensor, gate: torch.Tensor, scaling: float) -> torch.Tensor:
    """PEFT's ``lora.Conv2d`` delta with ``B · diag(g)`` for ``B``: ``B (m, R, 1, 1)``, ``A (R, c, kh, kw)``,
    ``g (R,)`` -> ``(m, c, kh, kw)``, ``delta[o] = s · Σ_r B[o, r] g_r A[r]``. As PEFT: a matmul for a 1x1 kernel,
    else ``A``'s filters convolved with ``B`` (``B``'s kernel is 1x1, so that is the same sum)."""
    b = b * gate.to(b.dtype).view(1, -1, 1, 1)
    if a.shape[2:4] == (1, 1):
        return (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * scaling
    return F.conv2d(a.transpose(0, 1), b).transpose(0, 1) * scaling


def _as_peft(delta: Callable[..., torch.Tensor], b: torch.Tensor, a: torch.Tensor, gate: torch.Tensor,
             dtype: torch.dtype) -> torch.Tensor:
    """``delta(b, a, gate)`` with PEFT's CPU rule: (b)float16 factors on the CPU are multiplied in fp32 and the
    delta cast back to ``dtype`` (PEFT: slow half-precision matmuls on CPUs)."""
    if b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        return delta(b.float(), a.float(), gate.float()).to(dtype)
    return delta(b, a, gate)


class GatedLoraLinear(_lora_layer.Linear):
    """PEFT's ``lora.Linear`` whose gated adapter's delta is ``s · B · diag(g) · A`` (see the module docstring).

    Instances are made by `attach_gates` (a class switch on an existing layer, no copy); other adapters of
    the layer keep PEFT's delta.
    """

    _gated_adapter: str

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        if adapter != getattr(self, "_gated_adapter", None):
            return super().get_delta_weight(adapter)
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        s, fan_in_fan_out = self.scaling[adapter], self.fan_in_fan_out
        return _as_peft(lambda b_, a_, g_: gated_delta(b_, a_, g_, s, fan_in_fan_out), b, a,
                        getattr(self.lora_A[adapter], GATE), b.dtype)  # PEFT's Linear: B's dtype


class GatedLoraConv2d(_lora_layer.Conv2d):
    """PEFT's ``lora.Conv2d`` whose gated adapter's delta is PEFT's with ``B · diag(g)`` for ``B`` (see the module
    docstring); made by `attach_gates` like `GatedLoraLinear`."""

    _gated_adapter: str

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        if adapter != getattr(self, "_gated_adapter", None):
            return super().get_delta_weight(adapter)
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        s = self.scaling[adapter]
        return _as_peft(lambda b_, a_, g_: gated_conv2d_delta(b_, a_, g_, s), b, a,
                        getattr(self.lora_A[adapter], GATE), a.dtype)  # PEFT's ConvNd: A's dtype


# PEFT's layer class -> its gated class
_GATED = {_lora_layer.Linear: GatedLoraLinear, _lora_layer.Conv2d: GatedLoraConv2d}
_PLAIN = {v: k for k, v in _GATED.items()}


def _gate_last(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of a gated linear ``lora_A``: ``(..., R)`` output times ``g`` (module-level: deepcopy-safe)."""
    return output * getattr(module, GATE).to(output.dtype)


def _gate_channels(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of a gated ``Conv2d`` ``lora_A``: ``([N,] R, H, W)`` output times ``g`` over the channels."""
    return output * getattr(module, GATE).to(output.dtype).view(-1, 1, 1)


def _check_gatable(name: str, module: nn.Module, adapter: str) -> None:
    if type(module) in _PLAIN:
        raise ValueError(f"layer {name!r} is already gated; build ALoRA once per model (or detach_gates first)")
    if type(module) not in _GATED:
        raise ValueError(
            f"layer {name!r} is a {type(module).__name__}; ALoRA gates PEFT lora.Linear (Linear, GPT-2 Conv1D) and "
            "lora.Conv2d layers only: leave the others out of target_modules of the LoraConfig")
    if isinstance(module, _lora_layer.Conv2d) and module.get_base_layer().groups != 1:
        raise ValueError(
            f"layer {name!r} is a Conv2d with groups={module.get_base_layer().groups}; ALoRA gates groups=1 convs "
            "only (PEFT cannot merge grouped conv LoRA): leave it out of target_modules of the LoraConfig")
    if adapter in getattr(module, "lora_variant", {}):
        raise ValueError(f"layer {name!r} uses the LoRA variant {type(module.lora_variant[adapter]).__name__} for "
                         f"adapter {adapter!r} (e.g. DoRA), whose merged weight is not s·B·A; ALoRA needs plain LoRA")


def lora_layers(model: nn.Module, adapter: str = "default") -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every PEFT LoRA layer holding ``adapter``, in ``named_modules`` order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]


def gated_layers(model: nn.Module, adapter: str = "default") -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every layer gated for ``adapter`` (`GatedLoraLinear`, `GatedLoraConv2d`), in
    ``named_modules`` order (fixes their index)."""
    return [(n, m) for n, m in model.named_modules()
            if type(m) in _PLAIN and getattr(m, "_gated_adapter", None) == adapter]


def attach_gates(model: nn.Module, init_rank: int, adapter: str = "default") -> list[str]:
    """Gate every LoRA layer holding ``adapter``: slots ``0..init_rank-1`` open, the rest (up to the layer's
    rank ``R``) the closed reserve. Returns the gated layers' names. The model's outputs are unchanged for
    ``init_rank = R`` and, with PEFT's init (``B = 0``), for any ``init_rank``."""
    if isinstance(init_rank, bool) or not isinstance(init_rank, int) or init_rank < 1:
        raise ValueError(f"init_rank={init_rank!r} must be a positive int: the open ranks per module at the start")
    found = lora_layers(model, adapter)
    if not found:
        raise ValueError(f"the model ({type(model).__name__}) has no PEFT LoRA layer holding adapter {adapter!r}; "
                         "wrap it with peft.get_peft_model(model, LoraConfig(r=R_max, ...)) first")
    for name, module in found:
        _check_gatable(name, module, adapter)
        if init_rank > module.r[adapter]:
            raise ValueError(f"init_rank={init_rank} exceeds the rank r={module.r[adapter]} of layer {name!r}; build "
                             "the LoraConfig with r = the largest rank a module may reach (e.g. 2 * init_rank)")
    for _, module in found:
        lora_a = module.lora_A[adapter]
        gate = torch.zeros(module.r[adapter], dtype=torch.float32, device=lora_a.weight.device)
        gate[:init_rank] = 1.0
        lora_a.register_buffer(GATE, gate, persistent=False)
        conv = isinstance(module, _lora_layer.Conv2d)
        lora_a._rank_gate_hook = lora_a.register_forward_hook(_gate_channels if conv else _gate_last)
        module.__class__ = _GATED[type(module)]
        module._gated_adapter = adapter
    return [name for name, _ in found]


def detach_gates(model: nn.Module, adapter: str = "default") -> None:
    """Undo `attach_gates` (the gates are dropped: closed ranks act again). For tests and re-use of a model."""
    for _, module in gated_layers(model, adapter):
        lora_a = module.lora_A[adapter]
        lora_a._rank_gate_hook.remove()
        del lora_a._rank_gate_hook
        del lora_a._buffers[GATE]
        module.__class__ = _PLAIN[type(module)]
        del module._gated_adapter


def gate_of(module: nn.Module) -> torch.Tensor:
    """The layer's live gate ``(R,)`` (fp32; writing it changes the layer)."""
    return getattr(module.lora_A[module._gated_adapter], GATE)


def active_ranks(model: nn.Module, adapter: str = "default") -> dict[str, int]:
    """Open ranks (non-zero gates) per gated layer."""
    return {name: int((gate_of(m) != 0).sum()) for name, m in gated_layers(model, adapter)}


__all__ = ["GATE", "GatedLoraConv2d", "GatedLoraLinear", "active_ranks", "attach_gates", "detach_gates", "gate_of",
           "gated_conv2d_delta", "gated_delta", "gated_layers", "lora_layers"]
