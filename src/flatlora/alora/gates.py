"""Per-rank gates on ordinary PEFT LoRA layers: the ALoRA super-network.

A gated LoRA layer computes, for its gated adapter,

    y = base(x) + s · B · diag(g) · A · dropout(x)          W = W0 + s · B · diag(g) · A

with ``A (R, n)``, ``B (m, R)``, ``g (R,)`` and ``R`` the adapter's rank in the ``LoraConfig`` (the largest rank
the module may reach). ALoRA keeps ``g`` in {0, 1}: ``g_i = 1`` is an *open* rank, ``g_i = 0`` a pruned one or a
slot of the reserve. Growing or shrinking a module flips gates; no tensor is ever resized, so optimizer state,
DDP buckets and the parameter list stay valid.

How the gate enters PEFT, without subclassing PEFT's model classes:

* **forward**: a forward hook on ``lora_A[adapter]`` multiplies its ``(..., R)`` output by ``g`` (a
  non-persistent buffer ``rank_gate`` on that ``lora_A`` module). Every PEFT path that computes the adapter
  (``forward``, ``_mixed_batch_forward``) calls ``lora_A`` as a module, so every path is gated.
* **merged weight**: the layer's class is switched to `GatedLoraLinear`, a subclass of PEFT's ``lora.Linear``
  whose only change is ``get_delta_weight``: ``s · B · diag(g) · A``. PEFT's merge/unmerge and
  ``merge_and_unload`` go through it, and so does Flat-LoRA: `flatlora.targets.Target.merged_weight` takes
  PEFT's ``B @ A`` fast path only for layers using PEFT's own ``Linear.get_delta_weight``, so the noise of a
  gated layer is scaled from ``W0 + s · B · diag(g) · A``.

The gate is not a parameter (ALoRA's gates are set by the allocator, not trained) and not in the state dict,
so ``save_pretrained`` of a gated model writes the ungated ``R``-rank tensors: export with
`flatlora.alora.export_adapter`, which keeps only the open ranks.

Supported: PEFT ``lora.Linear`` layers (``nn.Linear`` and GPT-2 ``Conv1D`` with ``fan_in_fan_out``), one gated
adapter per layer, no LoRA variant (DoRA & co. compute their own merged weight). Anything else is a
``ValueError`` naming the layer.
"""

from __future__ import annotations

import torch
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
        gate = getattr(self.lora_A[adapter], GATE)
        if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16):  # as PEFT: fp32 on CPU
            return gated_delta(b.float(), a.float(), gate.float(), self.scaling[adapter],
                               self.fan_in_fan_out).to(a.dtype)
        return gated_delta(b, a, gate, self.scaling[adapter], self.fan_in_fan_out)


def _gate_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of a gated ``lora_A``: ``(..., R)`` output times ``g`` (module-level: deepcopy-safe)."""
    return output * getattr(module, GATE).to(output.dtype)


def _check_gatable(name: str, module: nn.Module, adapter: str) -> None:
    if type(module) is GatedLoraLinear:
        raise ValueError(f"layer {name!r} is already gated; build ALoRA once per model (or detach_gates first)")
    if type(module) is not _lora_layer.Linear:
        raise ValueError(
            f"layer {name!r} is a {type(module).__name__}; ALoRA gates PEFT lora.Linear layers only (Linear, GPT-2 "
            "Conv1D): leave the others out of target_modules of the LoraConfig")
    if adapter in getattr(module, "lora_variant", {}):
        raise ValueError(f"layer {name!r} uses the LoRA variant {type(module.lora_variant[adapter]).__name__} for "
                         f"adapter {adapter!r} (e.g. DoRA), whose merged weight is not s·B·A; ALoRA needs plain LoRA")


def lora_layers(model: nn.Module, adapter: str = "default") -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every PEFT LoRA layer holding ``adapter``, in ``named_modules`` order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]


def gated_layers(model: nn.Module, adapter: str = "default") -> list[tuple[str, GatedLoraLinear]]:
    """``(name, layer)`` of every layer gated for ``adapter``, in ``named_modules`` order (fixes their index)."""
    return [(n, m) for n, m in model.named_modules()
            if type(m) is GatedLoraLinear and getattr(m, "_gated_adapter", None) == adapter]


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
        lora_a._rank_gate_hook = lora_a.register_forward_hook(_gate_output)
        module.__class__ = GatedLoraLinear
        module._gated_adapter = adapter
    return [name for name, _ in found]


def detach_gates(model: nn.Module, adapter: str = "default") -> None:
    """Undo `attach_gates` (the gates are dropped: closed ranks act again). For tests and re-use of a model."""
    for _, module in gated_layers(model, adapter):
        lora_a = module.lora_A[adapter]
        lora_a._rank_gate_hook.remove()
        del lora_a._rank_gate_hook
        del lora_a._buffers[GATE]
        module.__class__ = _lora_layer.Linear
        del module._gated_adapter


def gate_of(module: GatedLoraLinear) -> torch.Tensor:
    """The layer's live gate ``(R,)`` (fp32; writing it changes the layer)."""
    return getattr(module.lora_A[module._gated_adapter], GATE)


def active_ranks(model: nn.Module, adapter: str = "default") -> dict[str, int]:
    """Open ranks (non-zero gates) per gated layer."""
    return {name: int((gate_of(m) != 0).sum()) for name, m in gated_layers(model, adapter)}


__all__ = ["GATE", "GatedLoraLinear", "active_ranks", "attach_gates", "detach_gates", "gate_of", "gated_delta",
           "gated_layers", "lora_layers"]
