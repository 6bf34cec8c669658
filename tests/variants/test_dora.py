"""DoRA (use_dora=True): noise on DoRA's own merged weight m * (W0 + dW) / ||W0 + dW||_row, added beside the
layer (exact mode), also on the dropout path where PEFT recomputes the base matmul itself; inplace refused."""

import copy

import pytest
import torch
from peft import LoraConfig
from torch import nn

from flatlora import FlatLora, FlatLoraConfig
from kit.checks import check_variant, swapped
from kit.compare import assert_same_state, state_without_adapters
from kit.models import conv_batch, conv_model, embed_model, gpt2, lm_batch, loss_of, mlp_batch, toy
from kit.references import PREFIX, logical, with_base_at

T = 10
BUILDERS = {"linear": (toy, mlp_batch), "conv2d": (conv_model, conv_batch), "gpt2_conv1d": (gpt2, lm_batch)}


def _dora_layers(model) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(m, "lora_magnitude_vector", None)]


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_dora_noise_scale_and_gradients(kind):
    make, batch = BUILDERS[kind]
    model = make(use_dora=True).eval()
    layers = _dora_layers(model)
    assert layers
    # DoRA's weight has row norms m, which here differ from those of W0 and of W0 + dW: noise scaled from
    # either of those would be caught
    for layer in layers:
        w0 = logical(layer.base_layer, layer.base_layer.weight).detach()
        w = w0 + logical(layer.base_layer, layer.get_delta_weight("default")).detach()
        m = layer.lora_magnitude_vector["default"].weight.detach().reshape(-1)
        for other in (w0, w):
            assert not torch.allclose(m, other.reshape(other.shape[0], -1).norm(dim=1), rtol=1e-2)
    check_variant(model, batch(), modes=("exact",), reference="output")


def test_dora_forward_is_the_merged_dora_weight_plus_noise():
    model = toy(use_dora=True).eval()
    flat = FlatLora(model, FlatLoraConfig(rho=0.5, seed=1), total_steps=T)
    noise = flat.noise(T)
    merged = copy.deepcopy(model).merge_and_unload()  # PEFT's DoRA merge: m * (W0 + dW) / ||W0 + dW||
    with torch.no_grad():
        for name, e in noise.items():
            merged.get_submodule(name.removeprefix(PREFIX)).weight += e
    batch = mlp_batch()
    with flat.perturbed(T):
        got = loss_of(model, batch)
    torch.testing.assert_close(got, loss_of(merged, batch), rtol=1e-5, atol=1e-6)
    # writing E into W0 instead would be renormalised by DoRA: a different function
    assert not torch.isclose(loss_of(with_base_at(model, noise), batch), got, rtol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_dora_dropout_path_that_recomputes_the_base_matmul(kind):
    make, batch = BUILDERS[kind]
    model = make(use_dora=True, lora_dropout=0.3).train()
    for layer in _dora_layers(model):  # PEFT's DoRA then calls F.linear / conv on dropout(x) itself
        assert not isinstance(layer.lora_dropout["default"], nn.Identity)
    check_variant(model, batch(), modes=("exact",), reference="output", rng=99)


def test_inplace_is_refused_for_dora():
    model = toy(use_dora=True)
    before = state_without_adapters(model)
    with pytest.raises(ValueError, match=r"DoRA layer.*mode='exact'"):
        FlatLora(model, FlatLoraConfig(mode="inplace"), total_steps=T)
    assert_same_state(before, state_without_adapters(model))


def test_a_dora_embedding_is_refused():
    with pytest.raises(ValueError, match="DoRA embedding.*exclude_modules"):
        FlatLora(embed_model(use_dora=True), FlatLoraConfig(), total_steps=T)
    # the fix named in the message works
    flat = FlatLora(embed_model(use_dora=True), FlatLoraConfig(exclude_modules=["emb$"]), total_steps=T)
    assert flat.targets == [PREFIX + "fc"]


def test_dora_with_a_second_active_adapter_is_refused_and_leaves_the_model_clean():
    model = toy(use_dora=True)
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"]))
    model.base_model.set_adapter(["default", "other"])
    before = state_without_adapters(model)
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)
    with pytest.raises(ValueError, match="single active adapter"):
        with flat.perturbed(T):
            loss_of(model, mlp_batch()).backward()
    assert not flat.is_perturbed and swapped(model) == []
    assert_same_state(before, state_without_adapters(model))
