"""The engine against independent references: explicit forwards at W + E, hand-computed noise scales."""

import math

import pytest
import torch

from flatlora import FlatLora, FlatLoraConfig
from kit.compare import base_state, lora_grads
from kit.models import MODELS, ToyMLP, batch_for, loss_of, toy_model
from kit.references import with_base_at

T = 10


def _swapped(model) -> list[str]:
    """Modules whose forward is overridden on the instance, or that carry forward hooks."""
    return [n for n, m in model.named_modules() if "forward" in m.__dict__ or m._forward_hooks]


def test_targets_are_the_lora_layers(model_kind):
    model = MODELS[model_kind]()
    flat = FlatLora(model, FlatLoraConfig(), total_steps=T)
    lora_names = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert flat.targets == lora_names and len(lora_names) > 0
    assert all(t.transposed == (model_kind == "gpt2") for t in flat.target_layers)


def test_noise_scale_is_computed_from_the_merged_weight(model_kind):
    model = MODELS[model_kind]()
    flat = FlatLora(model, FlatLoraConfig(rho=0.3), total_steps=T)
    sigma = flat.sigma(7)
    for target, spec in flat.noise_specs(7):
        m = target.module
        w0 = m.base_layer.weight.detach()
        w0 = w0.t() if model_kind == "gpt2" else w0  # Conv1D stores (in, out)
        w = w0 + m.lora_B["default"].weight @ m.lora_A["default"].weight * m.scaling["default"]
        expected = sigma * w.norm(dim=1) / math.sqrt(w.shape[1])
        assert spec.shape == tuple(w.shape)
        torch.testing.assert_close(spec.scale, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("mode", ["exact", "inplace"])
def test_gradients_equal_an_explicit_forward_at_w_plus_e(model_kind, mode):
    model = MODELS[model_kind]().eval()
    batch = batch_for(model_kind)
    flat = FlatLora(model, FlatLoraConfig(rho=0.5, mode=mode, seed=3), total_steps=T)
    noise = flat.noise(T)
    ref = with_base_at(model, noise)
    ref_loss = loss_of(ref, batch)
    ref_loss.backward()
    loss_of(model, batch).backward()
    clean = lora_grads(model)
    model.zero_grad()
    with flat.perturbed(T):
        loss = loss_of(model, batch)
        loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    got, want = lora_grads(model), lora_grads(ref)
    assert got.keys() == want.keys() and len(got) > 0
    # the noise must move the gradients well beyond the tolerance, or this test could not fail
    assert max(((want[k] - clean[k]).norm() / want[k].norm()).item() for k in want) > 1e-2
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_exact_and_inplace_draw_the_same_noise(model_kind):
    model = MODELS[model_kind]()
    exact = FlatLora(model, FlatLoraConfig(mode="exact", seed=9), total_steps=T).noise(4)
    inplace = FlatLora(model, FlatLoraConfig(mode="inplace", seed=9), total_steps=T).noise(4)
    assert exact.keys() == inplace.keys()
    assert all(torch.equal(exact[k], inplace[k]) for k in exact)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_exact_mode_keeps_base_weights_bit_identical_for_1000_steps(dtype):
    model = toy_model(dtype=dtype)
    before = base_state(model)
    batch = {"x": torch.randn(4, 16).to(dtype), "labels": torch.tensor([0, 1, 2, 3])}
    clean = model(**batch)["logits"].detach()
    flat = FlatLora(model, FlatLoraConfig(rho=0.05, mode="exact", schedule="constant"), total_steps=1000)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for t in range(1, 1001):
        with flat.perturbed(t):
            loss_of(model, batch).backward()
        opt.step()
        opt.zero_grad()
    after = base_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert _swapped(model) == []
    assert model(**batch)["logits"].dtype == clean.dtype


def test_inplace_fp32_restores_within_rounding():
    model = toy_model()
    before = base_state(model)
    flat = FlatLora(model, FlatLoraConfig(rho=0.05, mode="inplace", schedule="constant"), total_steps=1000)
    for t in range(1, 1001):
        flat.perturb(t)
        flat.restore()
    for k in before:
        err = (base_state(model)[k] - before[k]).norm() / before[k].norm()
        assert err < 1e-5, (k, err.item())


@pytest.mark.parametrize("mode", ["exact", "inplace"])
@pytest.mark.parametrize("where", ["forward", "backward"])
def test_an_exception_inside_the_context_restores_the_model(mode, where):
    model = toy_model().eval()
    batch = batch_for("mlp")
    before, clean = base_state(model), model(**batch)["logits"].detach()
    flat = FlatLora(model, FlatLoraConfig(rho=0.5, mode=mode), total_steps=T)
    with pytest.raises(RuntimeError, match="boom"):
        with flat.perturbed(T):
            loss = loss_of(model, batch)
            if where == "forward":
                raise RuntimeError("boom")

            def explode(grad):
                raise RuntimeError("boom")

            loss.register_hook(explode)
            loss.backward()
    assert not flat.is_perturbed and _swapped(model) == []
    after = base_state(model)
    same = torch.equal if mode == "exact" else lambda a, b: torch.allclose(a, b, rtol=0, atol=1e-6)
    assert all(same(before[k], after[k]) for k in before)
    torch.testing.assert_close(model(**batch)["logits"], clean, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["exact", "inplace"])
def test_every_micro_batch_of_a_step_sees_the_same_noise(mode):
    model = toy_model().eval()
    flat = FlatLora(model, FlatLoraConfig(rho=0.5, mode=mode, schedule="constant"), total_steps=T)
    x1, x2 = torch.randn(3, 16), torch.randn(5, 16)
    outputs = {}
    for t in (4, 5):
        ref = with_base_at(model, flat.noise(t))
        with flat.perturbed(t):
            for i, x in enumerate((x1, x2, x1)):
                outputs[t, i] = model(x)["logits"].detach()
        for i, x in enumerate((x1, x2, x1)):
            torch.testing.assert_close(outputs[t, i], ref(x)["logits"], rtol=1e-5, atol=1e-6)
    assert torch.equal(outputs[4, 0], outputs[4, 2])
    assert not torch.allclose(outputs[4, 0], outputs[5, 0])  # a new step draws a new E


def _train(seed: int, rho: float = 0.3, mode: str = "exact") -> dict[str, torch.Tensor]:
    model = toy_model(seed=0)
    flat = FlatLora(model, FlatLoraConfig(rho=rho, seed=seed, mode=mode), total_steps=6)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 16, generator=gen), torch.randint(0, 4, (4,), generator=gen)) for _ in range(12)]
    for t in range(1, 7):
        with flat.perturbed(t):
            for x, y in data[2 * (t - 1): 2 * t]:  # gradient accumulation over 2 micro-batches
                (loss_of(model, {"x": x, "labels": y}) / 2).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def test_same_seed_same_adapters_different_seed_different_adapters():
    a, b, c, plain = _train(0), _train(0), _train(1), _train(0, rho=0.0)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert any(not torch.equal(a[k], plain[k]) for k in a)


def test_exact_and_inplace_train_the_same_adapters():
    exact, inplace = _train(0, mode="exact"), _train(0, mode="inplace")
    for k in exact:
        torch.testing.assert_close(exact[k], inplace[k], rtol=1e-4, atol=1e-6)


def test_global_rng_is_untouched():
    model = toy_model().eval()
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)
    state = torch.random.get_rng_state()
    with flat.perturbed(5):
        loss_of(model, batch_for("mlp")).backward()
    assert torch.equal(torch.random.get_rng_state(), state)


def test_sigma_zero_changes_nothing():
    model = toy_model().eval()
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)
    x = torch.randn(2, 16)
    clean = model(x)["logits"]
    with flat.perturbed(0):
        assert _swapped(model) == []
        assert torch.equal(model(x)["logits"], clean)


def test_bf16_autocast_training_step_matches_the_reference():
    model = toy_model().eval()
    batch = batch_for("mlp")
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)
    ref = with_base_at(model, flat.noise(T))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss = loss_of(ref, batch)
    ref_loss.backward()
    with flat.perturbed(T), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(model, batch)
    loss.backward()  # outside the context: backward needs only the seed, not the swapped forward
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-2)
    for name, g in lora_grads(ref).items():
        torch.testing.assert_close(lora_grads(model)[name], g, rtol=5e-2, atol=5e-3)


def test_target_patterns_narrow_and_widen():
    model = MODELS["bert"]().eval()
    only_query = FlatLora(model, FlatLoraConfig(target_modules=[r"query$"]), total_steps=T)
    assert only_query.targets and all(n.endswith("query") for n in only_query.targets)
    no_layer0 = FlatLora(model, FlatLoraConfig(exclude_modules=[r"layer\.0\."]), total_steps=T)
    assert no_layer0.targets and not any("layer.0." in n for n in no_layer0.targets)
    widened = FlatLora(model, FlatLoraConfig(rho=0.5, target_modules=["query", "value", "word_embeddings"]),
                       total_steps=T)
    assert widened.targets[0].endswith("word_embeddings") and len(widened.targets) == 5
    batch = batch_for("bert")
    before, clean = base_state(model), loss_of(model, batch).detach()
    with widened.perturbed(T):
        assert not torch.isclose(loss_of(model, batch), clean)
    after = base_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


# --- bad input ------------------------------------------------------------------------------------------
def test_a_model_without_lora_layers_is_refused():
    with pytest.raises(ValueError, match="no PEFT LoRA layers.*get_peft_model"):
        FlatLora(ToyMLP(), FlatLoraConfig(), total_steps=T)


def test_patterns_that_match_nothing_are_refused():
    with pytest.raises(ValueError, match="no layer matches target_modules=\\['nothing'\\]"):
        FlatLora(toy_model(), FlatLoraConfig(target_modules=["nothing"]), total_steps=T)


@pytest.mark.parametrize("steps", [0, -5, 2.5, True])
def test_bad_total_steps(steps):
    with pytest.raises(ValueError, match="total_steps"):
        FlatLora(toy_model(), FlatLoraConfig(), total_steps=steps)


def test_bad_config_type():
    with pytest.raises(ValueError, match="FlatLoraConfig"):
        FlatLora(toy_model(), {"rho": 0.1}, total_steps=T)


@pytest.mark.parametrize("t", [-1, T + 1, 2.0, True, "3"])
def test_bad_step_leaves_the_model_untouched(t):
    model = toy_model()
    before = base_state(model)
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)
    with pytest.raises(ValueError, match="t="):
        with flat.perturbed(t):
            pass
    assert not flat.is_perturbed and _swapped(model) == []
    assert all(torch.equal(before[k], v) for k, v in base_state(model).items())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_inplace_on_a_low_precision_base_is_refused(dtype):
    model = toy_model(dtype=dtype)
    before = base_state(model)
    with pytest.raises(ValueError, match=f"mode='inplace'.*{str(dtype)}.*mode='exact'"):
        FlatLora(model, FlatLoraConfig(mode="inplace"), total_steps=T)
    assert all(torch.equal(before[k], v) for k, v in base_state(model).items())


@pytest.mark.parametrize("mode", ["exact", "inplace"])
def test_nested_contexts_are_refused_and_the_outer_one_still_restores(mode):
    model = toy_model().eval()
    before = base_state(model)
    x = torch.randn(2, 16)
    clean = model(x)["logits"].detach()
    flat = FlatLora(model, FlatLoraConfig(rho=0.5, mode=mode), total_steps=T)
    with flat.perturbed(3):
        noisy = model(x)["logits"].detach()
        with pytest.raises(RuntimeError, match="already perturbed for step 3.*does not nest"):
            with flat.perturbed(4):
                pass
        assert torch.equal(model(x)["logits"], noisy)  # the failed inner call changed nothing
    torch.testing.assert_close(model(x)["logits"], clean, rtol=0, atol=1e-6)
    assert all(torch.allclose(before[k], v, rtol=0, atol=1e-6) for k, v in base_state(model).items())
