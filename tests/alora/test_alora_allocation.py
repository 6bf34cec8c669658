"""ALoRA's scores, reallocation plan and rounds: against hand-made plans, a literal AB-LoRA reference and a
planted task where only some modules matter."""

import copy

import pytest
import torch

from _planted import IRRELEVANT, RELEVANT, planted, short
from flatlora.alora import ALoRA, ALoRAConfig, plan_reallocation
from flatlora.alora.allocator import slot_seed
from flatlora.alora.gates import gate_of, gated_layers
from flatlora.alora.scores import rank_scores


pytestmark = pytest.mark.usefixtures("one_thread")


def _g(r, open_):
    g = torch.zeros(r)
    g[list(open_)] = 1.0
    return g


def _s(r, values):
    s = torch.full((r,), float("nan"), dtype=torch.float64)
    for i, v in values.items():
        s[i] = v
    return s


def test_plan_is_the_papers_footnote_3():
    """8 ranks pruned from m0; m1, m2, m3 (average scores 3 > 2 > 1) get 3, 3 and 2, lowest free slots first."""
    gates = [_g(10, range(8)), _g(6, [0, 1]), _g(6, [0, 2]), _g(6, [1, 2])]
    scores = [_s(10, {i: -10.0 + i for i in range(8)}), _s(6, {0: 3.0, 1: 3.0}), _s(6, {0: 2.0, 2: 2.0}),
              _s(6, {1: 1.0, 2: 1.0})]
    plan = plan_reallocation(gates, scores, 8)
    assert sorted(plan.prune) == [(0, i) for i in range(8)]
    assert plan.grow == ((1, 2), (1, 3), (1, 4), (2, 1), (2, 3), (2, 4), (3, 0), (3, 3))


def test_plan_keeps_the_total_when_receivers_are_full():
    # m1 (unpruned) has one free slot; the second rank goes back to m0 (the pruned module), never to a slot just
    # pruned; m2 holds no open rank and never receives
    gates = [_g(4, [0, 1, 2]), _g(3, [0, 1]), _g(4, [])]
    scores = [_s(4, {0: -3.0, 1: -2.0, 2: 5.0}), _s(3, {0: 4.0, 1: 4.0}), _s(4, {})]
    plan = plan_reallocation(gates, scores, 2)
    assert plan.prune == ((0, 0), (0, 1)) and plan.grow == ((1, 2), (0, 3))
    # no room anywhere but the pruned slots: nothing moves (the paper would shrink the budget here)
    full = [_g(2, [0, 1]), _g(2, [0, 1]), _g(3, [])]
    plan = plan_reallocation(full, [_s(2, {0: 1.0, 1: 2.0}), _s(2, {0: 3.0, 1: 4.0}), _s(3, {})], 2)
    assert plan.prune == () and plan.grow == ()
    with pytest.raises(ValueError, match="n=-1"):
        plan_reallocation(full, [_s(2, {}), _s(2, {}), _s(3, {})], -1)


def _score_reference(model, batch):
    """AB-LoRA by its definition, without gates: ablate ranks by zeroing columns of B on copies of the model
    (closed slots zeroed too), S = -loss. Returns {(module, slot): IS}."""
    layers = [(short(n), m) for n, m in gated_layers(model)]
    open_ = {name: (gate_of(m) != 0).nonzero().flatten().tolist() for name, m in layers}

    def score(keep):  # keep: set of (module, slot) whose B column stays
        ref = copy.deepcopy(model)
        from flatlora.alora import detach_gates

        detach_gates(ref)
        with torch.no_grad():
            for name, m in ((short(n), m) for n, m in ref.named_modules() if hasattr(m, "lora_B")
                            and n.endswith(tuple(RELEVANT + IRRELEVANT))):
                b = m.lora_B["default"].weight
                for i in range(b.shape[1]):
                    if (name, i) not in keep:
                        b[:, i] = 0
            return -float(ref(**batch)["loss"])

    everything = {(n, i) for n, slots in open_.items() for i in slots}
    full = score(everything)
    return {r: full - score(everything - {r}) + score({r}) for r in everything}


def test_scores_are_ab_lora_by_definition():
    model, data = planted(seed=1)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    alora = ALoRA(model, ALoRAConfig(init_rank=3, warmup_steps=1, interval_steps=1), [data(32)])
    batch = alora.batches[0]
    want = _score_reference(model, batch)
    model.eval()
    _, got = rank_scores(model, alora.gates(), alora.batches, alora.loss_fn)
    names = [short(n) for n in alora.names]
    got = {(names[m], i): float(s[i]) for m, s in enumerate(got) for i in range(len(s)) if not torch.isnan(s[i])}
    assert got.keys() == want.keys() and len(got) == 12
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), k
    assert len({round(v, 6) for v in want.values()}) > 6  # distinct scores: a permutation would be caught


def _train(model, data, cfg, steps=120, lr=2e-2, flat=None):
    train = data(256)
    alora = ALoRA(model, cfg, [data(64)])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    totals = []
    for t in range(1, steps + 1):
        opt.zero_grad()
        if flat is None:
            model(**train)["loss"].backward()
        else:
            with flat.perturbed(t):
                model(**train)["loss"].backward()
        opt.step()
        if alora.update(t, opt) is not None:
            totals.append(sum(alora.ranks().values()))
    with torch.no_grad():
        loss = float(model(**data(256))["loss"])
    return alora, totals, loss


@pytest.mark.parametrize("seed", [0, 1])
def test_ranks_move_to_the_modules_that_matter(seed):
    cfg = ALoRAConfig(init_rank=2, warmup_steps=40, interval_steps=20, rounds=4, ranks_per_round=2, seed=seed)
    model, data = planted(seed)
    rng = torch.get_rng_state()
    alora, totals, loss = _train(model, data, cfg)
    assert torch.equal(torch.get_rng_state(), rng)  # scoring and re-initialisation never touch the global RNG
    assert totals == [8, 8, 8, 8]  # four rounds, the budget constant through each
    ranks = {short(k): v for k, v in alora.ranks().items()}
    assert ranks == {"l1": 4, "l2": 0, "l3": 4, "l4": 0}
    assert {short(n) for n, _ in alora.history[0].opened} <= set(RELEVANT)
    # the same budget spread evenly (rank 2 everywhere, no rounds) fits the planted task worse
    uniform, data2 = planted(seed, r=2)
    fixed = ALoRAConfig(init_rank=2, warmup_steps=1000, interval_steps=1, rounds=1, seed=seed)
    _, _, uniform_loss = _train(uniform, data2, fixed)
    assert loss < 0.5 * uniform_loss


def test_reopened_slots_start_fresh_and_seeded():
    model, data = planted(seed=0)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # trained-looking factors: B != 0, so A gets gradients and optimizer state too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    cfg = ALoRAConfig(init_rank=2, warmup_steps=1, interval_steps=1, rounds=1, ranks_per_round=2, seed=9)
    alora = ALoRA(model, cfg, [data(32)])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = data(64)
    model(**batch)["loss"].backward()
    opt.step()
    with torch.no_grad():
        before = model(**batch)["pred"]
    report = alora.update(1, opt)
    assert len(report.opened) == 2 and len(report.pruned) == 2
    layers = dict(gated_layers(model))
    for (name, i), k in zip(report.opened, range(2)):
        layer = layers[name]
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        m = alora.names.index(name)
        gen = torch.Generator().manual_seed(slot_seed(9, 0, m, i))
        want = ((torch.rand(a.shape[1], generator=gen, dtype=torch.float64) * 2 - 1) / a.shape[1] ** 0.5).float()
        torch.testing.assert_close(a[i].detach(), want, rtol=0, atol=0)
        assert torch.count_nonzero(b[:, i]) == 0 and gate_of(layer)[i] == 1
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.count_nonzero(opt.state[a][key][i]) == 0 and torch.count_nonzero(opt.state[b][key][:, i]) == 0
            assert torch.count_nonzero(opt.state[a][key]) > 0  # only the reopened row was reset
    # pruning changed the outputs (a pruned rank had a trained B column); re-running the pruning alone gives
    # the same outputs as after the round: opening (B column 0) changes nothing
    ref = copy.deepcopy(model)
    for name, i in report.opened:
        gate_of(dict(gated_layers(ref))[name])[i] = 0.0
    with torch.no_grad():
        torch.testing.assert_close(model(**batch)["pred"], ref(**batch)["pred"], rtol=0, atol=0)
        assert (model(**batch)["pred"] - before).abs().max() > 0
    # the next step moves a reopened B column as a fresh Adam moves it (bias correction of step 1, not of the
    # tensor's step 2: uncorrected it would move 0.1 / 0.19 / sqrt(0.001 / 0.002) = 0.74x as far)
    opt.zero_grad()
    model(**batch)["loss"].backward()
    fresh = {}
    for name, i in report.opened:
        b = layers[name].lora_B["default"].weight
        col = torch.nn.Parameter(b.detach()[:, i].clone())
        col.grad = b.grad[:, i].clone()
        torch.optim.Adam([col], lr=1e-2).step()
        fresh[name, i] = col.detach()
    opt.step()
    for (name, i), want in fresh.items():
        assert torch.count_nonzero(want) > 0
        torch.testing.assert_close(layers[name].lora_B["default"].weight.detach()[:, i], want, rtol=1e-5, atol=1e-8)
    assert alora.update(2, opt) is None  # one round only


def test_state_round_trips_and_bad_input_is_refused():
    model, data = planted(seed=0)
    cfg = ALoRAConfig(init_rank=2, warmup_steps=1, interval_steps=1, rounds=1, ranks_per_round=2)
    alora = ALoRA(model, cfg, [data(16)])
    alora.reallocate(0)
    fresh, _ = planted(seed=0)
    other = ALoRA(fresh, cfg, [data(16)])
    other.load_state_dict(alora.state_dict())
    assert other.ranks() == alora.ranks() and other.history == alora.history
    with pytest.raises(ValueError, match="already gated with open ranks"):
        ALoRA(model, cfg, [data(16)])
    with pytest.raises(ValueError, match="batches is empty"):
        ALoRA(planted(0)[0], cfg, [])
    with pytest.raises(ValueError, match="interval_steps=0"):
        ALoRAConfig(init_rank=2, warmup_steps=1, interval_steps=0)
    with pytest.raises(ValueError, match="step=0"):
        alora.update(0)
