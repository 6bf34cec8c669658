"""Initialisations that rewrite the base weight (PiSSA, OLoRA, LoRA-GA, CorDA) or only the factors (EVA):
the noise scale must come from W_base + delta, which at step 0 is the original weight, not from W_base."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from flatlora import FlatLora, FlatLoraConfig
from kit.checks import check_variant
from kit.models import ToyMLP, loss_of, mlp_batch
from kit.references import PREFIX, cosine_sigma, merged_by_peft, row_std

T = 10
LAYERS = ("fc1", "fc2")
# PEFT's LoRA-GA gradient estimate hooks modules whose inputs need no gradient; harmless here
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _calibration(n: int = 4) -> list[dict]:
    return [mlp_batch(seed=100 + i, n=16) for i in range(n)]


def _build(init: str):
    """(peft model, original weights by layer name) for one initialisation, on a fresh ToyMLP."""
    from peft.tuners.lora.config import CordaConfig, EvaConfig, LoraGAConfig

    torch.manual_seed(0)
    base = ToyMLP()
    original = {PREFIX + n: base.get_submodule(n).weight.detach().clone() for n in LAYERS}
    kw = dict(r=2, lora_alpha=4, target_modules=list(LAYERS))
    if init == "lora_ga":
        from peft.tuners.lora.loraga import preprocess_loraga

        cfg = LoraConfig(init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(), **kw)

        def train_step() -> None:  # gradient estimate of the full weights on a few batches
            for batch in _calibration():
                loss_of(base, batch).backward()

        preprocess_loraga(base, cfg, train_step)
        return get_peft_model(base, cfg), original
    if init == "corda":
        from peft.tuners.lora.corda import preprocess_corda

        cfg = LoraConfig(init_lora_weights="corda", corda_config=CordaConfig(corda_method="ipm"), **kw)

        def run_model() -> None:  # activation covariance of the targeted layers
            for batch in _calibration():
                base(batch["x"])

        preprocess_corda(base, cfg, run_model=run_model)
        return get_peft_model(base, cfg), original
    if init == "eva":
        from peft import initialize_lora_eva_weights

        cfg = LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(rho=1.0), **kw)
        model = get_peft_model(base, cfg, low_cpu_mem_usage=True)
        initialize_lora_eva_weights(model, [{"x": b["x"]} for b in _calibration()], prepare_model_inputs_fn=None,
                                    prepare_layer_inputs_fn=None, show_progress_bar=False)
        return model, original
    return get_peft_model(base, LoraConfig(init_lora_weights=init, **kw)), original


REWRITES_BASE = ["pissa", "pissa_niter_2", "olora", "lora_ga", "corda"]


@pytest.mark.parametrize("init", REWRITES_BASE + ["eva"])
def test_noise_scale_at_step_zero_is_that_of_the_original_weight(init):
    model, original = _build(init)
    model.eval()
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)
    assert flat.targets == sorted(original)
    merged = merged_by_peft(model, flat.targets)
    sigma = cosine_sigma(3, T, 0.5)
    for target, spec in flat.noise_specs(3):
        w0 = original[target.name]
        torch.testing.assert_close(merged[target.name], w0, rtol=0, atol=1e-5)  # W_base + delta == W at step 0
        torch.testing.assert_close(spec.scale, row_std(w0, sigma), rtol=1e-4, atol=0)
        base = target.module.base_layer.weight.detach()
        if init in REWRITES_BASE:  # the base alone is a different weight: its norms would give the wrong noise
            assert not torch.allclose(row_std(base, sigma), spec.scale, rtol=1e-2)
        else:  # EVA: B = 0 and A from the activations' right singular vectors (orthonormal rows)
            a = target.module.lora_A["default"].weight.detach()
            torch.testing.assert_close(a @ a.t(), torch.eye(a.shape[0]), rtol=0, atol=1e-4)
            assert torch.equal(base, w0)


@pytest.mark.parametrize("init", REWRITES_BASE + ["eva"])
def test_initialised_adapters_train_at_w_plus_e(init):
    model, _ = _build(init)
    check_variant(model.eval(), mlp_batch(), modes=("exact", "inplace"))


def test_lora_ga_runs_after_preprocessing_without_leftovers():
    model, _ = _build("lora_ga")
    # preprocess_loraga's gradient estimate is consumed by the init: nothing of it stays on the layers
    assert not any(hasattr(m, "_peft_loraga_grad") for m in model.modules())
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert isinstance(model.get_submodule(PREFIX + "fc1").base_layer, nn.Linear)


def test_mica_trains_a_against_a_frozen_minor_component_b():
    torch.manual_seed(0)
    base = ToyMLP()
    original = {PREFIX + n: base.get_submodule(n).weight.detach().clone() for n in LAYERS}
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=list(LAYERS), init_lora_weights="mica"))
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)
    for target, spec in flat.noise_specs(3):  # A = 0: the merged weight is the untouched base
        assert torch.equal(target.module.base_layer.weight, original[target.name])
        torch.testing.assert_close(spec.scale, row_std(original[target.name], cosine_sigma(3, T, 0.5)), rtol=1e-5,
                                   atol=0)
    results = check_variant(model.eval(), mlp_batch(), modes=("exact", "inplace"))
    assert all("lora_A" in k for k in results["exact"][1])  # B is frozen by MiCA
