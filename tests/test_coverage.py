"""Nothing silent: a step with sigma > 0 that would perturb no layer is refused, LoRA layers added after
`FlatLora` was built are named."""

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model

from flatlora import FlatLora, FlatLoraConfig
from kit.compare import base_state
from kit.models import ToyMLP, loss_of, toy_model

T = 10


def _mlp(targets: list[str]):
    torch.manual_seed(0)
    return get_peft_model(ToyMLP(), LoraConfig(r=2, target_modules=targets))


def _batch():
    gen = torch.Generator().manual_seed(0)
    return {"x": torch.randn(4, 16, generator=gen), "labels": torch.randint(0, 4, (4,), generator=gen)}


def test_active_adapter_only_on_excluded_layers_is_refused():
    model = _mlp(["fc1", "fc2"])
    flat = FlatLora(model, FlatLoraConfig(exclude_modules=["fc2"]), total_steps=T)
    model.add_adapter("b", LoraConfig(r=2, target_modules=["fc2"]))
    model.set_adapter("b")  # lives on fc2 alone, which exclude_modules removes
    before = base_state(model)
    with pytest.raises(ValueError, match=r"step 5: sigma=.*none of the 1 layers.*active: \['b'\].*'base_model.model."
                                         r"fc2'.*excluded by target_modules=None / exclude_modules=\['fc2'\]"):
        flat.perturb(5)
    assert not flat.is_perturbed
    assert all(torch.equal(before[k], v) for k, v in base_state(model).items())


def test_adapter_added_and_activated_after_flatlora_is_refused():
    model = _mlp(["fc1"])
    flat = FlatLora(model, FlatLoraConfig(), total_steps=T)
    model.add_adapter("b", LoraConfig(r=2, target_modules=["fc2"]))
    model.set_adapter("b")
    with pytest.raises(ValueError, match=r"'base_model.model.fc2'\) were added after FlatLora was built"):
        with flat.perturbed(3):
            pass
    # rebuilt, it perturbs the new layer
    flat = FlatLora(model, FlatLoraConfig(), total_steps=T)
    assert [t.name for t, _ in flat.noise_specs(3)] == ["base_model.model.fc2"]


def test_new_layers_beside_perturbed_ones_are_named_once():
    model = _mlp(["fc1"])
    flat = FlatLora(model, FlatLoraConfig(), total_steps=T)
    model.add_adapter("b", LoraConfig(r=2, target_modules=["fc2"]))
    model.base_model.set_adapter(["default", "b"])  # fc1 still perturbed, fc2 not
    with pytest.warns(RuntimeWarning, match=r"LoRA layers 'base_model.model.fc2' hold an active adapter but were "
                                            r"added after FlatLora was built"):
        with flat.perturbed(4):
            loss_of(model, _batch()).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same adapters: not scanned and not repeated
        with flat.perturbed(5):
            loss_of(model, _batch()).backward()


def test_rho_zero_checks_nothing():
    model = _mlp(["fc1"])
    flat = FlatLora(model, FlatLoraConfig(rho=0.0), total_steps=T)
    model.add_adapter("b", LoraConfig(r=2, target_modules=["fc2"]))
    model.set_adapter("b")
    with flat.perturbed(5):  # plain LoRA by request
        loss_of(model, _batch()).backward()


def test_exclude_modules_none_builds():
    flat = FlatLora(toy_model(), FlatLoraConfig(exclude_modules=None), total_steps=T)
    assert len(flat.targets) == 2
