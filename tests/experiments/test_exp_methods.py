"""The gradient rules of the compared methods against independent functional references."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kit.adapters import randomize_lora
from flatlora.experiments.methods import METHODS, Method, get_method, paired_baseline, seeded


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def _model(seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(Tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]))
    randomize_lora(model, seed, std=0.3)
    return model


def _loss(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["labels"])


def _batch():
    gen = torch.Generator().manual_seed(5)
    return {"x": torch.randn(8, 16, generator=gen), "labels": torch.randint(0, 4, (8,), generator=gen)}


def _parts(model):
    """Base weights, biases, A, B, scaling of fc1, fc2 (detached copies)."""
    out = {}
    for name in ("fc1", "fc2"):
        layer = model.base_model.model.get_submodule(name)
        out[name] = dict(W0=layer.base_layer.weight.detach().clone(), b=layer.base_layer.bias.detach().clone(),
                         A=layer.lora_A["default"].weight.detach().clone(),
                         B=layer.lora_B["default"].weight.detach().clone(), s=layer.scaling["default"])
    return out


def _functional_loss(parts, batch, extra=None, dA=None, dB=None):
    """Loss with W = W0 + extra + s (B + dB)(A + dA), a second implementation of the forward pass."""
    h = batch["x"]
    for i, name in enumerate(("fc1", "fc2")):
        p = parts[name]
        A = p["A"] + (dA[name] if dA else 0)
        B = p["B"] + (dB[name] if dB else 0)
        W = p["W0"] + (extra[name] if extra else 0) + p["s"] * B @ A
        h = F.linear(h, W, p["b"])
        if i == 0:
            h = F.gelu(h)
    return F.cross_entropy(h, batch["labels"])


def _ref_grads_at(parts, batch, extra=None, dA=None, dB=None):
    A = {k: torch.zeros_like(v["A"], requires_grad=True) for k, v in parts.items()}
    B = {k: torch.zeros_like(v["B"], requires_grad=True) for k, v in parts.items()}
    dA2 = {k: A[k] + (dA[k] if dA else 0) for k in parts}
    dB2 = {k: B[k] + (dB[k] if dB else 0) for k in parts}
    _functional_loss(parts, batch, extra, dA2, dB2).backward()
    return {f"{k}.A": A[k].grad for k in parts} | {f"{k}.B": B[k].grad for k in parts}


def _run(method, rho=0.05, sam_rho=0.003, sam_w_rho=0.05, t=7):
    model = _model()
    spec = get_method(method)
    runner = Method(spec, model, _loss, total_steps=10, seed=3, rho=rho, sam_rho=sam_rho, sam_w_rho=sam_w_rho)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    runner.grads(t, _batch())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights must be back at W bit for bit"
    got = {}
    for n, p in model.named_parameters():
        if "lora_" in n:
            layer = "fc1" if ".fc1." in n else "fc2"
            got[f"{layer}.{'A' if 'lora_A' in n else 'B'}"] = p.grad.clone()
    return model, runner, got


def test_sam_w_matches_reference():
    model = _model()
    parts = _parts(model)
    batch = _batch()
    # G = dL/dW of the merged weights, via the functional forward
    G = {k: torch.zeros_like(v["W0"], requires_grad=True) for k, v in parts.items()}
    _functional_loss(parts, batch, extra=G).backward()
    norm = torch.sqrt(sum((G[k].grad ** 2).sum() for k in G))
    extra = {k: 0.05 * G[k].grad / norm for k in G}
    ref = _ref_grads_at(parts, batch, extra=extra)
    _, _, got = _run("sam-w", sam_w_rho=0.05)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6)
    plain = _ref_grads_at(parts, batch)
    assert not torch.allclose(got["fc1.A"], plain["fc1.A"], rtol=1e-3, atol=1e-6)  # the perturbation mattered


def test_lora_sam_matches_reference():
    model = _model()
    parts = _parts(model)
    batch = _batch()
    g = _ref_grads_at(parts, batch)
    norm = torch.sqrt(sum((v ** 2).sum() for v in g.values()))
    rho = 0.2
    dA = {k: rho * g[f"{k}.A"] / norm for k in parts}
    dB = {k: rho * g[f"{k}.B"] / norm for k in parts}
    ref = _ref_grads_at(parts, batch, dA=dA, dB=dB)
    _, _, got = _run("lora-sam", sam_rho=rho)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6)


def test_flat_rule_is_gradient_at_w_plus_public_noise():
    model = _model()
    parts = _parts(model)
    batch = _batch()
    _, runner, got = _run("flat-lora", rho=0.3, t=7)
    noise = runner.flat.noise(7)
    extra = {k: noise[n] for n in noise for k in parts if n.endswith(k)}
    ref = _ref_grads_at(parts, batch, extra=extra)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6)
    assert runner.sigma(7) > 0 and runner.sigma(0) == 0


def test_plain_rule_and_registry():
    parts = _parts(_model())
    ref = _ref_grads_at(parts, _batch())
    _, runner, got = _run("lora")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6)
    assert runner.sigma(5) == 0.0
    assert paired_baseline("flat-lora") == "lora" and paired_baseline("adalora+flat") == "adalora"
    assert paired_baseline("lora") is None and set(METHODS) >= {"lora", "flat-lora", "lora-sam", "sam-w"}
    with pytest.raises(ValueError, match="unknown method"):
        get_method("sam")


def test_seeded_leaves_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with seeded(5):
        a = torch.rand(2)
    assert torch.equal(torch.rand(3), expected)
    with seeded(5):
        assert torch.equal(torch.rand(2), a)
