"""flatlora.integrations.unsloth: Unsloth's fused LoRA paths are found, refused, and taken off exactly.

Unsloth needs a GPU to import; these tests run its patch pattern on a CPU stand-in (tests/integrations/
_unsloth_standin.py, which cites the unsloth 2026.10.9 source it copies). examples/unsloth_check.py is the same
check with the real package, for a GPU machine.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

import _unsloth_standin as us
from flatlora import FlatLora, FlatLoraConfig
from flatlora.integrations import check_fused_paths, fused_lora_paths
from flatlora.integrations import unsloth as fl_unsloth

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(1))


def _out(model, flat=None, t=None):
    model.train()
    if flat is None:
        return model(IDS)["logits"]
    with flat.perturbed(t):
        return model(IDS)["logits"]


def test_imports_no_unsloth():
    assert "unsloth" not in sys.modules  # the module names are read off the functions, nothing is imported


def test_finds_every_kernel_with_the_layers_it_reads():
    model = us.peft_decoder()
    assert fused_lora_paths(model) == []
    targets = set(FlatLora(model).targets)
    assert us.patch_peft_model(model) == 6
    paths = fused_lora_paths(model)
    got = {(p.module.rpartition("layers.")[2], p.attribute, p.kernel) for p in paths}
    assert got == {(f"{i}.{m}", a, f"{us.FAST_LORA}.{k}") for i in (0, 1) for m, a, k in
                   [("self_attn", "apply_qkv", "apply_lora_qkv"), ("self_attn", "apply_o", "apply_lora_o"),
                    ("mlp", "forward", "apply_lora_mlp_swiglu")]}
    qkv = next(p for p in paths if p.attribute == "apply_qkv")
    assert qkv.layers == tuple(f"{qkv.module}.{n}" for n in ("q_proj", "k_proj", "v_proj"))
    assert all(p.stack == "Unsloth" and p.key is None and not p.on_class for p in paths)
    assert {n for p in paths for n in p.layers} == targets  # every LoRA layer is read


def test_fused_paths_bypass_the_noise_and_are_refused():
    """The failure the check exists for: under perturbed(t) the fused model computes exactly its clean output.
    FlatLora refuses such a model when it is built; one patched after FlatLora was built fails its first step
    (the bypass guard: no layer ran perturbed)."""
    model = us.peft_decoder()
    flat = FlatLora(model, FlatLoraConfig(rho=0.5, seed=3), total_steps=2)  # built before Unsloth patches
    us.patch_peft_model(model)
    clean = _out(model)
    with pytest.raises(RuntimeError, match="no layer|none of"):
        with flat.perturbed(2):
            noisy = model(IDS)["logits"]
    torch.testing.assert_close(noisy, clean, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"14 perturbed LoRA layers .*Unsloth's apply_lora_mlp_swiglu.*"
                                         r"flatlora\.integrations\.unsloth\.prepare\(model\)") as err:
        check_fused_paths(model, flat.targets)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"14 perturbed LoRA layers .*prepare\(model\)"):
        FlatLora(model, FlatLoraConfig(rho=0.5, seed=3), total_steps=2)  # built after: refused at once
    with pytest.raises(ValueError, match="prepare"):
        fl_unsloth.check(model)


def test_prepare_restores_peft_forwards_bit_for_bit():
    """After prepare, the patched model computes what the never-patched model computes, clean and perturbed."""
    model, twin = us.peft_decoder(), us.peft_decoder()
    us.patch_peft_model(model)
    restored = fl_unsloth.prepare(model)
    assert len(restored) == 6 and fused_lora_paths(model) == []
    assert fl_unsloth.prepare(model) == []  # a second call changes nothing
    assert all("forward" not in vars(layer.mlp) for layer in model.base_model.model.layers)
    flat, flat_twin = (FlatLora(m, FlatLoraConfig(rho=0.5, seed=3), total_steps=2) for m in (model, twin))
    torch.testing.assert_close(_out(model), _out(twin), rtol=0, atol=0)
    noisy = _out(model, flat, 2)
    torch.testing.assert_close(noisy, _out(twin, flat_twin, 2), rtol=0, atol=0)
    assert (noisy - _out(model)).abs().max() > 1e-3  # and the noise now reaches the output


def test_prepare_keeps_kernels_that_read_no_perturbed_layer():
    model = us.peft_decoder()
    us.patch_peft_model(model)
    config = FlatLoraConfig(target_modules=[r"mlp\."])
    restored = fl_unsloth.prepare(model, config)
    assert {p.attribute for p in restored} == {"forward"}
    assert {p.attribute for p in fused_lora_paths(model)} == {"apply_qkv", "apply_o"}  # still fused, still fast
    fl_unsloth.check(model, config)  # nothing perturbed is fused
    with pytest.raises(ValueError, match="8 perturbed LoRA layers"):
        fl_unsloth.check(model)


@pytest.mark.parametrize("tiled, cohere", [(True, False), (False, True)])
def test_tiled_and_partial_mlp_kernels(tiled, cohere):
    """``mlp._unsloth_forward`` (a tiled MLP) and a ``functools.partial`` kernel (Cohere) are found and restored
    as Unsloth's own FSDP decline restores them."""
    model = us.peft_decoder()
    us.patch_peft_model(model, tiled=tiled, cohere=cohere)
    mlp_paths = [p for p in fused_lora_paths(model) if p.module.endswith("mlp")]
    assert [p.attribute for p in mlp_paths] == ["_unsloth_forward" if tiled else "forward"] * 2
    fl_unsloth.prepare(model)
    for layer in model.base_model.model.layers:
        if tiled:
            assert layer.mlp._unsloth_forward is us.MLP.forward
        else:
            assert "forward" not in vars(layer.mlp)


def test_class_level_swiglu_is_replaced_per_instance():
    """``Qwen3MoeMLP.forward = fast_swiglu_inference`` (on the class): found, and replaced by the projections' own
    forwards on each perturbed instance; the result equals the plain SwiGLU MLP's bit for bit."""
    model = us.peft_decoder(mlp_cls=us.FastMLP)
    twin = us.peft_decoder()
    paths = fused_lora_paths(model)
    assert [(p.attribute, p.on_class, p.kernel) for p in paths] == [
        ("forward", True, f"{us.LLAMA}.fast_swiglu_inference")] * 2
    with pytest.raises(ValueError, match="fast_swiglu_inference"):
        FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=1)
    fl_unsloth.prepare(model)
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=1)
    assert fused_lora_paths(model) == []
    flat_twin = FlatLora(twin, FlatLoraConfig(rho=0.5), total_steps=1)
    torch.testing.assert_close(_out(model, flat, 1), _out(twin, flat_twin, 1), rtol=0, atol=0)


def test_lm_head_under_fused_cross_entropy_is_refused_until_unsloth_returns_logits(monkeypatch):
    """With lm_head a LoRA target, Unsloth's causal-LM forward reads lm_head.weight: prepare cannot change that,
    so it raises naming UNSLOTH_RETURN_LOGITS=1; with the variable set the path is not used and nothing is left."""
    monkeypatch.delenv("UNSLOTH_RETURN_LOGITS", raising=False)
    model = us.peft_decoder(targets=[*us.ALL, "lm_head"], base=us.FastDecoder)
    us.patch_peft_model(model)
    with pytest.raises(ValueError, match=r"lm_head.*UNSLOTH_RETURN_LOGITS=1") as err:
        fl_unsloth.prepare(model)
    assert "1 perturbed LoRA layers (base_model.model.lm_head)" in str(err.value)
    assert len(fused_lora_paths(model)) == 7  # refused before anything changed: 6 projection kernels + the CE
    fl_unsloth.prepare(model, FlatLoraConfig(exclude_modules=["lm_head"]))  # lm_head not perturbed: fine
    monkeypatch.setenv("UNSLOTH_RETURN_LOGITS", "1")
    assert fl_unsloth.prepare(model) == [] and fused_lora_paths(model) == []


def test_callback_prepares_at_train_begin():
    model = us.peft_decoder()
    us.patch_peft_model(model)
    callback = fl_unsloth.PrepareCallback(FlatLoraConfig())
    callback.on_train_begin(args=None, state=None, control=None, model=model)
    assert len(callback.restored) == 6 and fused_lora_paths(model) == []
    with pytest.raises(ValueError, match="needs the model"):
        callback.on_train_begin(args=None, state=None, control=None)


def test_bad_config_is_refused_before_anything_changes():
    model = us.peft_decoder()
    us.patch_peft_model(model)
    with pytest.raises(ValueError, match="config must be a FlatLoraConfig or None, got dict"):
        fl_unsloth.prepare(model, {"rho": 0.05})
    with pytest.raises(ValueError, match="no layer matches"):
        fl_unsloth.prepare(model, FlatLoraConfig(target_modules=["nothing_here"]))
    assert len(fused_lora_paths(model)) == 6


def test_unrelated_methods_are_not_taken_for_kernels():
    """Only Unsloth's and Axolotl's kernel functions count: a same-named function elsewhere does not."""
    model = us.peft_decoder()

    def apply_lora_qkv(self, X):
        return us.original_apply_qkv(self, X)

    attn = model.base_model.model.layers[0].self_attn
    attn.apply_qkv = apply_lora_qkv
    attn.apply_o = types.MethodType(us.original_apply_o, attn)
    assert fused_lora_paths(model) == []
