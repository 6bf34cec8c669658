"""Flat-LoRA with Unsloth: put PEFT's forwards back on the layers Unsloth fused, so the noise reaches them.

    model, tokenizer = FastLanguageModel.from_pretrained(...)
    model = FastLanguageModel.get_peft_model(model, r=16, target_modules=[...])
    flatlora.integrations.unsloth.prepare(model)            # before the Trainer is built
    trainer = SFTTrainer(model=model, ...)
    FlatLoraCallback(rho=0.05).attach(trainer)

Unsloth (2026.10.9, ``FastLanguageModel.get_peft_model`` -> ``patch_peft_model`` in models/llama.py) installs fused
LoRA kernels (``unsloth/kernels/fast_lora.py``) on each decoder layer whose projections all hold LoRA, when
``lora_dropout`` is 0 (or its fused dropout is on), ``bias="none"`` and the base is not fp32:

* ``self_attn.apply_qkv = apply_lora_qkv`` and ``self_attn.apply_o = apply_lora_o``: plain functions on the
  instance, called by Unsloth's attention forward as ``getattr(self, "apply_qkv", original_apply_qkv)(self, X)``;
* ``mlp.forward = MethodType(apply_lora_mlp_swiglu, mlp)`` (GeGLU variants for Gemma; ``mlp._unsloth_forward``
  when a tiled MLP wraps it);
* for Qwen3-MoE, ``Qwen3MoeMLP.forward = fast_swiglu_inference`` on the class (``fast_linear_forward``).

Each reads ``base_layer.weight`` (dequantizing 4-bit weights itself) and multiplies, so Flat-LoRA's swapped base
forward never runs: those layers would train as plain LoRA. `prepare` undoes exactly what Unsloth undoes when it
declines fused LoRA for FSDP (``_decline_fused_lora_for_fsdp`` in models/llama.py) on the modules that read a
layer Flat-LoRA perturbs: ``apply_qkv``/``apply_o`` become Unsloth's ``original_apply_qkv``/``original_apply_o``
(``q_proj(X), k_proj(X), v_proj(X)`` / ``o_proj(X)``: the projections' PEFT forwards), the instance ``forward`` is
deleted (the class's forward runs again), ``_unsloth_forward`` becomes the class's forward. Modules that read no
perturbed layer keep their kernels. ``fast_swiglu_inference`` on a class is replaced per instance by the SwiGLU
forward of transformers' MLPs, ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``.

What `prepare` cannot change: Unsloth's causal-LM forward feeds ``lm_head.weight`` to its fused cross-entropy. With
``lm_head`` among the LoRA targets, set ``UNSLOTH_RETURN_LOGITS=1`` (or leave ``lm_head`` out);
`flatlora.integrations.check_fused_paths` refuses the run otherwise.

The cost: the projections run as separate PEFT layers instead of one fused kernel (Unsloth's own FSDP fallback).
Unsloth cannot be imported without a GPU: this module imports nothing from it and recognises its kernels by name
(`flatlora.integrations._fused`). examples/unsloth_check.py is the check to run on a GPU machine.
"""

from __future__ import annotations

import types

from torch import nn
from transformers import TrainerCallback

from ..config import FlatLoraConfig
from ..targets import find_targets
from ._fused import FusedPath, check_fused_paths, fused_lora_paths

__all__ = ["PrepareCallback", "check", "prepare"]


def _original_apply_qkv(self: nn.Module, X):
    """Unsloth's ``original_apply_qkv`` (models/llama.py), called as ``self.apply_qkv(self, X)``."""
    return self.q_proj(X), self.k_proj(X), self.v_proj(X)


def _original_apply_o(self: nn.Module, X):
    """Unsloth's ``original_apply_o`` (models/llama.py)."""
    return self.o_proj(X)


def _swiglu_forward(self: nn.Module, x):
    """transformers' ``LlamaMLP.forward`` / ``Qwen3MoeMLP.forward``: the projections' own forwards."""
    return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _perturbed_names(model: nn.Module, config: FlatLoraConfig | None) -> set[str]:
    config = FlatLoraConfig() if config is None else config
    if not isinstance(config, FlatLoraConfig):
        raise ValueError(f"config must be a FlatLoraConfig or None, got {type(config).__name__}")
    return {t.name for t in find_targets(model, config.target_modules, config.exclude_modules)}


_INSTANCE_ATTRIBUTES = ("apply_qkv", "apply_o", "forward", "_unsloth_forward")


def _restorable(path: FusedPath) -> bool:
    """Whether `prepare` can put PEFT's forwards back (all but the causal-LM forward's fused cross-entropy)."""
    if path.on_class:
        return path.attribute == "forward" and path.kernel.endswith(".fast_swiglu_inference")
    return path.attribute in _INSTANCE_ATTRIBUTES


def _restore(module: nn.Module, path: FusedPath) -> None:
    """Put the projections' PEFT forwards back on ``module`` (as Unsloth's ``_decline_fused_lora_for_fsdp``)."""
    if path.on_class:  # fast_swiglu_inference as the class's forward
        module.forward = types.MethodType(_swiglu_forward, module)
    elif path.attribute == "apply_qkv":
        module.apply_qkv = _original_apply_qkv
    elif path.attribute == "apply_o":
        module.apply_o = _original_apply_o
    elif path.attribute == "forward":
        del module.forward
    else:  # _unsloth_forward
        module._unsloth_forward = type(module).forward


def prepare(model: nn.Module, config: FlatLoraConfig | None = None) -> list[FusedPath]:
    """Switch Unsloth's fused LoRA kernels off on the modules that read a layer Flat-LoRA perturbs; return them.

    ``config``: the `FlatLoraConfig` of the run (its ``target_modules``/``exclude_modules`` choose the perturbed
    layers; default: every LoRA layer). Call it after ``FastLanguageModel.get_peft_model`` and before training;
    calling it again is a no-op. Raises ``ValueError`` naming what to change, before changing anything, when a
    kernel it cannot switch off reads a perturbed layer (``lm_head`` under Unsloth's fused cross-entropy).
    """
    perturbed = _perturbed_names(model, config)

    def pending() -> list[FusedPath]:
        return [p for p in fused_lora_paths(model) if p.stack == "Unsloth" and perturbed.intersection(p.layers)]

    check_fused_paths(model, perturbed, [p for p in pending() if not _restorable(p)])
    modules = dict(model.named_modules())
    restored: list[FusedPath] = []
    for _ in range(2):  # a deleted instance forward uncovers the class's, which may be fast_swiglu_inference
        done = pending()
        for path in done:
            _restore(modules[path.module], path)
        restored += done
        if not done:
            break
    check_fused_paths(model, perturbed)  # anything else (another stack's kernels) is refused here
    return restored


class PrepareCallback(TrainerCallback):
    """``Trainer(callbacks=[...])``: runs `prepare` on the Trainer's model at ``on_train_begin``.

    For launchers that build the model out of the user's reach (LLaMA-Factory's ``use_unsloth``). Flat-LoRA
    perturbs from the first ``on_step_begin`` on, after every ``on_train_begin``, so the order of the callbacks
    does not matter.
    """

    def __init__(self, config: FlatLoraConfig | None = None) -> None:
        self.config = config
        self.restored: list[FusedPath] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("PrepareCallback needs the model in on_train_begin; use it with transformers' Trainer")
        self.restored = prepare(model, self.config)


def check(model: nn.Module, config: FlatLoraConfig | None = None) -> None:
    """Raise ``ValueError`` (one line: layers, kernels, fix) if a fused kernel reads a layer Flat-LoRA perturbs."""
    check_fused_paths(model, _perturbed_names(model, config))
