"""liger-kernel's fused linear cross-entropy with ``lm_head`` as a LoRA target: it reads ``lm_head.weight`` itself,
so lm_head's noise and its LoRA delta are both dropped; the bypass guard names lm_head.

"liger" runs liger's own patched Llama forward (``apply_liger_kernel_to_llama(fused_linear_cross_entropy=True,
model=...)``: ``lce_forward`` -> ``LigerForCausalLMLoss(lm_head_weight=lm_head.weight)``) with only its Triton
kernel, which needs a GPU, replaced by the same loss in torch. It is skipped where liger-kernel is not installed
(it is not a flatlora dependency). "stand-in" reproduces that access pattern without the package.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F

from flatlora import FlatLora, FlatLoraConfig
from kit.models import batch_for, llama_model

LM_HEAD = "base_model.model.lm_head"


def _reference_flce(input, weight, target, bias=None, ignore_index=-100, reduction="mean", **unused):
    """liger's fused linear cross-entropy, unfused, in torch (CPU: no Triton driver)."""
    return F.cross_entropy(F.linear(input, weight, bias).float(), target, ignore_index=ignore_index,
                           reduction=reduction)


def _stand_in_forward(inner):
    """``inner``'s forward computing the loss from ``lm_head.weight`` directly, as liger's does."""

    from transformers.modeling_outputs import CausalLMOutputWithPast

    def forward(input_ids, labels=None, **kwargs):
        hidden = inner.model(input_ids=input_ids, **kwargs).last_hidden_state
        logits_shift, targets = hidden[:, :-1].reshape(-1, hidden.shape[-1]), labels[:, 1:].reshape(-1)
        return CausalLMOutputWithPast(loss=_reference_flce(logits_shift, inner.lm_head.weight, targets))

    return forward


def _patched(way: str, targets: list[str], monkeypatch):
    model = llama_model(target_modules=targets).train()
    inner = model.get_base_model()
    if way == "liger":
        pytest.importorskip("liger_kernel")
        import liger_kernel.transformers.functional as liger_functional
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        monkeypatch.setattr(liger_functional, "liger_fused_linear_cross_entropy", _reference_flce)
        apply_liger_kernel_to_llama(rope=False, cross_entropy=False, fused_linear_cross_entropy=True,
                                    rms_norm=False, swiglu=False, model=inner)  # this instance only
    else:
        inner.forward = _stand_in_forward(inner)
    return model


@pytest.mark.parametrize("way", ["liger", "stand-in"])
def test_a_lora_lm_head_under_fused_linear_cross_entropy_is_named(way, monkeypatch):
    model = _patched(way, ["q_proj", "v_proj", "lm_head"], monkeypatch)
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=2)
    with pytest.warns(RuntimeWarning, match=re.escape(repr(LM_HEAD)) + " never computed with Flat-LoRA's noise"):
        with flat.perturbed(2):
            model(**batch_for("llama")).loss.backward()
    lm_head = model.get_base_model().lm_head
    assert lm_head.lora_B["default"].weight.grad is None  # its LoRA delta was dropped too: never in the graph
    assert model.get_base_model().model.layers[0].self_attn.q_proj.lora_B["default"].weight.grad is not None


@pytest.mark.parametrize("way", ["liger", "stand-in"])
def test_fused_linear_cross_entropy_without_a_lora_lm_head_is_silent(way, monkeypatch):
    model = _patched(way, ["q_proj", "v_proj"], monkeypatch)
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for t in (1, 2):
            with flat.perturbed(t):
                model(**batch_for("llama", t)).loss.backward()
