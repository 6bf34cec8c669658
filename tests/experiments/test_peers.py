"""Bi-LoRA and EFlat-LoRA as `flatlora compare` rules, each step against a literal reference of the paper's
update written here from its equations (a functional two-layer network, no flatlora code), with plain SGD so
that the update is exactly the paper's ``theta <- theta -/+ eta * gradient``."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatlora.experiments import peers
from flatlora.experiments.adapters import build_peft_model
from flatlora.experiments.methods import METHODS, Method, get_method, paired_baseline

LR, STEPS = 0.4, 4


pytestmark = pytest.mark.usefixtures("one_thread")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 10)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _loss(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["labels"])


def _batches():
    gen = torch.Generator().manual_seed(11)
    return [{"x": torch.randn(16, 12, generator=gen), "labels": torch.randint(0, 3, (16,), generator=gen)}
            for _ in range(STEPS)]


def _model(aux=False):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(Tiny(), LoraConfig(r=3, lora_alpha=6, target_modules=["fc1", "fc2"]))
    if aux:
        peers.add_auxiliary_adapter(model, rank=2)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # both adapters away from zero, so every term of every update is exercised
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
    return model


def _snapshot(model):
    """{layer: dict(W0, b, A1, B1, s1[, A2, B2, s2])} as plain tensors."""
    out = {}
    for name in ("fc1", "fc2"):
        m = model.base_model.model.get_submodule(name)
        d = dict(W0=m.base_layer.weight.detach().clone(), b=m.base_layer.bias.detach().clone(),
                 A1=m.lora_A["default"].weight.detach().clone(), B1=m.lora_B["default"].weight.detach().clone(),
                 s1=m.scaling["default"])
        if peers.BI_LORA_AUX in m.lora_A:
            d.update(A2=m.lora_A[peers.BI_LORA_AUX].weight.detach().clone(),
                     B2=m.lora_B[peers.BI_LORA_AUX].weight.detach().clone(), s2=m.scaling[peers.BI_LORA_AUX])
        out[name] = d
    return out


def _functional(p, batch, dB=None):
    """Loss of the two-layer network at W = W0 + s1 B1 A1 (+ s2 B2 A2) (+ s1 dB A1 for EFlat's perturbation)."""
    h = batch["x"]
    for i, name in enumerate(("fc1", "fc2")):
        q = p[name]
        w = q["W0"] + q["s1"] * (q["B1"] + (dB[name] if dB else 0)) @ q["A1"]
        if "A2" in q:
            w = w + q["s2"] * q["B2"] @ q["A2"]
        h = F.linear(h, w, q["b"])
        if i == 0:
            h = torch.tanh(h)
    return F.cross_entropy(h, batch["labels"])


def _grads(p, batch, keys, dB=None):
    leaves = {n: {k: (v.clone().requires_grad_(True) if k in keys else v) for k, v in q.items()} for n, q in p.items()}
    _functional(leaves, batch, dB).backward()
    return {n: {k: leaves[n][k].grad for k in keys} for n in p}


def _run(method, model):
    runner = Method(get_method(method), model, _loss, total_steps=STEPS, seed=0, rho=0.0, sam_rho=0.0, sam_w_rho=0.0)
    opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=LR)
    states = []
    for t, batch in enumerate(_batches(), start=1):
        runner.grads(t, batch)
        opt.step()
        runner.after_step(t, opt)
        opt.zero_grad(set_to_none=True)
        states.append(_snapshot(model))
    return runner, states


def test_bi_lora_steps_match_eqs_9_and_10():
    model = _model(aux=True)
    p = _snapshot(model)
    runner, states = _run("bi-lora", model)
    rho, clipped = peers.BI_LORA_RHO, 0
    for batch, got in zip(_batches(), states):
        g = _grads(p, batch, ("A1", "B1", "A2", "B2"))
        for n, q in p.items():  # eq. 9: primary descends, auxiliary ascends, same learning rate
            q["A1"], q["B1"] = q["A1"] - LR * g[n]["A1"], q["B1"] - LR * g[n]["B1"]
            q["A2"], q["B2"] = q["A2"] + LR * g[n]["A2"], q["B2"] + LR * g[n]["B2"]
        c = math.sqrt(sum(float((q["s2"] * q["B2"] @ q["A2"]).square().sum()) for q in p.values()))
        if c > rho:  # eq. 10: both factors of every layer by sqrt(rho / c)
            clipped += 1
            for q in p.values():
                q["A2"], q["B2"] = q["A2"] * math.sqrt(rho / c), q["B2"] * math.sqrt(rho / c)
        for n in p:
            for k in ("A1", "B1", "A2", "B2"):
                torch.testing.assert_close(got[n][k], p[n][k], rtol=1e-5, atol=1e-6, msg=f"{n}.{k}")
    assert 0 < clipped < STEPS  # both branches of eq. 10 are exercised
    for state in states:  # the auxiliary perturbation stays in the rho-ball
        total = math.sqrt(sum(float((q["s2"] * q["B2"] @ q["A2"]).square().sum()) for q in state.values()))
        assert total <= rho * (1 + 1e-5)
    runner.finish()  # the auxiliary adapter is gone: the model is W0 + s1 B1 A1, and saves as plain LoRA
    assert list(model.peft_config) == ["default"]
    with torch.no_grad():
        batch = _batches()[0]
        primary_only = {n: {k: v for k, v in q.items() if not k.endswith("2")} for n, q in p.items()}
        torch.testing.assert_close(_loss(model, batch), _functional(primary_only, batch), rtol=1e-5, atol=1e-6)


def _pinv_rows(a):
    """A^+ of a full-row-rank A (r, n): A^T (A A^T)^-1 (the normal equations, not an SVD)."""
    return a.T.double() @ torch.linalg.inv(a.double() @ a.T.double())


def _pinv_cols(b):
    """(B^T)^+ of a full-column-rank B (m, r): B (B^T B)^-1."""
    return b.double() @ torch.linalg.inv(b.T.double() @ b.double())


def test_eflat_lora_steps_match_algorithm_2():
    model = _model()
    p = _snapshot(model)
    runner, states = _run("eflat-lora", model)
    ema = {n: None for n in p}
    beta, rho0 = peers.EFLAT_BETA, peers.EFLAT_RHO
    moved = 0.0
    for t, (batch, got) in enumerate(zip(_batches(), states), start=1):
        d_b = {n: (e if e is not None else torch.zeros_like(p[n]["B1"])) for n, e in ema.items()}
        g = _grads(p, batch, ("A1", "B1"), dB=d_b)  # step 9: gradients at (B + Ê_{t-1}, A)
        for n, q in p.items():
            s, a, b_t = q["s1"], q["A1"], q["B1"] + d_b[n]
            full = 0.5 * ((1 / s) * g[n]["B1"].double() @ _pinv_rows(a).T  # eq. 12
                          + (1 / s) * _pinv_cols(b_t) @ g[n]["A1"].double())
            e_w = (rho0 / math.sqrt(t)) * full / torch.linalg.matrix_norm(full)  # eq. 13, rho_t = rho / sqrt(t)
            e_b = ((1 / s) * e_w @ _pinv_rows(a)).float()  # eq. 15
            ema[n] = e_b if ema[n] is None else (1 - beta) * ema[n] + beta * e_b  # step 5 / eq. 18
            q["A1"], q["B1"] = q["A1"] - LR * g[n]["A1"], q["B1"] - LR * g[n]["B1"]  # step 13, from the clean B
        for n in p:
            for k in ("A1", "B1"):
                torch.testing.assert_close(got[n][k], p[n][k], rtol=1e-5, atol=1e-6, msg=f"{n}.{k} at step {t}")
        moved = max(moved, max(float(e.norm()) for e in ema.values()))
    for k, n in enumerate(p):  # the EMA the rule carries into step STEPS + 1
        torch.testing.assert_close(runner.eflat.ema[k], ema[n], rtol=1e-4, atol=1e-7)
    assert moved > 1e-3  # the perturbation is not negligible: the gradients at B + Ê differ from LoRA's


def test_eflat_perturbation_is_the_full_weight_perturbation_moved_onto_b():
    """With B of full column rank, s E_B A = E_W A^+ A: E_W projected onto A's row space (eq. 14-15)."""
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(3, 9, generator=gen), torch.randn(7, 3, generator=gen)
    ga, gb = torch.randn(3, 9, generator=gen), torch.randn(7, 3, generator=gen)
    e_b = peers.eflat_perturbation(ga, gb, a, b, scaling=2.0, rho=0.1)
    full = 0.5 * (gb.double() @ _pinv_rows(a).T + _pinv_cols(b) @ ga.double()) / 2.0
    e_w = 0.1 * full / torch.linalg.matrix_norm(full)
    torch.testing.assert_close((2.0 * e_b.double() @ a.double()), e_w @ _pinv_rows(a) @ a.double(), rtol=1e-5,
                               atol=1e-8)
    zero = peers.eflat_perturbation(torch.zeros(3, 9), torch.zeros(7, 3), a, b, 2.0, 0.1)
    assert torch.count_nonzero(zero) == 0


def test_registry_and_pairing():
    assert {"bi-lora", "eflat-lora", "alora", "alora+flat"} <= set(METHODS)
    assert paired_baseline("bi-lora") == "lora" and paired_baseline("eflat-lora") == "lora"
    assert paired_baseline("alora+flat") == "alora" and paired_baseline("alora") is None
    from flatlora.experiments import ExperimentConfig

    cfg = ExperimentConfig(methods=["lora", "bi-lora", "eflat-lora", "alora", "alora+flat"])
    assert cfg.methods[-1] == "alora+flat"
    with pytest.raises(ValueError, match="ALoRA methods need heldout"):
        Method(get_method("alora"), _model(), _loss, total_steps=4, seed=0, rho=0, sam_rho=0, sam_w_rho=0)
    with pytest.raises(ValueError, match="beta=0"):
        peers.EFlatLoRA(_model(), beta=0)
    with pytest.raises(ValueError, match="norm='all' is unknown; choose 'layer'"):
        peers.EFlatLoRA(_model(), norm="all")
    runner = Method(get_method("eflat-lora"), _model(), _loss, total_steps=4, seed=0, rho=0, sam_rho=0, sam_w_rho=0,
                    eflat=dict(rho=0.3, beta=1.0, schedule="constant", norm="global"))
    assert (runner.rho, runner.eflat.beta, runner.eflat.rho_at(4), runner.eflat.norm) == (0.3, 1.0, 0.3, "global")
    with pytest.raises(ValueError, match="rho=0"):
        peers.BiLoRA(_model(aux=True), rho=0)


class _Task:
    """The task interface build_peft_model needs, on the tiny network."""

    def build_model(self, cfg, seed):
        torch.manual_seed(seed)
        return Tiny()

    def lora_kwargs(self, cfg):
        return {"target_modules": ["fc1", "fc2"]}


def test_bi_lora_primary_is_loras_initial_adapter_and_alora_is_gated():
    from flatlora.alora import active_ranks
    from flatlora.experiments import ExperimentConfig

    cfg = ExperimentConfig(methods=["lora"])
    lora = build_peft_model(_Task(), cfg, "lora", 4, seed=3, total_steps=10, train_batches=list)
    bi = build_peft_model(_Task(), cfg, "bi-lora", 4, seed=3, total_steps=10, train_batches=list)
    primary = {n: v for n, v in bi.state_dict().items() if peers.BI_LORA_AUX not in n}
    assert primary.keys() == lora.state_dict().keys()
    assert all(torch.equal(v, lora.state_dict()[n]) for n, v in primary.items())  # paired with lora
    aux = [m.lora_A[peers.BI_LORA_AUX].weight.shape for m in bi.modules() if hasattr(m, "lora_A")
           and peers.BI_LORA_AUX in m.lora_A]
    assert [tuple(s)[0] for s in aux] == [peers.BI_LORA_AUX_RANK] * 2
    alora = build_peft_model(_Task(), cfg, "alora", 4, seed=3, total_steps=10, train_batches=list)
    assert set(active_ranks(alora).values()) == {4}
    layer = alora.base_model.model.fc1
    assert layer.r["default"] == 8 and layer.scaling["default"] == lora.base_model.model.fc1.scaling["default"]


def _alora_method(total_steps, steps_per_epoch):
    from flatlora.experiments import ExperimentConfig

    model = build_peft_model(_Task(), ExperimentConfig(methods=["lora"]), "alora", 2, seed=3, total_steps=total_steps,
                             train_batches=list)
    held = _batches()[:1]
    return Method(get_method("alora"), model, _loss, total_steps=total_steps, seed=0, rho=0, sam_rho=0, sam_w_rho=0,
                  heldout=lambda: held, steps_per_epoch=steps_per_epoch)


def _train(runner, steps):
    opt = torch.optim.AdamW([p for p in runner.model.parameters() if p.requires_grad], lr=0.05)
    batches = _batches()
    for t in range(1, steps + 1):
        runner.grads(t, batches[(t - 1) % len(batches)])
        opt.step()
        runner.after_step(t, opt)
        opt.zero_grad(set_to_none=True)
    return runner.record()["alora"]


def test_alora_warns_when_no_round_fits_and_records_its_rounds():
    with pytest.warns(RuntimeWarning, match=r"no reallocation round .* train for more than one epoch"):
        short = _alora_method(total_steps=4, steps_per_epoch=4)  # K1 = one epoch = every step of the run
    rec = _train(short, 4)
    assert rec["rounds"] == [] and rec["scheduled_steps"] == [] and rec["ranks"] == {"base_model.model.fc1": 2,
                                                                                      "base_model.model.fc2": 2}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a run long enough for rounds does not warn
        longer = _alora_method(total_steps=8, steps_per_epoch=4)
    rec = _train(longer, 8)
    # K1 = 4 steps, K2 = 0.25 epoch = 1 step, rounds only where steps follow: after steps 4, 5, 6, 7
    assert [r["step"] for r in rec["rounds"]] == rec["scheduled_steps"] == [4, 5, 6, 7]
    assert all(len(r["pruned"]) == len(r["opened"]) == 2 for r in rec["rounds"])
    assert sum(rec["ranks"].values()) == 4 and rec["ranks"] == longer.alora.ranks()
    assert json.loads(json.dumps(rec)) == rec  # goes into run.json as it is


@pytest.mark.parametrize("norm", ["layer", "global"])
@pytest.mark.parametrize("schedule", ["inv-sqrt", "constant"])
def test_eflat_perturbation_size_is_the_closed_form(norm, schedule):
    """||s Ê A|| over all layers, after steps 1..4 with beta = 1 (Ê = the newest E_B), equals
    rho_t sqrt(sum_l ||G_l P_l||^2 / N_l^2), P_l = A_l^+ A_l the projection onto A's row space (eq. 15) and
    N_l = ||G_l|| (norm="layer") or ||[G_1, G_2]|| (norm="global"); G_l from eq. 12 written here with the
    normal-equation pseudo-inverses. Before the projection the perturbation's norm is rho_t per layer, or rho_t
    in all."""
    model = _model()
    rule = peers.EFlatLoRA(model, rho=0.2, beta=1.0, schedule=schedule, norm=norm)
    batches = _batches()
    for t, batch in enumerate(batches, start=1):
        at = [b.detach().clone() + (e if e is not None else 0) for (_, b, _), e in zip(rule.layers, rule.ema)]
        rule.step(t, lambda: float(_loss(model, batch).backward() or 0))
        gs, projected = [], []
        for (a, b, s), b_t in zip(rule.layers, at):
            a0 = a.detach()
            g = 0.5 * (b.grad.double() @ _pinv_rows(a0).T + _pinv_cols(b_t) @ a.grad.double()) / s
            gs.append(g)
            projected.append(g @ _pinv_rows(a0) @ a0.double())
        if norm == "layer":
            n = [float(g.norm()) for g in gs]
        else:
            n = [math.sqrt(sum(float(g.norm()) ** 2 for g in gs))] * len(gs)
        rho_t = 0.2 / math.sqrt(t) if schedule == "inv-sqrt" else 0.2
        want = rho_t * math.sqrt(sum((float(p.norm()) / k) ** 2 for p, k in zip(projected, n)))
        assert rule.size() == pytest.approx(want, rel=1e-5)
        before = math.sqrt(sum((float(g.norm()) / k) ** 2 for g, k in zip(gs, n)))
        assert before == pytest.approx(math.sqrt(len(gs)) if norm == "layer" else 1.0, rel=1e-9)
        assert 0 < rule.size() <= rho_t * before * (1 + 1e-6)
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("norm", ["scaled", "unscaled"])
def test_bi_lora_through_compares_adamw_step_matches_the_equations(norm):
    """The path `flatlora compare` runs (`train._Training.step`: gradients, clipping over every trainable
    parameter, AdamW, the learning-rate schedule, then eq. 10) against Adam written here from its formula: the
    primary adapter descends with Adam on g, the auxiliary one ascends (Adam on -g, its own moments), both
    after the shared global gradient clip; then eq. 10 on ||s2 B2 A2|| (scaled) or ||B2 A2|| (unscaled)."""
    from flatlora.experiments.train import _lr_lambda, _Training

    lr, wd, clip, rho, (b1, b2), eps = 0.05, 0.01, 1.0, 0.05, (0.9, 0.999), 1e-8
    model = _model(aux=True)
    p = _snapshot(model)
    runner = Method(get_method("bi-lora"), model, _loss, total_steps=STEPS, seed=0, rho=0, sam_rho=0, sam_w_rho=0,
                    bi_lora=dict(rho=rho, norm=norm))
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    schedule = _lr_lambda(STEPS, 0.25)
    training = _Training(params, opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule), runner)
    keys = ("A1", "B1", "A2", "B2")
    moments = {(n, k): [torch.zeros_like(p[n][k]), torch.zeros_like(p[n][k])] for n in p for k in keys}
    clipped = grads_clipped = 0
    for t, batch in enumerate(_batches(), start=1):
        training.step(t, batch, seed=0, max_grad_norm=clip)
        g = _grads(p, batch, keys)
        total = math.sqrt(sum(float(g[n][k].square().sum()) for n in p for k in keys))
        coef = min(1.0, clip / (total + 1e-6))
        grads_clipped += coef < 1
        step_lr = lr * schedule(t - 1)
        for n, q in p.items():
            for k in keys:
                grad = coef * g[n][k] * (-1 if k.endswith("2") else 1)  # eq. 9: the auxiliary adapter ascends
                m, v = moments[n, k]
                m.mul_(b1).add_((1 - b1) * grad)
                v.mul_(b2).add_((1 - b2) * grad * grad)
                adam = m / (1 - b1 ** t) / (v.sqrt() / math.sqrt(1 - b2 ** t) + eps)
                q[k] = q[k] * (1 - step_lr * wd) - step_lr * adam
        s2 = {n: (q["s2"] if norm == "scaled" else 1.0) for n, q in p.items()}
        c = math.sqrt(sum(float((s2[n] * q["B2"] @ q["A2"]).square().sum()) for n, q in p.items()))
        if c > rho:  # eq. 10
            clipped += 1
            for q in p.values():
                q["A2"], q["B2"] = q["A2"] * math.sqrt(rho / c), q["B2"] * math.sqrt(rho / c)
        got = _snapshot(model)
        for n in p:
            for k in keys:
                torch.testing.assert_close(got[n][k], p[n][k], rtol=1e-5, atol=1e-6, msg=f"{n}.{k} at step {t}")
    assert clipped > 0 and grads_clipped > 0 and runner.rho == rho and runner.bilora.norm == norm
    bound = math.sqrt(sum(float((s2[n] * q["B2"] @ q["A2"]).square().sum()) for n, q in p.items()))
    assert bound <= rho * (1 + 1e-5)


def test_trainable_params_count_as_the_papers_with_the_rest_beside():
    """Counted from the layer shapes (fc1 12 -> 10, fc2 10 -> 3: a rank is n + m parameters, 22 and 13):
    ALoRA counts its open ranks, the closed reserve beside; Bi-LoRA its primary adapter, the auxiliary beside."""
    alora = _alora_method(total_steps=8, steps_per_epoch=4)  # 2 of 4 slots open per module
    params = [p for p in alora.model.parameters() if p.requires_grad]
    assert alora.param_counts(params) == {"trainable_params": 2 * 22 + 2 * 13, "reserve_params": 2 * 22 + 2 * 13,
                                          "optimized_params": 4 * 22 + 4 * 13}
    model = _model(aux=True)  # primary rank 3, auxiliary rank 2
    params = [p for p in model.parameters() if p.requires_grad]
    bi = Method(get_method("bi-lora"), model, _loss, total_steps=4, seed=0, rho=0, sam_rho=0, sam_w_rho=0)
    bi.finish()  # counted before the auxiliary adapter is deleted
    assert bi.param_counts(params) == {"trainable_params": 3 * 22 + 3 * 13, "auxiliary_params": 2 * 22 + 2 * 13,
                                       "optimized_params": 5 * 22 + 5 * 13}
    lora = Method(get_method("lora"), _model(), _loss, total_steps=4, seed=0, rho=0, sam_rho=0, sam_w_rho=0)
    assert lora.param_counts(lora.trainable) == {"trainable_params": 3 * 35, "optimized_params": 3 * 35}
