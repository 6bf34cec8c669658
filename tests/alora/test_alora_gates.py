"""Gated PEFT LoRA layers: the forward, PEFT's merge and Flat-LoRA's noise all see W0 + s B diag(g) A, and the
export is a plain PEFT adapter with the gated model's outputs.

References are written here from the parameters (no flatlora.alora code): ``W = W0 + s * (B * g) @ A`` per
layer, a functional forward of the toy MLP at that weight (plus the materialised Flat-LoRA noise), and the
PEFT model rebuilt from the exported folder by ``PeftModel.from_pretrained`` alone.
"""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model

from kit.adapters import randomize_lora
from kit.models import ToyMLP, batch_for, loss_of
from flatlora import FlatLora, FlatLoraConfig
from flatlora.alora import attach_gates, detach_gates, export_adapter, gated_layers
from flatlora.alora.gates import gate_of

R = 4
GATES = {"fc1": [1.0, 0.0, 1.0, 0.0], "fc2": [0.0, 1.0, 1.0, 1.0]}


def _toy(seed=0, **kw):
    torch.manual_seed(seed)
    model = get_peft_model(ToyMLP(), LoraConfig(r=R, lora_alpha=8, target_modules=["fc1", "fc2"], **kw))
    randomize_lora(model, seed + 1, std=0.3)
    return model


def _set_gates(model, gates):
    attach_gates(model, init_rank=1)
    for name, m in gated_layers(model):
        gate_of(m).copy_(torch.tensor(gates[name.rsplit(".", 1)[-1]]))


def _reference_weights(model, gates):
    """W0 + s * B diag(g) A of fc1 and fc2, from the parameters, plus the biases."""
    out = {}
    for name in ("fc1", "fc2"):
        layer = model.base_model.model.get_submodule(name)
        a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        g = torch.tensor(gates[name])
        w = layer.base_layer.weight.detach() + (8 / R) * (b * g) @ a
        out[name] = (w, layer.base_layer.bias.detach())
    return out


def _forward(weights, x, labels, noise=None):
    noise = noise or {}
    h = F.gelu(F.linear(x, weights["fc1"][0] + noise.get("fc1", 0), weights["fc1"][1]))
    logits = F.linear(h, weights["fc2"][0] + noise.get("fc2", 0), weights["fc2"][1])
    return F.cross_entropy(logits, labels)


def test_forward_merge_and_delta_are_the_gated_weight():
    model = _toy()
    _set_gates(model, GATES)
    ref = _reference_weights(model, GATES)
    batch = batch_for("mlp", n=8)
    with torch.no_grad():
        got = loss_of(model, batch)
        ungated = _forward(_reference_weights(model, {k: [1.0] * R for k in GATES}), batch["x"], batch["labels"])
    want = _forward(ref, batch["x"], batch["labels"])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert abs(float(ungated - want)) > 1e-3  # the gates matter: the check can fail
    for name, m in gated_layers(model):
        short = name.rsplit(".", 1)[-1]
        torch.testing.assert_close(m.base_layer.weight + m.get_delta_weight("default"), ref[short][0])
    merged = copy.deepcopy(model).merge_and_unload()  # PEFT's merge goes through the gated delta
    for short in GATES:
        torch.testing.assert_close(merged.get_submodule(short).weight, ref[short][0], rtol=1e-6, atol=1e-6)
    detach_gates(model)  # back to plain LoRA: every slot acts again
    with torch.no_grad():
        torch.testing.assert_close(loss_of(model, batch), ungated, rtol=1e-6, atol=1e-6)


def test_flat_lora_step_on_a_gated_model_is_the_forward_at_gated_w_plus_e():
    model = _toy(seed=2)
    _set_gates(model, GATES)
    ref = _reference_weights(model, GATES)
    flat = FlatLora(model, FlatLoraConfig(rho=0.3, seed=5), total_steps=10)
    t = 7
    sigma = 0.3 * (1 - math.cos(math.pi * t / 10)) / 2
    specs = dict((target.name.rsplit(".", 1)[-1], spec) for target, spec in flat.noise_specs(t))
    for short, (w, _) in ref.items():  # the noise is scaled from the gated merged weight
        torch.testing.assert_close(specs[short].scale, sigma * w.norm(dim=1) / math.sqrt(w.shape[1]), rtol=1e-5,
                                   atol=0)
    ungated = _reference_weights(model, {k: [1.0] * R for k in GATES})["fc2"][0]
    assert not torch.allclose(specs["fc2"].scale, sigma * ungated.norm(dim=1) / math.sqrt(ungated.shape[1]),
                              rtol=1e-3)
    noise = {k.rsplit(".", 1)[-1]: e for k, e in flat.noise(t).items()}
    batch = batch_for("mlp", seed=3, n=8)
    model.zero_grad()
    with flat.perturbed(t):
        loss = loss_of(model, batch)
        loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # independent: the same loss as a function of A and B, at W(A, B, g) + E
    leaves, weights = {}, {}
    for short in GATES:
        layer = model.base_model.model.get_submodule(short)
        a = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)
        b = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)
        leaves[short] = (a, b)
        w = layer.base_layer.weight.detach() + (8 / R) * (b * torch.tensor(GATES[short])) @ a
        weights[short] = (w, layer.base_layer.bias.detach())
    want = _forward(weights, batch["x"], batch["labels"], noise)
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    clean = _forward(ref, batch["x"], batch["labels"])
    assert abs(float(clean - want.detach())) > 1e-4  # the noise changed the loss: the comparison can fail
    for short, (a, b) in leaves.items():
        prefix = f"base_model.model.{short}"
        torch.testing.assert_close(got[f"{prefix}.lora_A.default.weight"], a.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got[f"{prefix}.lora_B.default.weight"], b.grad, rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(got[f"base_model.model.fc1.lora_B.default.weight"][:, 1]) == 0  # closed slot


def _bert(r=R):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                     max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def test_export_is_a_plain_peft_adapter_with_the_gated_outputs(tmp_path):
    model = get_peft_model(_bert(), LoraConfig(r=R, lora_alpha=8, target_modules=["query", "value"],
                                               task_type="SEQ_CLS"))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or "classifier" in n and p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    attach_gates(model, init_rank=2)
    layers = dict(gated_layers(model))
    names = sorted(layers)
    plan = {names[0]: [0, 0, 0, 0], names[1]: [1, 0, 1, 1], names[2]: [0, 0, 0, 1], names[3]: [1, 1, 0, 0]}
    for name, g in plan.items():
        gate_of(layers[name]).copy_(torch.tensor(g, dtype=torch.float32))
    model.eval()
    batch = batch_for("bert", seed=4, n=6)
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"]).logits
    ranks = export_adapter(model, tmp_path / "adapter")
    strip = lambda n: n.removeprefix("base_model.model.")  # noqa: E731
    assert ranks == {strip(names[1]): 3, strip(names[2]): 1, strip(names[3]): 2}
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and sorted(cfg["target_modules"]) == sorted(ranks)
    loaded = PeftModel.from_pretrained(_bert(), str(tmp_path / "adapter")).eval()
    for name, r in ranks.items():  # plain lora.Linear layers with the exported ranks and the gated scaling 8/4
        layer = loaded.base_model.model.get_submodule(name)
        assert type(layer).__name__ == "Linear" and layer.r["default"] == r
        assert layer.scaling["default"] == pytest.approx(2.0)
    dropped = loaded.base_model.model.get_submodule(strip(names[0]))
    assert not hasattr(dropped, "lora_A")  # all its ranks closed: not in the adapter
    with torch.no_grad():
        got = loaded(input_ids=batch["input_ids"]).logits
        ungated = copy.deepcopy(model)
        detach_gates(ungated)
        other = ungated(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (other - want).abs().max() > 1e-3  # the closed ranks matter: the comparison can fail
    assert model.peft_config["default"].r == R  # the live model's config is untouched


def test_bad_layers_and_ranks_are_value_errors():
    with pytest.raises(ValueError, match="init_rank=5 exceeds the rank r=4"):
        attach_gates(_toy(), init_rank=5)
    with pytest.raises(ValueError, match="init_rank=0 must be a positive int"):
        attach_gates(_toy(), init_rank=0)
    with pytest.raises(ValueError, match="DoRA|LoRA variant"):
        attach_gates(_toy(use_dora=True), init_rank=2)
    with pytest.raises(ValueError, match="no PEFT LoRA layer"):
        attach_gates(ToyMLP(), init_rank=2)
    model = _toy()
    attach_gates(model, init_rank=2)
    with pytest.raises(ValueError, match="already gated"):
        attach_gates(model, init_rank=2)
    with pytest.raises(ValueError, match="no layer gated"):
        export_adapter(_toy(), "unused")
