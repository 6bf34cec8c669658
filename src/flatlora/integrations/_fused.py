"""Find the fused LoRA kernels of Unsloth and Axolotl on a model, and refuse them on perturbed layers.

A fused LoRA kernel computes ``x W^T + s (x A^T) B^T`` for one or more PEFT LoRA layers from their tensors
(``base_layer.weight`` or its 4-bit ``quant_state``, ``lora_A``, ``lora_B``) inside its own autograd function.
It never calls the base layer's ``forward``, which is where Flat-LoRA's exact mode computes with ``W + E``, nor
the LoRA layer's ``forward``, where its hooks add the noise of DoRA and quantized layers: every layer it reads
trains as plain LoRA. The stacks install their kernels by replacing a method of the module that *owns* the
projections (the attention or MLP module), on the instance or on its class:

================================  ==========================================  =====================================
who                               how (source)                                reads
================================  ==========================================  =====================================
Unsloth 2026.10.9                 ``patch_peft_model`` (models/llama.py):      q/k/v_proj; o_proj;
``unsloth.kernels.fast_lora``     ``self_attn.apply_qkv = apply_lora_qkv``,    gate/up/down_proj
                                  ``self_attn.apply_o = apply_lora_o``,
                                  ``mlp.forward`` (or ``mlp._unsloth_forward``)
                                  ``= MethodType(apply_lora_mlp_swiglu, mlp)``
                                  (``_geglu_exact``/``_geglu_approx``; a
                                  ``functools.partial`` of it for Cohere)
Unsloth 2026.10.9                 ``Qwen3MoeMLP.forward = fast_swiglu_inference`` gate/up/down_proj (via
``unsloth.models.llama``          (models/qwen3_moe.py), on the class         ``fast_linear_forward``)
Unsloth 2026.10.9                 ``<Model>ForCausalLM.forward =              ``lm_head`` (``self.lm_head.weight``
                                  CausalLM_fast_forward(...)``, on the class   into the fused cross-entropy) unless
                                                                              ``UNSLOTH_RETURN_LOGITS=1``
Axolotl 0.21.0                    ``apply_lora_kernel_patches``                q/k(/v); o_proj; MLP projections;
``axolotl.kernels.lora``,         (monkeypatch/lora_kernels.py): bound         the LoRA embedding itself;
``axolotl.monkeypatch.            methods ``apply_qkv``/``apply_o``/``forward``  linear-attention projections
lora_kernels``                    and ``apply_in_proj_fused``/``apply_out_proj``
================================  ==========================================  =====================================

The kernels are recognised by their defining module and ``__qualname__``, so neither package is imported (Unsloth
cannot be imported without a GPU); method wrappers (bound methods, ``functools.partial``) are unwrapped first.
"""

from __future__ import annotations

import functools
import os
import types
from dataclasses import dataclass
from typing import Any, Iterable

from torch import nn

_QKV = ("q_proj", "k_proj", "v_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
UNSLOTH_FIX = ("call flatlora.integrations.unsloth.prepare(model) after FastLanguageModel.get_peft_model: it puts "
               "PEFT's forwards back on the perturbed layers")
LM_HEAD_FIX = ("set UNSLOTH_RETURN_LOGITS=1 (Unsloth's causal-LM forward then calls lm_head) or leave lm_head out of "
               "the LoRA target_modules")
AXOLOTL_PLUGIN = "flatlora.integrations.axolotl.FlatLoraPlugin"


@dataclass(frozen=True)
class _Kernel:
    stack: str
    layers: tuple[str, ...] | None  # children of the patched module it reads; () the module itself; None: closure's
    key: str | None = None  # Axolotl: the config key that installs it
    fix: str = UNSLOTH_FIX  # Unsloth: what the user changes
    unless_env: tuple[str, str] | None = None  # (variable, value) under which the kernel is not used


_U, _A = "unsloth.kernels.fast_lora", "axolotl.kernels.lora"
# kernels installed on an instance: vars(module) holds them
_INSTANCE_KERNELS: dict[tuple[str, str], _Kernel] = {
    (_U, "apply_lora_qkv"): _Kernel("Unsloth", _QKV),
    (_U, "apply_lora_o"): _Kernel("Unsloth", ("o_proj",)),
    (_U, "apply_lora_mlp_swiglu"): _Kernel("Unsloth", _MLP),
    (_U, "apply_lora_mlp_geglu_exact"): _Kernel("Unsloth", _MLP),
    (_U, "apply_lora_mlp_geglu_approx"): _Kernel("Unsloth", _MLP),
    (_A, "apply_lora_qkv"): _Kernel("Axolotl", _QKV, "lora_qkv_kernel"),
    (_A, "apply_lora_qk"): _Kernel("Axolotl", ("q_proj", "k_proj"), "lora_qkv_kernel"),
    (_A, "apply_lora_o"): _Kernel("Axolotl", ("o_proj",), "lora_o_kernel"),
    (_A, "apply_lora_mlp_swiglu"): _Kernel("Axolotl", _MLP, "lora_mlp_kernel"),
    (_A, "apply_lora_mlp_geglu"): _Kernel("Axolotl", _MLP, "lora_mlp_kernel"),
    (_A, "apply_lora_mlp_relu2"): _Kernel("Axolotl", ("up_proj", "down_proj"), "lora_mlp_kernel"),
    (_A, "apply_lora_embedding"): _Kernel("Axolotl", (), "lora_embedding_kernel"),
    ("axolotl.monkeypatch.lora_kernels", "_make_apply_lora_linear.<locals>.apply_linear"):
        _Kernel("Axolotl", None, "lora_o_kernel"),
    ("axolotl.monkeypatch.lora_kernels", "_make_apply_lora_gdn_in_proj.<locals>.apply_in_proj"):
        _Kernel("Axolotl", None, "lora_qkv_kernel"),
}
# kernels installed as a class's forward
_CLASS_KERNELS: dict[tuple[str, str], _Kernel] = {
    ("unsloth.models.llama", "fast_swiglu_inference"): _Kernel("Unsloth", _MLP),
    ("unsloth.models.llama", "CausalLM_fast_forward.<locals>._CausalLM_fast_forward"):
        _Kernel("Unsloth", ("lm_head",), fix=LM_HEAD_FIX, unless_env=("UNSLOTH_RETURN_LOGITS", "1")),
}


@dataclass(frozen=True)
class FusedPath:
    """One fused LoRA kernel on a model.

    ``module``: name of the module whose method it replaces; ``attribute``: that method (``"apply_qkv"``,
    ``"forward"``, ...); ``on_class``: installed on the module's class rather than on the instance;
    ``kernel``: ``"<module>.<qualname>"`` of the kernel; ``stack``: ``"Unsloth"`` or ``"Axolotl"``; ``layers``:
    names of the LoRA layers whose weights it reads instead of calling their forward; ``key``: the Axolotl config
    key that installs it (None for Unsloth); ``fix``: what the user changes to take it off.
    """

    module: str
    attribute: str
    on_class: bool
    kernel: str
    stack: str
    layers: tuple[str, ...]
    key: str | None
    fix: str


def _unwrap(value: Any) -> Any:
    """The function under bound methods and ``functools.partial`` (Unsloth binds a partial for Cohere)."""
    for _ in range(4):
        if isinstance(value, types.MethodType):
            value = value.__func__
        elif isinstance(value, functools.partial):
            value = value.func
        else:
            break
    return value


def _key(value: Any) -> tuple[str, str] | None:
    fn = _unwrap(value)
    if not callable(fn):
        return None
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    return (module, qualname) if isinstance(module, str) and isinstance(qualname, str) else None


def _closure_layers(fn: Any) -> tuple[str, ...]:
    """Axolotl's ``_make_apply_lora_linear(proj_name)`` / ``_make_apply_lora_gdn_in_proj(proj_names)`` closures:
    the projection names they captured."""
    fn = _unwrap(fn)
    cells = dict(zip(fn.__code__.co_freevars, fn.__closure__ or ()))
    if "proj_names" in cells:
        return tuple(cells["proj_names"].cell_contents)
    if "proj_name" in cells:
        return (cells["proj_name"].cell_contents,)
    return ()


def _path(name: str, module: nn.Module, attribute: str, value: Any, kernel: _Kernel, on_class: bool) -> FusedPath:
    children = kernel.layers if kernel.layers is not None else _closure_layers(value)
    prefix = f"{name}." if name else ""
    layers = (tuple(prefix + c for c in children if getattr(module, c, None) is not None) if children
              else (name,))  # no children: it replaces the LoRA layer's own forward (Axolotl's embedding kernel)
    fix = "set " + kernel.key + ": false in the Axolotl config" if kernel.key else kernel.fix
    return FusedPath(name, attribute, on_class, ".".join(_key(value)), kernel.stack, layers, kernel.key, fix)


def fused_lora_paths(model: nn.Module) -> list[FusedPath]:
    """Every fused LoRA kernel of Unsloth or Axolotl on ``model``, in ``named_modules`` order.

    Looks at each module's own attributes (``vars(module)``: where both stacks bind their kernels per instance)
    and at its class's ``forward`` (where Unsloth installs ``fast_swiglu_inference`` and its causal-LM forward).
    A kernel that is switched off by an environment variable now (``UNSLOTH_RETURN_LOGITS=1``) is left out.
    """
    found = []
    for name, module in model.named_modules():
        for attribute, value in list(vars(module).items()):
            kernel = _INSTANCE_KERNELS.get(_key(value))
            if kernel is not None:
                found.append(_path(name, module, attribute, value, kernel, on_class=False))
        cls_forward = getattr(type(module), "forward", None)
        kernel = _CLASS_KERNELS.get(_key(cls_forward))
        if kernel is not None and "forward" not in vars(module):
            if kernel.unless_env is None or os.environ.get(kernel.unless_env[0]) != kernel.unless_env[1]:
                found.append(_path(name, module, "forward", cls_forward, kernel, on_class=True))
    return found


def _fix(paths: list[FusedPath]) -> str:
    """What the user changes: each path's fix once; Axolotl's keys in one clause."""
    fixes = list(dict.fromkeys(p.fix for p in paths if p.key is None))
    keys = sorted({p.key for p in paths if p.key is not None})
    if keys:
        fixes.append("set " + ", ".join(f"{k}: false" for k in keys) + " in the Axolotl config (the plugin "
                     f"{AXOLOTL_PLUGIN} does it)")
    return "; ".join(fixes)


def check_fused_paths(model: nn.Module, targets: Iterable[str], paths: list[FusedPath] | None = None) -> None:
    """Raise ``ValueError`` when a fused LoRA kernel reads one of the perturbed layers ``targets`` (module names).

    Such a layer would train as plain LoRA, without the noise. The one-line message names the layers, the kernels
    and the change that puts the layers back on their forwards. Kernels that read no perturbed layer are fine.
    ``paths``: check these instead of ``fused_lora_paths(model)``.
    """
    wanted = set(targets)
    bad = [p for p in (fused_lora_paths(model) if paths is None else paths) if wanted.intersection(p.layers)]
    if not bad:
        return
    layers = [layer for p in bad for layer in p.layers if layer in wanted]
    kernels = sorted({f"{p.stack}'s {p.kernel.rpartition('.')[2]}" for p in bad})
    shown = ", ".join(layers[:3]) + (f" and {len(layers) - 3} more" if len(layers) > 3 else "")
    raise ValueError(
        f"{len(layers)} perturbed LoRA layers ({shown}) run through fused LoRA kernels ({', '.join(kernels)}) that "
        f"read the base weight themselves, so Flat-LoRA's noise never reaches them: {_fix(bad)}")
