"""ALoRA on PEFT ``lora.Conv2d`` layers (a 3x3 and a 1x1 conv, as EfficientNet's ``_project_conv``) and on a model
mixing Conv2d and Linear LoRA layers: forward, PEFT's merge, a reallocation round, Flat-LoRA and the export.

References are written here from the parameters (no flatlora.alora code): ``W = W0 + s · Σ_r g_r B[:, r] ⊗ A[r]``
as an einsum over the rank, a functional forward of the net at those weights (``F.conv2d``/``F.linear``, plus
the materialised Flat-LoRA noise), PEFT's own conv ``get_delta_weight`` with the closed columns of ``B``
zeroed, AB-LoRA scores by zeroing columns of ``B`` on ungated copies, and the PEFT model rebuilt from the
exported folder by ``PeftModel.from_pretrained`` alone.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import layer as lora_layer
from torch import nn

from kit.adapters import randomize_lora
from flatlora import FlatLora, FlatLoraConfig
from flatlora.alora import ALoRA, ALoRAConfig, attach_gates, detach_gates, export_adapter, gated_layers
from flatlora.alora.allocator import slot_seed
from flatlora.alora.gates import gate_of

pytestmark = pytest.mark.usefixtures("one_thread")

R, ALPHA = 4, 8
S = ALPHA / R
GATES = {"c3": [1.0, 0.0, 1.0, 0.0], "c1": [0.0, 1.0, 1.0, 1.0], "head": [1.0, 1.0, 0.0, 0.0]}


class ConvNet(nn.Module):
    """c3: 3x3 conv 3 -> 6 (stride 2, padding 1); c1: 1x1 conv 6 -> 8; mean over space; head: Linear 8 -> 4."""

    def __init__(self) -> None:
        super().__init__()
        self.c3 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.c1 = nn.Conv2d(6, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x, labels=None):
        logits = self.head(F.gelu(self.c1(F.gelu(self.c3(x)))).mean(dim=(2, 3)))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def _base(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return ConvNet().to(dtype)


def _net(seed=0, targets=("c3", "c1"), dtype=torch.float32):
    model = get_peft_model(_base(seed, dtype), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(targets)),
                           autocast_adapter_dtype=False)  # the adapter in ``dtype`` too (PEFT: fp32 by default)
    randomize_lora(model, seed + 1, std=0.3)
    return model


def _batch(seed=0, n=6):
    gen = torch.Generator().manual_seed(seed)  # 9x9 -> 5x5 after c3: the rank R=4 is no spatial size
    return {"x": torch.randn(n, 3, 9, 9, generator=gen), "labels": torch.randint(0, 4, (n,), generator=gen)}


def _layer(model, short):
    return model.base_model.model.get_submodule(short)


def _set_gates(model, gates, init_rank=1):
    attach_gates(model, init_rank=init_rank)
    for name, m in gated_layers(model):
        gate_of(m).copy_(torch.tensor(gates[name.rsplit(".", 1)[-1]]))


def _delta(b, a, g):
    """s · Σ_r g_r B[:, r] ⊗ A[r]: B (m, R[, 1, 1]), A (R, c[, kh, kw]) -> (m, c[, kh, kw])."""
    if a.dim() == 4:
        return S * torch.einsum("or,r,rcij->ocij", b[:, :, 0, 0], g, a)
    return S * torch.einsum("or,r,rc->oc", b, g, a)


def _reference_weights(model, gates):
    """(W, bias) per layer: W0 + s B diag(g) A for the LoRA layers, the plain weight for the others."""
    out = {}
    for short in ("c3", "c1", "head"):
        layer = _layer(model, short)
        if not hasattr(layer, "lora_A"):
            out[short] = (layer.weight.detach(), layer.bias.detach())
            continue
        a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        w = layer.base_layer.weight.detach() + _delta(b, a, torch.tensor(gates[short]))
        out[short] = (w, layer.base_layer.bias.detach())
    return out


def _forward(weights, x, labels, noise=None):
    noise = noise or {}
    h = F.gelu(F.conv2d(x, weights["c3"][0] + noise.get("c3", 0), weights["c3"][1], stride=2, padding=1))
    h = F.gelu(F.conv2d(h, weights["c1"][0] + noise.get("c1", 0), weights["c1"][1]))
    logits = F.linear(h.mean(dim=(2, 3)), weights["head"][0] + noise.get("head", 0), weights["head"][1])
    return F.cross_entropy(logits, labels)


def _loss(model, batch):
    return model(**batch)["loss"]


# --- (1) forward, delta, merge ----------------------------------------------------------------------------------
def test_conv_forward_merge_and_delta_are_the_gated_weight():
    model = _net()
    _set_gates(model, GATES)
    ref = _reference_weights(model, GATES)
    batch = _batch()
    with torch.no_grad():
        got = _loss(model, batch)
        ungated = _forward(_reference_weights(model, {k: [1.0] * R for k in GATES}), **batch)
    want = _forward(ref, **batch)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert abs(float(ungated - want)) > 1e-3  # the gates matter: the check can fail
    for short in ("c3", "c1"):
        layer = _layer(model, short)
        assert type(layer).__name__ == "GatedLoraConv2d"
        torch.testing.assert_close(layer.base_layer.weight + layer.get_delta_weight("default"), ref[short][0])
    merged = copy.deepcopy(model).merge_and_unload()  # PEFT's merge goes through the gated delta
    for short in ("c3", "c1"):
        assert type(merged.get_submodule(short)) is nn.Conv2d
        torch.testing.assert_close(merged.get_submodule(short).weight, ref[short][0], rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch)["loss"], want, rtol=1e-5, atol=1e-6)
    detach_gates(model)  # back to plain LoRA: every slot acts again
    assert type(_layer(model, "c1")) is lora_layer.Conv2d
    with torch.no_grad():
        torch.testing.assert_close(_loss(model, batch), ungated, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_conv_delta_is_peft_s_delta_with_the_closed_columns_of_b_zeroed(dtype):
    """Bit for bit PEFT's own Conv2d.get_delta_weight (its 1x1 matmul and its kxk conv route, and its fp32
    product of bf16 factors on the CPU) on a copy whose closed columns of B are zero."""
    model = _net(dtype=dtype)
    _set_gates(model, GATES)
    for short in ("c3", "c1"):  # not a power of two: scaling a bf16 product would round twice
        _layer(model, short).scaling["default"] = 1.7
    plain = copy.deepcopy(model)
    detach_gates(plain)
    with torch.no_grad():
        for short in ("c3", "c1"):
            b = _layer(plain, short).lora_B["default"].weight
            b[:, [i for i, g in enumerate(GATES[short]) if g == 0]] = 0
    for short in ("c3", "c1"):
        got = _layer(model, short).get_delta_weight("default")
        want = _layer(plain, short).get_delta_weight("default")
        assert got.dtype == dtype and torch.equal(got, want), short
        assert torch.count_nonzero(got) > 0


# --- (2) a reallocation round -------------------------------------------------------------------------------
def _ab_scores_reference(model, batch):
    """AB-LoRA by its definition on ungated copies: zero the columns of B of the closed and ablated slots,
    S = -loss. {(module, slot): IS} over the open slots."""
    open_ = {n.rsplit(".", 1)[-1]: (gate_of(m) != 0).nonzero().flatten().tolist() for n, m in gated_layers(model)}
    everything = {(n, i) for n, slots in open_.items() for i in slots}

    def score(keep):
        ref = copy.deepcopy(model)
        detach_gates(ref)
        with torch.no_grad():
            for short in open_:
                b = _layer(ref, short).lora_B["default"].weight
                for i in range(b.shape[1]):
                    if (short, i) not in keep:
                        b[:, i] = 0
            return -float(_loss(ref.eval(), batch))

    full = score(everything)
    return {r: full - score(everything - {r}) + score({r}) for r in everything}


@pytest.mark.parametrize("seed, receiver", [(3, "c1"), (7, "c3")])  # the 1x1 conv receives, then the 3x3 one
def test_conv_round_prunes_the_lowest_score_and_reopens_a_fresh_slot(seed, receiver):
    model = _net(seed=seed)
    held_out, batch = _batch(seed=10, n=16), _batch(seed=11, n=16)
    cfg = ALoRAConfig(init_rank=2, warmup_steps=1, interval_steps=1, rounds=1, ranks_per_round=1, seed=9)
    alora = ALoRA(model, cfg, [held_out])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _loss(model, batch).backward()
    opt.step()
    scores = _ab_scores_reference(model, held_out)
    assert len({round(v, 7) for v in scores.values()}) == 4  # distinct: the lowest is well defined
    lowest = min(scores, key=scores.get)
    other = ({"c3", "c1"} - {lowest[0]}).pop()
    assert other == receiver  # (the seeds are picked for it: both kernels' re-initialisation is checked)
    report = alora.update(1, opt)
    short = lambda pairs: [(n.rsplit(".", 1)[-1], i) for n, i in pairs]  # noqa: E731
    assert short(report.pruned) == [lowest]
    assert short(report.opened) == [(other, 2)]  # the unpruned module's first reserve slot
    assert {k.rsplit(".", 1)[-1]: v for k, v in alora.ranks().items()} == {lowest[0]: 1, other: 3}
    layer = _layer(model, other)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = [n.rsplit(".", 1)[-1] for n in alora.names].index(other)
    fan_in = a.shape[1] * a.shape[2] * a.shape[3]  # c * kh * kw: PEFT's kaiming_uniform_(a=sqrt(5)) bound
    gen = torch.Generator().manual_seed(slot_seed(9, 0, m, 2))
    want = ((torch.rand(fan_in, generator=gen, dtype=torch.float64) * 2 - 1) / math.sqrt(fan_in)).float()
    torch.testing.assert_close(a[2].detach(), want.view(a.shape[1:]), rtol=0, atol=0)
    assert torch.count_nonzero(b[:, 2]) == 0 and gate_of(layer)[2] == 1
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.count_nonzero(opt.state[a][key][2]) == 0 and torch.count_nonzero(opt.state[b][key][:, 2]) == 0
        assert torch.count_nonzero(opt.state[a][key][0]) > 0 and torch.count_nonzero(opt.state[b][key][:, 0]) > 0
    # opening (B column 0) changes no output: the model equals a copy with the opened slot closed again
    ref = copy.deepcopy(model)
    gate_of(_layer(ref, other))[2] = 0.0
    with torch.no_grad():
        torch.testing.assert_close(model(**batch)["logits"], ref(**batch)["logits"], rtol=0, atol=0)
    # the next step moves the reopened (m, 1, 1) column of B as a fresh Adam moves it
    opt.zero_grad()
    _loss(model, batch).backward()
    col = nn.Parameter(b.detach()[:, 2].clone())
    col.grad = b.grad[:, 2].clone()
    torch.optim.Adam([col], lr=1e-2).step()
    opt.step()
    assert torch.count_nonzero(col.detach()) > 0
    torch.testing.assert_close(b.detach()[:, 2], col.detach(), rtol=1e-5, atol=1e-8)


# --- (3) Flat-LoRA -----------------------------------------------------------------------------------------------
def test_flat_lora_on_gated_convs_is_scaled_from_the_gated_weight_and_restores_bit_exactly():
    model = _net(seed=2)
    _set_gates(model, GATES)
    ref = _reference_weights(model, GATES)
    flat = FlatLora(model, FlatLoraConfig(rho=0.3, seed=5), total_steps=10)
    t = 7
    sigma = 0.3 * (1 - math.cos(math.pi * t / 10)) / 2
    specs = {target.name.rsplit(".", 1)[-1]: spec for target, spec in flat.noise_specs(t)}
    assert sorted(specs) == ["c1", "c3"]
    for short in ("c3", "c1"):  # row i = output filter i, n = c * kh * kw
        w = ref[short][0].reshape(ref[short][0].shape[0], -1)
        torch.testing.assert_close(specs[short].scale, sigma * w.norm(dim=1) / math.sqrt(w.shape[1]), rtol=1e-5,
                                   atol=0)
    ungated = _reference_weights(model, {k: [1.0] * R for k in GATES})["c1"][0].flatten(1)
    assert not torch.allclose(specs["c1"].scale, sigma * ungated.norm(dim=1) / math.sqrt(ungated.shape[1]),
                              rtol=1e-3)
    noise = {k.rsplit(".", 1)[-1]: e for k, e in flat.noise(t).items()}
    batch = _batch(seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gates_before = [gate_of(m).clone() for _, m in gated_layers(model)]
    with flat.perturbed(t):
        loss = _loss(model, batch)
        loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # independent: the same loss as a function of A and B, at W(A, B, g) + E
    leaves, weights = {}, dict(ref)
    for short in ("c3", "c1"):
        layer = _layer(model, short)
        a = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)
        b = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)
        leaves[short] = (a, b)
        weights[short] = (layer.base_layer.weight.detach() + _delta(b, a, torch.tensor(GATES[short])),
                          layer.base_layer.bias.detach())
    want = _forward(weights, batch["x"], batch["labels"], noise)
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    assert abs(float(_forward(ref, **batch) - want.detach())) > 1e-4  # the noise changed the loss
    for short, (a, b) in leaves.items():
        prefix = f"base_model.model.{short}"
        torch.testing.assert_close(got[f"{prefix}.lora_A.default.weight"], a.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got[f"{prefix}.lora_B.default.weight"], b.grad, rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(got["base_model.model.c3.lora_B.default.weight"][:, 1]) == 0  # closed slot
    assert torch.count_nonzero(got["base_model.model.c3.lora_A.default.weight"][1]) == 0
    # the model is back at W bit for bit, also after a body that raised
    with pytest.raises(RuntimeError, match="boom"):
        with flat.perturbed(t):
            _loss(model, batch)
            raise RuntimeError("boom")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(g, gate_of(m)) for g, (_, m) in zip(gates_before, gated_layers(model)))


# --- (4) export --------------------------------------------------------------------------------------------------
def test_conv_export_loads_with_peft_alone_and_gives_the_gated_outputs(tmp_path):
    model = _net(seed=4)
    gates = {"c3": [1.0, 0.0, 0.5, 2.0], "c1": [0.0] * R}  # gates other than 1 are folded into B' (per slot)
    _set_gates(model, gates)
    model.eval()
    batch = _batch(seed=5)
    with torch.no_grad():
        want = model(**batch)["logits"]
        ungated = copy.deepcopy(model)
        detach_gates(ungated)
        other = ungated(**batch)["logits"]
    assert export_adapter(model, tmp_path / "adapter") == {"c3": 3}
    loaded = PeftModel.from_pretrained(_base(seed=4), str(tmp_path / "adapter")).eval()
    c3 = _layer(loaded, "c3")
    assert type(c3) is lora_layer.Conv2d and c3.r["default"] == 3 and c3.scaling["default"] == pytest.approx(S)
    assert c3.lora_A["default"].weight.shape == (3, 3, 3, 3) and c3.lora_B["default"].weight.shape == (6, 3, 1, 1)
    assert not hasattr(_layer(loaded, "c1"), "lora_A")  # all its ranks closed: not in the adapter
    with torch.no_grad():
        got = loaded(**batch)["logits"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (other - want).abs().max() > 1e-3  # the closed ranks matter: the comparison can fail
    torch.testing.assert_close(_forward(_reference_weights(model, gates), **batch),
                               F.cross_entropy(got, batch["labels"]), rtol=1e-5, atol=1e-6)


# --- (5) Linear + Conv2d in one model ----------------------------------------------------------------------------
def test_a_model_mixing_conv_and_linear_lora_layers(tmp_path):
    model = _net(seed=6, targets=("c3", "c1", "head"))
    _set_gates(model, GATES)
    assert {n.rsplit(".", 1)[-1]: type(m).__name__ for n, m in gated_layers(model)} == {
        "c3": "GatedLoraConv2d", "c1": "GatedLoraConv2d", "head": "GatedLoraLinear"}
    batch = _batch(seed=7)
    ref = _reference_weights(model, GATES)
    flat = FlatLora(model, FlatLoraConfig(rho=0.3, seed=1), total_steps=10)
    sigma = flat.sigma(5)
    for target, spec in flat.noise_specs(5):
        w = ref[target.name.rsplit(".", 1)[-1]][0].flatten(1)
        torch.testing.assert_close(spec.scale, sigma * w.norm(dim=1) / math.sqrt(w.shape[1]), rtol=1e-5, atol=0)
    model.eval()
    with torch.no_grad():
        got = model(**batch)
        torch.testing.assert_close(got["loss"], _forward(ref, **batch), rtol=1e-6, atol=1e-6)
    ranks = export_adapter(model, tmp_path / "adapter")
    assert ranks == {"c3": 2, "c1": 3, "head": 2}
    loaded = PeftModel.from_pretrained(_base(seed=6), str(tmp_path / "adapter")).eval()
    assert [type(_layer(loaded, s)) for s in ("c3", "c1", "head")] == [lora_layer.Conv2d, lora_layer.Conv2d,
                                                                         lora_layer.Linear]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch)["logits"], got["logits"], rtol=1e-5, atol=1e-6)
    # a round on the mixed model keeps the budget (2 + 3 + 2) and moves ranks_per_round = 3 (three module names)
    alora = ALoRA(_net(seed=6, targets=("c3", "c1", "head")), ALoRAConfig(init_rank=2, warmup_steps=1,
                                                                          interval_steps=1, rounds=1), [batch])
    report = alora.update(1)
    assert len(report.pruned) == len(report.opened) == 3 and sum(alora.ranks().values()) == 6


def test_conv_layers_alora_cannot_gate_are_value_errors():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="groups > 1"):  # PEFT's own: it cannot merge them
        grouped = get_peft_model(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)),
                                 LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["0"]))
    with pytest.raises(ValueError, match="groups=2"):
        attach_gates(grouped, init_rank=2)
    conv1d = get_peft_model(nn.Sequential(nn.Conv1d(4, 4, 3)), LoraConfig(r=R, lora_alpha=ALPHA,
                                                                          target_modules=["0"]))
    with pytest.raises(ValueError, match="'base_model.model.0' is a Conv1d"):
        attach_gates(conv1d, init_rank=2)
    assert not gated_layers(grouped) and not gated_layers(conv1d)  # nothing was gated
    with pytest.raises(ValueError, match="DoRA|LoRA variant"):
        attach_gates(get_peft_model(_base(), LoraConfig(r=R, target_modules=["c1"], use_dora=True)), init_rank=2)
