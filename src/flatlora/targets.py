"""Which layers Flat-LoRA perturbs, and their merged weights.

A target is a PEFT LoRA layer (``peft.tuners.lora.LoraLayer``, which AdaLoRA's layers also are) or, when
``target_modules`` asks for it, a plain ``nn.Linear``/``ConvNd``/``nn.Embedding``/GPT-2 ``Conv1D`` outside any
LoRA layer. Every weight is handled in its *logical* layout ``(out, *fan_in)``: row ``i`` is output filter
``i``. GPT-2's ``Conv1D`` (and ``fan_in_fan_out`` LoRA layers) store ``(in, out)``; their logical weight is the
transposed view. An embedding's rows are its token vectors.

The merged weight is what the layer actually computes with:

    W = W_base + sum over active, unmerged adapters of get_delta_weight(adapter)     (LoRA, rsLoRA, AdaLoRA)
    W = m / ||W_base + delta||_row * (W_base + delta)                                (DoRA)

``W_base`` already contains merged adapters and the rewrites of PiSSA/OLoRA/LoRA-GA initialisations, and is
dequantized for bitsandbytes layers (in either of their CPU layouts, see `flatlora._quantized`).
"""

from __future__ import annotations

import re
import sys
import warnings
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from ._quantized import dequantize, fuses_noise, is_quantized
from .ops import Op, plain_forward

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _is_gpt2_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(getattr(m, "weight", None), torch.Tensor)


def _stock_linear_deltas() -> frozenset:
    """PEFT's ``get_delta_weight`` implementations that return ``transpose(B @ A, fan_in_fan_out) * scaling``:
    LoRA's ``Linear`` and, once PEFT has loaded its bitsandbytes layers, their 8-bit and 4-bit versions.

    ``peft.tuners.lora.bnb`` imports bitsandbytes at module level, and bitsandbytes is optional: it is read from
    ``sys.modules``, never imported here. A model holding a bitsandbytes LoRA layer has loaded it already
    (PEFT's dispatcher imports it to build the layer), so no such layer can be missed.
    """
    from peft.tuners.lora import layer

    bnb = sys.modules.get("peft.tuners.lora.bnb")
    classes = [layer.Linear] + [getattr(bnb, n) for n in ("Linear8bitLt", "Linear4bit") if hasattr(bnb, n)]
    return frozenset(c.get_delta_weight for c in classes)


def _lora_layer_types() -> tuple[type, ...]:
    from peft.tuners.lora import LoraLayer

    return (LoraLayer,)


def _kind(base: nn.Module) -> str | None:
    if isinstance(base, nn.Linear) or _is_gpt2_conv1d(base):
        return "linear"
    if isinstance(base, _CONV):
        return "conv"
    if isinstance(base, nn.Embedding):
        return "embedding"
    return None


def _own_adapters(m: nn.Module) -> set[str]:
    """Adapter names a LoRA layer holds (linear/conv ``lora_A``, embedding ``lora_embedding_A``)."""
    return set(getattr(m, "lora_A", {})) | set(getattr(m, "lora_embedding_A", {}))


def _holds_active_adapter(m: nn.Module) -> bool:
    own = _own_adapters(m)
    return any(a in own for a in m.active_adapters)


def _is_dora(module: nn.Module, adapter: str) -> bool:
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if variant is not None:
        return type(variant).__name__.lstrip("_").startswith("Dora")
    return bool(getattr(module, "use_dora", {}).get(adapter, False))


@dataclass(frozen=True)
class Target:
    """One perturbed layer. ``module`` is the LoRA layer (or the plain layer); ``base`` holds ``W_base``."""

    name: str
    index: int
    module: nn.Module
    base: nn.Module
    kind: str
    transposed: bool

    @property
    def is_lora(self) -> bool:
        return self.module is not self.base

    @property
    def op(self) -> Op:
        return Op(self.kind, self.base)

    @property
    def quantized(self) -> bool:
        return is_quantized(self.base)

    def logical(self, w: torch.Tensor) -> torch.Tensor:
        """Stored layout -> logical ``(out, *fan_in)`` layout (a view)."""
        return w.t() if self.transposed else w

    def base_weight(self) -> torch.Tensor:
        """``W_base`` in logical layout: a view of the parameter, or a dequantized copy."""
        if self.quantized:
            return self.logical(dequantize(self.base)).detach()
        return self.logical(self.base.weight)

    def active_adapters(self) -> list[str]:
        """Adapters of this layer that add to its output now: active, not merged, adapters enabled."""
        m = self.module
        if not self.is_lora or getattr(m, "disable_adapters", False):
            return []
        own, merged = _own_adapters(m), set(getattr(m, "merged_adapters", []))
        return [a for a in m.active_adapters if a in own and a not in merged]

    def in_use(self) -> bool:
        """Whether the layer is perturbed in the coming step: a plain (opted-in) layer always; a LoRA layer when
        one of the model's active adapters lives on it (merged or not). A layer holding only inactive adapters
        computes like a layer LoRA does not target, so it stays clean: training one adapter sees the same noise
        whatever others exist. Adapters disabled or switched within a step (a reference model) are decided at
        each forward (`runs_reference`), not here."""
        return not self.is_lora or _holds_active_adapter(self.module)

    def dora_adapter(self) -> str | None:
        """The active DoRA adapter, if any (then the merged weight is DoRA's own)."""
        adapters = self.active_adapters()
        dora = [a for a in adapters if _is_dora(self.module, a)]
        if dora and len(adapters) > 1:
            raise ValueError(
                f"layer {self.name!r} has the DoRA adapter {dora[0]!r} active together with {adapters}; "
                "Flat-LoRA needs a single active adapter on a DoRA layer (set_adapter one of them)")
        return dora[0] if dora else None

    def _linear_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(B, A, scaling)`` when the adapter's delta is exactly ``scaling * B @ A`` in logical layout: the
        layer computes it with PEFT's own linear ``get_delta_weight`` (not an override: a subclass may gate
        or reshape its delta) and no variant; ``None`` otherwise (conv, embedding, AdaLoRA, DoRA, ...)."""
        m = self.module
        if (self.kind != "linear" or getattr(type(m), "get_delta_weight", None) not in _stock_linear_deltas()
                or adapter not in m.lora_A or adapter in getattr(m, "lora_variant", {})):
            return None
        return m.lora_B[adapter].weight, m.lora_A[adapter].weight, float(m.scaling[adapter])

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The weight the layer computes with, in logical layout, as a new fp32 tensor."""
        w = self.base_weight().float().clone()
        dora = self.dora_adapter()
        for adapter in self.active_adapters():
            factors = self._linear_factors(adapter)
            if factors is not None:  # plain linear LoRA: W + s * B @ A in one pass (PEFT's delta takes three)
                b, a, scaling = factors
                w.addmm_(b.detach().float(), a.detach().float(), alpha=scaling)
            else:
                w += self.logical(self.module.get_delta_weight(adapter)).float()
        if dora is not None:
            mag = self.module.lora_magnitude_vector[dora].weight.detach().float().reshape(-1)
            norm = torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1)
            w *= (mag / norm).view(-1, *([1] * (w.dim() - 1)))
        return w


# PEFT LoRA variants whose forward is ``base(x) + B(A(dropout(x))) * scaling`` and whose merge adds
# ``get_delta_weight``: the merged weight is plain LoRA's (MiCA only changes the init and freezes B).
_ADDITIVE_VARIANTS = ("MiCALinearVariant", "MiCAEmbeddingVariant")


def _check_supported(name: str, module: nn.Module, base: nn.Module) -> None:
    if _kind(base) is None:
        raise ValueError(
            f"layer {name!r} wraps a {type(base).__name__}, which Flat-LoRA cannot perturb (supported: Linear, "
            "GPT-2 Conv1D, Conv1d/2d/3d, Embedding); add a pattern for it to exclude_modules")
    for adapter in getattr(module, "lora_variant", {}):
        if _is_dora(module, adapter) and _kind(base) == "embedding":
            raise ValueError(f"layer {name!r} is a DoRA embedding, whose magnitude runs over embedding dims, "
                             "not token rows; Flat-LoRA does not support it: add it to exclude_modules")
        if not _is_dora(module, adapter) and type(module.lora_variant[adapter]).__name__ not in _ADDITIVE_VARIANTS:
            raise ValueError(
                f"layer {name!r} uses the LoRA variant {type(module.lora_variant[adapter]).__name__} for adapter "
                f"{adapter!r}, whose merged weight Flat-LoRA does not know; add {name!r} to exclude_modules")


def lora_layers_with_active_adapters(model: nn.Module) -> list[str]:
    """Names of the PEFT LoRA layers on which one of the model's active adapters lives."""
    lora_types = _lora_layer_types()
    return [name for name, m in model.named_modules() if isinstance(m, lora_types) and _holds_active_adapter(m)]


def adapter_switch(model: nn.Module, target: Target) -> nn.Module | None:
    """The LoRA layer whose adapter state says which model ``target`` computes in now (`runs_reference`): the
    target itself, or for a plain (opted-in) target the model's first LoRA layer (``disable_adapter()`` and
    ``set_adapter()`` set every LoRA layer together); ``None`` when the model has none."""
    if target.is_lora:
        return target.module
    lora_types = _lora_layer_types()
    return next((m for m in model.modules() if isinstance(m, lora_types)), None)


def trained_adapters(switch: nn.Module | None) -> tuple[str, ...]:
    """The adapters active on ``switch`` now: taken when a step begins, for `runs_reference`."""
    return () if switch is None else tuple(switch.active_adapters)


def runs_reference(switch: nn.Module | None, trained: tuple[str, ...]) -> bool:
    """Whether a forward now computes another model than the one being trained, which must not see the noise:
    ``switch`` (`adapter_switch`) has its adapters disabled (``model.disable_adapter()``: the base model, the
    reference of TRL's DPO/KTO/ORPO given a ``peft_config``) or other adapters active than ``trained`` (TRL's
    frozen ``"ref"`` adapter, given a ``PeftModel``). Plain attribute reads, cheap at every forward."""
    return switch is not None and (switch.disable_adapters or tuple(switch.active_adapters) != trained)


def find_targets(model: nn.Module, target_modules: Iterable[str] | None = None,
                 exclude_modules: Iterable[str] = ()) -> list[Target]:
    """List the layers to perturb, in ``named_modules`` order (which fixes each layer's noise index).

    ``target_modules=None`` selects every LoRA layer. Otherwise a module is selected when a pattern matches
    its name (``re.search``): LoRA layers, and plain layers that are not part of a LoRA layer.
    ``exclude_modules`` removes matches. Raises ``ValueError`` when nothing is selected.
    """
    lora_types = _lora_layer_types()
    include = [re.compile(p) for p in target_modules] if target_modules is not None else None
    exclude = [re.compile(p) for p in exclude_modules]
    found: list[Target] = []
    inside: list[str] = []  # names of LoRA layers seen, to skip their children (base_layer, lora_A, ...)
    n_lora = 0
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        is_lora = isinstance(module, lora_types)
        if is_lora:
            inside.append(name)
            n_lora += 1
        elif include is None or _kind(module) is None:
            continue
        if include is not None and not any(p.search(name) for p in include):
            continue
        if any(p.search(name) for p in exclude):
            continue
        base = module.get_base_layer() if is_lora else module
        _check_supported(name, module, base)
        transposed = bool(getattr(module, "fan_in_fan_out", False)) if is_lora else _is_gpt2_conv1d(module)
        if _is_gpt2_conv1d(base) and not transposed:
            raise ValueError(f"layer {name!r} wraps a GPT-2 Conv1D but fan_in_fan_out is False; "
                             "set fan_in_fan_out=True in the LoraConfig")
        found.append(Target(name, len(found), module, base, _kind(base), transposed))
    if not found:
        if n_lora == 0 and include is None:
            raise ValueError(
                f"the model ({type(model).__name__}) has no PEFT LoRA layers; wrap it with "
                "peft.get_peft_model(model, LoraConfig(...)) first, or select layers with target_modules")
        raise ValueError(
            f"no layer matches target_modules={list(target_modules) if target_modules is not None else None} "
            f"minus exclude_modules={list(exclude_modules)} ({n_lora} LoRA layers in the model)")
    return found


def check_coverage(model: nn.Module, targets: list[Target], target_modules: Iterable[str] | None,
                   exclude_modules: Iterable[str], where: str, active: tuple[str, ...]) -> None:
    """Raise ``ValueError`` when none of ``targets`` holds an active adapter (the step would silently be plain
    LoRA), saying why; warn when LoRA layers holding an active adapter are not among ``targets`` because they
    were added after ``targets`` were found (``find_targets`` with the same patterns selects them now).

    ``where`` starts the error message (the step and sigma); ``active``: the model's active adapter names.
    """
    known = {id(tg.module) for tg in targets}
    try:
        fresh = find_targets(model, target_modules, exclude_modules)
    except ValueError:  # nothing selectable now
        fresh = []
    missed = [tg.name for tg in fresh if id(tg.module) not in known and tg.in_use()]
    if not any(tg.in_use() for tg in targets):
        holders = lora_layers_with_active_adapters(model)
        why = (f"the LoRA layers holding them ({_names(missed)}) were added after FlatLora was built: build it "
               "again after adding or activating adapters" if missed else
               f"the LoRA layers holding them ({_names(holders)}) are excluded by target_modules="
               f"{target_modules} / exclude_modules={exclude_modules}" if holders else
               "no LoRA layer of the model holds an active adapter")
        raise ValueError(f"{where}, but none of the {len(targets)} layers FlatLora targets holds an active adapter "
                         f"(active: {list(active) or 'none'}), so the step would silently be plain LoRA: {why}")
    if missed:
        warnings.warn(f"LoRA layers {_names(missed)} hold an active adapter but were added after FlatLora was "
                      "built, so they are not perturbed; build FlatLora again to include them",
                      RuntimeWarning, stacklevel=4)


def _names(names: list[str], shown: int = 4) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(repr(n) for n in names[:shown]) + more


def check_ran(routed: list[Target], ran: set[int], seen: set[int], allow: Iterable[str], where: str) -> None:
    """After an exact-mode step: refuse a step in which none of ``routed`` computed with its noise, and name
    the layers that never have.

    ``routed``: the layers given a perturbed route for the step; ``ran``: the indices of those that computed
    with it (`flatlora.exact.ExactLayer.ran`); ``seen``: indices that ran in an earlier step or were already
    named, updated here, so that a layer is named at most once and a layer that ran before (a mixture-of-experts
    expert not routed this time) never; ``allow``: regexes of names never named (``allow_unperturbed``);
    ``where`` starts the messages. Raises ``RuntimeError`` when ``ran`` is empty, warns (``RuntimeWarning``)
    about the rest.
    """
    seen |= ran
    if not ran:
        raise RuntimeError(
            f"{where}: none of the {len(routed)} layers FlatLora perturbs computed with its noise during the step, "
            "so the step trained plain LoRA. Likely causes: fused LoRA kernels that read base_layer.weight "
            "themselves (Unsloth's fast LoRA paths, Axolotl's lora_mlp_kernel/lora_qkv_kernel/lora_o_kernel, "
            "liger's fused linear cross-entropy on lm_head): turn them off; a model copied, compiled or wrapped "
            "after FlatLora was built, so that its forward no longer reaches the layers FlatLora holds: build "
            "FlatLora on the model as it is trained; or no forward ran inside the step (perturbed(t), or between "
            "the callback's on_step_begin and on_pre_optimizer_step)")
    patterns = [re.compile(p) for p in allow]
    missed = [tg.name for tg in routed if tg.index not in seen and not any(p.search(tg.name) for p in patterns)]
    seen |= {tg.index for tg in routed if tg.name in missed}
    if missed:
        warnings.warn(
            f"{where}: layers {_names(missed)} never computed with Flat-LoRA's noise, in this step or any before, "
            f"while {len(ran)} other layers did: either they ran without it (a fused kernel that reads "
            "base_layer.weight itself, e.g. liger's fused linear cross-entropy or TRL's fused LM head on a LoRA "
            "lm_head: both also drop the LoRA delta) or they did not run (a mixture-of-experts expert not routed, "
            "an unused branch). Layers that may legitimately not run: name them in allow_unperturbed "
            "(regexes); this warning names each layer once", RuntimeWarning, stacklevel=3)


# --- how the exact mode routes a target -------------------------------------------------------------------------
def noise_beside(target: Target) -> bool:
    """Whether the exact mode adds ``op(x, E)`` to the (LoRA) layer's output with a forward hook, rather than
    swapping its base layer's forward for ``op(x, W + E, b)``.

    Swapping needs the base layer's output to be exactly one ``op(x, W_base, b)``. It is not for a DoRA adapter
    (which rescales the base output by its magnitude over the merged weight's norm), a forward another library
    already replaced on the instance, a subclass computing more than ``op`` (a scaled embedding), or a quantized
    base that bitsandbytes does not compute as a dense matmul with its dequantized weight (`fuses_noise`; those
    that it does are swapped for ``op(x, deq(W) + E, b)``, `flatlora._quantized_op`). Since ``op`` is linear in
    the weight, adding ``op(x, E)`` beside the layer gives ``op(x, W + E, b)`` on every one of these paths. It is
    the fallback, not the rule, because it costs a second op per layer (``op(x, E)`` beside ``op(x, W, b)``),
    where the swap costs none.
    """
    base = target.base
    if target.dora_adapter() is not None or "forward" in base.__dict__:
        return True
    if target.quantized:
        return target.transposed or not fuses_noise(base)
    return not plain_forward(base)
