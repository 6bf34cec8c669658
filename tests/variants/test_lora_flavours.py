"""Plain-LoRA flavours: rsLoRA, several adapters (only the active ones perturbed), merged adapters (perturbed
once, not twice), lora_dropout > 0."""

import copy
import math

import pytest
import torch
from peft import LoraConfig

from flatlora import FlatLora, FlatLoraConfig
from kit.adapters import randomize_adapters
from kit.checks import check_variant
from kit.compare import step_grads
from kit.models import loss_of, mlp_batch, toy
from kit.references import PREFIX, cosine_sigma, merged_by_peft, row_std, with_base_at

T = 10


def _manual_merge(model, adapters, scale_of) -> dict[str, torch.Tensor]:
    """W0 + sum_a scale_of(a) * B_a @ A_a, from the parameters (a third way to the merged weight)."""
    out = {}
    for layer in ("fc1", "fc2"):
        m = model.get_submodule(PREFIX + layer)
        w = m.base_layer.weight.detach().clone()
        for a in adapters:
            if a in m.lora_A:
                w += scale_of(a, m) * m.lora_B[a].weight.detach() @ m.lora_A[a].weight.detach()
        out[PREFIX + layer] = w
    return out


def test_rslora_noise_uses_the_rank_stabilised_scaling():
    model = toy(r=4, lora_alpha=8, use_rslora=True).eval()
    rs = _manual_merge(model, ["default"], lambda a, m: 8 / math.sqrt(4))
    plain = _manual_merge(model, ["default"], lambda a, m: 8 / 4)
    peft_merged = merged_by_peft(model, list(rs))
    for name in rs:
        torch.testing.assert_close(peft_merged[name], rs[name], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(row_std(rs[name], 1.0), row_std(plain[name], 1.0), rtol=1e-3)
    check_variant(model, mlp_batch())


def test_only_the_active_adapter_is_perturbed():
    model = toy()
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=16, target_modules=["fc1"]))
    randomize_adapters(model, seed=1, std=0.3)  # both adapters non-zero, "other" large
    model.eval()
    assert model.active_adapters == ["default"]
    active = _manual_merge(model, ["default"], lambda a, m: m.scaling[a])
    both = _manual_merge(model, ["default", "other"], lambda a, m: m.scaling[a])
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)
    sigma = cosine_sigma(T, T, 0.5)
    for target, spec in flat.noise_specs(T):
        torch.testing.assert_close(spec.scale, row_std(active[target.name], sigma), rtol=1e-5, atol=0)
    assert not torch.allclose(row_std(active[PREFIX + "fc1"], 1), row_std(both[PREFIX + "fc1"], 1), rtol=1e-2)
    results = check_variant(model, mlp_batch())
    assert all(".default." in k for _, grads in results.values() for k in grads)  # "other" gets nothing


def test_several_active_adapters_are_perturbed_as_their_sum():
    model = toy()
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=16, target_modules=["fc1"]))
    randomize_adapters(model, seed=1, std=0.3)
    model.base_model.set_adapter(["default", "other"])
    model.eval()
    both = _manual_merge(model, ["default", "other"], lambda a, m: m.scaling[a])
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)
    sigma = cosine_sigma(T, T, 0.5)
    for target, spec in flat.noise_specs(T):
        torch.testing.assert_close(spec.scale, row_std(both[target.name], sigma), rtol=1e-5, atol=0)
    results = check_variant(model, mlp_batch())
    assert any(".other." in k for k in results["exact"][1]) and any(".default." in k for k in results["exact"][1])


def test_disabled_adapters_compute_the_clean_base():
    """With the adapters disabled (``model.disable_adapter()``: TRL's reference model) the layers compute with
    ``W0`` alone, also inside ``perturbed(t)`` (tests/test_reference_model.py); the noise scale asked for there is
    ``W0``'s. A step in which only such forwards ran perturbed nothing, and is refused."""
    model = toy().eval()
    flat = FlatLora(model, FlatLoraConfig(rho=0.5, seed=2), total_steps=T)
    batch = mlp_batch()
    with model.disable_adapter():
        for target, spec in flat.noise_specs(T):
            w0 = target.module.base_layer.weight.detach()
            torch.testing.assert_close(spec.scale, row_std(w0, cosine_sigma(T, T, 0.5)), rtol=1e-5, atol=0)
        clean = loss_of(model, batch)
        with pytest.raises(RuntimeError, match="none of the 2 layers FlatLora perturbs computed with its noise"):
            with flat.perturbed(T):
                got = loss_of(model, batch)
    assert torch.equal(got, clean)


@pytest.mark.parametrize("mode", ["exact", "inplace"])
def test_a_merged_adapter_is_perturbed_once_not_twice(mode):
    unmerged = toy().eval()
    merged = copy.deepcopy(unmerged)
    merged.merge_adapter()
    w_merged = {n: m.weight.detach().clone() for n, m in merged.named_modules() if n.endswith("base_layer")}
    batch = mlp_batch()
    cfg = FlatLoraConfig(rho=0.5, mode=mode, seed=4)
    flat_u, flat_m = FlatLora(unmerged, cfg, total_steps=T), FlatLora(merged, cfg, total_steps=T)
    assert all(t.active_adapters() == [] for t in flat_m.target_layers)  # the delta lives in the base now
    true_w = merged_by_peft(unmerged, flat_u.targets)
    sigma = cosine_sigma(T, T, 0.5)
    for target, spec in flat_m.noise_specs(T):
        torch.testing.assert_close(spec.scale, row_std(true_w[target.name], sigma), rtol=1e-5, atol=0)
    noise = flat_m.noise(T)
    ref_loss = loss_of(with_base_at(merged, noise), batch)
    with flat_m.perturbed(T):
        loss_m = loss_of(merged, batch)
    with flat_u.perturbed(T):
        loss_u = loss_of(unmerged, batch)
    torch.testing.assert_close(loss_m, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_m, loss_u, rtol=1e-5, atol=1e-6)  # same function at W + E either way
    twice = {k: 2 * e for k, e in noise.items()}  # what perturbing base and merged delta separately would do
    assert not torch.isclose(loss_of(with_base_at(merged, twice), batch), loss_m, rtol=1e-4)
    tol = 0 if mode == "exact" else 1e-6
    for n, m in merged.named_modules():
        if n.endswith("base_layer"):
            torch.testing.assert_close(m.weight, w_merged[n], rtol=0, atol=tol)


def test_lora_dropout_sees_the_same_noise_as_the_reference():
    model = toy(lora_dropout=0.3).train()
    batch = mlp_batch()
    # the dropout masks matter (different RNG states give different gradients), so fixing them is needed
    g1, g2 = step_grads(model, batch, rng=1)[1], step_grads(model, batch, rng=2)[1]
    assert any(not torch.allclose(g1[k], g2[k]) for k in g1)
    check_variant(model, batch, rng=1234)


def test_a_variant_with_another_merged_weight_is_refused_with_the_fix():
    # PEFT's Activated LoRA (alora_invocation_tokens; not the ALoRA of rank allocation) applies the adapter to
    # some tokens only: no single merged weight exists, so Flat-LoRA refuses it and names the way out
    model = toy(alora_invocation_tokens=[1, 2])
    with pytest.raises(ValueError, match=r"ALoraLinearVariant.*exclude_modules"):
        FlatLora(model, FlatLoraConfig(), total_steps=T)


@pytest.mark.parametrize("mode", ["exact", "inplace"])
def test_a_layer_holding_only_inactive_adapters_stays_clean(mode):
    # "default" on fc1, "other" on fc2: with "default" active, fc2 computes like a layer LoRA never touched, so
    # the model must see exactly the noise it would see without the "other" adapter
    model = toy(target_modules=["fc1"])
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["fc2"]))
    randomize_adapters(model, seed=1)
    model.eval()
    flat = FlatLora(model, FlatLoraConfig(rho=0.5, mode=mode, seed=6), total_steps=T)
    assert flat.targets == [PREFIX + "fc1", PREFIX + "fc2"]  # both are LoRA layers (noise index fixed)
    batch = mlp_batch()
    for active, perturbed_layer in (("default", "fc1"), ("other", "fc2")):
        model.set_adapter(active)
        noise = flat.noise(T)
        assert set(noise) == {PREFIX + perturbed_layer}
        before = {k: v.clone() for k, v in model.state_dict().items()}
        ref_loss, want = step_grads(with_base_at(model, noise), batch)
        loss, got = step_grads(model, batch, flat.perturbed(T))
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        assert got.keys() == want.keys() and all(f".{active}." in k for k in got)
        for k in got:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)
        after = model.state_dict()
        assert all(torch.allclose(before[k], after[k], rtol=0, atol=1e-6) for k in before)


def test_a_layer_overriding_get_delta_weight_is_followed_and_merged_weights_carry_no_graph():
    """The merged weight of a plain LoRA layer is one addmm, but only where the layer uses PEFT's own
    ``get_delta_weight``: a subclass with a per-rank gate in its delta (docs/variants.md) gets its own delta,
    checked against ``W0 + s * B diag(gate) A`` from the parameters. Neither path builds an autograd graph."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    from flatlora.targets import find_targets

    gate = torch.tensor([1.0, 0.0, 0.5, 1.0])

    class GatedLinear(LoraLinear):
        def get_delta_weight(self, adapter):
            b, a = self.lora_B[adapter].weight, self.lora_A[adapter].weight
            return (b * gate) @ a * self.scaling[adapter]

    model = toy(r=4, lora_alpha=8)
    fc1 = model.get_submodule(PREFIX + "fc1")
    fc1.__class__ = GatedLinear
    targets = {t.name: t for t in find_targets(model)}
    plain = _manual_merge(model, ["default"], lambda a, m: 2.0)
    b, a = fc1.lora_B["default"].weight.detach(), fc1.lora_A["default"].weight.detach()
    gated = fc1.base_layer.weight.detach() + 2.0 * (b * gate) @ a
    for name, want in ((PREFIX + "fc1", gated), (PREFIX + "fc2", plain[PREFIX + "fc2"])):
        got = targets[name].merged_weight()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert not got.requires_grad and got.grad_fn is None
    assert not torch.allclose(gated, plain[PREFIX + "fc1"], rtol=1e-3)  # the gate matters


def test_the_exact_mode_runs_without_bitsandbytes(monkeypatch):
    """The core install has no bitsandbytes, and peft's lora/bnb.py imports it unguarded (peft 0.18 and 0.21):
    the merged weights and the noise come out as with it."""
    import sys

    import peft.tuners.lora

    from flatlora import targets

    model = toy()
    with_bnb = FlatLora(model, FlatLoraConfig(rho=0.1), total_steps=T).noise(T)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    monkeypatch.delitem(sys.modules, "peft.tuners.lora.bnb", raising=False)
    monkeypatch.delattr(peft.tuners.lora, "bnb", raising=False)
    without = FlatLora(model, FlatLoraConfig(rho=0.1), total_steps=T).noise(T)
    assert targets._stock_linear_deltas() == frozenset({peft.tuners.lora.layer.Linear.get_delta_weight})
    assert with_bnb.keys() == without.keys()
    for name in with_bnb:
        torch.testing.assert_close(without[name], with_bnb[name], rtol=0, atol=0)
