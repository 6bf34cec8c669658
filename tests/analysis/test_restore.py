"""Every diagnostic leaves the model bit-identical (weights, parameter objects, train/eval flags, hooks, .grad),
also when the loss function raises midway; is deterministic given its seed and never touches the global RNG;
and refuses bad input with a ValueError."""

import functools

import pytest
import torch
from torch import nn

from _threads import single_thread  # noqa: F401  (autouse: one thread per test module)
from flatlora.analysis import (expected_sharpness, hessian_vector_product, loss_landscape_1d, loss_landscape_2d,
                               sam_sharpness, sharpness_report, top_hessian_eigenvalue)
from kit.models import ToyMLP, batch_for, bert_model, loss_of, toy_model

CALLS = {
    "expected": lambda m, f, b: expected_sharpness(m, f, b, rho=0.1, n_samples=3, progress=False),
    "sam-full": lambda m, f, b: sam_sharpness(m, f, b, rho=0.1, space="full", progress=False),
    "sam-lora": lambda m, f, b: sam_sharpness(m, f, b, rho=0.1, space="lora", progress=False),
    "hessian": lambda m, f, b: top_hessian_eigenvalue(m, f, b, iters=3, progress=False),
    "hessian-lora": lambda m, f, b: top_hessian_eigenvalue(m, f, b, iters=3, space="lora", method="power",
                                                           progress=False),
    "landscape-full": lambda m, f, b: loss_landscape_1d(m, f, b, span=0.5, steps=3, progress=False),
    "landscape-lora": lambda m, f, b: loss_landscape_1d(m, f, b, space="lora", span=0.5, steps=3, progress=False),
    "landscape-2d": lambda m, f, b: loss_landscape_2d(m, f, b, span=0.5, steps=3, progress=False),
}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: (v.dtype, _bits(v)) for k, v in model.state_dict(keep_vars=True).items()},
        "params": [(n, id(p), p.requires_grad, p.grad) for n, p in model.named_parameters()],
        "training": [(n, m.training) for n, m in model.named_modules()],
        "hooks": [(n, len(m._forward_hooks), len(m._forward_pre_hooks), "forward" in m.__dict__)
                  for n, m in model.named_modules()],
    }


def _assert_same(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["params"] == before["params"]
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    assert after["state"].keys() == before["state"].keys()
    for k, (dtype, bits) in before["state"].items():
        assert after["state"][k][0] == dtype and torch.equal(after["state"][k][1], bits), k


class Boom(RuntimeError):
    pass


def _raising(loss_fn, after: int, seen: list):
    """loss_fn that checks eval mode and raises on call number ``after + 1``."""

    @functools.wraps(loss_fn)
    def fn(model, batch):
        assert not model.training, "diagnostics must evaluate in eval mode"
        seen.append(1)
        if len(seen) > after:
            raise Boom("raised midway")
        return loss_fn(model, batch)

    return fn


def _mixed_mode_model(dtype=torch.float32) -> nn.Module:
    model = bert_model().to(dtype)
    model.train()
    model.base_model.model.bert.encoder.layer[0].eval()  # an unusual mix of flags, to be restored per module
    return model


@pytest.mark.parametrize("name", sorted(CALLS))
def test_bit_identical_after_a_normal_run_and_after_the_loss_raises_midway(name):
    model = _mixed_mode_model()
    batches = [batch_for("bert", s) for s in range(2)]
    before = _snapshot(model)
    rng = torch.get_rng_state()
    seen: list = []
    CALLS[name](model, _raising(loss_of, 10**9, seen), batches)
    _assert_same(model, before)
    n_calls = len(seen)
    assert n_calls >= 4
    # raise inside a perturbed evaluation: after the first pass (clean loss/gradient) and one more batch
    seen.clear()
    with pytest.raises(Boom):
        CALLS[name](model, _raising(loss_of, len(batches) + 1, seen), batches)
    _assert_same(model, before)
    assert torch.equal(torch.get_rng_state(), rng)


def test_bf16_model_is_untouched_in_the_full_space():
    model = toy_model(dtype=torch.bfloat16)
    batches = [{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch_for("mlp").items()}]
    before = _snapshot(model)
    res = expected_sharpness(model, loss_of, batches, rho=0.1, n_samples=2, progress=False)
    sam_sharpness(model, loss_of, batches, rho=0.1, progress=False)
    _assert_same(model, before)
    assert res.sharpness != 0.0


def test_deterministic_given_the_seed():
    model = toy_model()
    batches = [batch_for("mlp", s) for s in range(2)]
    a = expected_sharpness(model, loss_of, batches, rho=0.2, n_samples=4, seed=1, progress=False)
    b = expected_sharpness(model, loss_of, batches, rho=0.2, n_samples=4, seed=1, progress=False)
    c = expected_sharpness(model, loss_of, batches, rho=0.2, n_samples=4, seed=2, progress=False)
    assert a == b and a.samples != c.samples
    la = loss_landscape_1d(model, loss_of, batches, space="lora", steps=5, seed=3, progress=False)
    lb = loss_landscape_1d(model, loss_of, batches, space="lora", steps=5, seed=3, progress=False)
    lc = loss_landscape_1d(model, loss_of, batches, space="lora", steps=5, seed=4, progress=False)
    assert la == lb and la.losses != lc.losses
    ha = top_hessian_eigenvalue(model, loss_of, batches, iters=4, seed=5, progress=False)
    hb = top_hessian_eigenvalue(model, loss_of, batches, iters=4, seed=5, progress=False)
    assert ha == hb


def test_the_report_combines_the_measures_and_its_gap_is_full_minus_lora():
    model = toy_model()
    batches = [batch_for("mlp", s) for s in range(2)]
    rep = sharpness_report(model, loss_of, batches, label="toy", rho=0.1, n_samples=3, sam_rho=0.1,
                           hessian_iters=3, hessian_batches=1, progress=False)
    alone = sam_sharpness(model, loss_of, batches, rho=0.1, space="lora", progress=False)
    assert rep.sam_lora == alone
    assert rep.sam_gap == rep.sam_full.sharpness - rep.sam_lora.sharpness
    assert rep.hessian.n_batches == 1 and rep.hessian.iterations >= 1
    d = rep.to_dict()
    assert d["label"] == "toy" and d["expected"]["n_samples"] == 3 and d["hessian"]["method"] == "lanczos"


def _plain_model() -> nn.Module:
    return ToyMLP()


@pytest.mark.parametrize("call,match", [
    (lambda m, b: expected_sharpness(m, loss_of, b, rho=0.0), "rho=0.0"),
    (lambda m, b: expected_sharpness(m, loss_of, b, rho=-0.1), "rho=-0.1"),
    (lambda m, b: expected_sharpness(m, loss_of, b, rho=float("nan")), "rho=nan"),
    (lambda m, b: expected_sharpness(m, loss_of, b, n_samples=0), "n_samples=0"),
    (lambda m, b: expected_sharpness(m, loss_of, [], rho=0.1), "batches is empty"),
    (lambda m, b: expected_sharpness(m, loss_of, iter(b), rho=0.1), "list of batches"),
    (lambda m, b: sam_sharpness(m, loss_of, b, rho=0), "rho=0"),
    (lambda m, b: sam_sharpness(m, loss_of, b, space="ab"), "space='ab'"),
    (lambda m, b: sam_sharpness(m, lambda model, batch: model(**batch)["logits"], b), "scalar tensor"),
    (lambda m, b: sam_sharpness(m, "loss", b), "callable"),
    (lambda m, b: top_hessian_eigenvalue(m, loss_of, b, iters=0), "iters=0"),
    (lambda m, b: top_hessian_eigenvalue(m, loss_of, b, method="arnoldi"), "method='arnoldi'"),
    (lambda m, b: top_hessian_eigenvalue(m, loss_of, [], iters=2), "batches is empty"),
    (lambda m, b: loss_landscape_1d(m, loss_of, b, steps=4), "steps=4 must be odd"),
    (lambda m, b: loss_landscape_1d(m, loss_of, b, span=0), "span=0"),
    (lambda m, b: loss_landscape_2d(m, loss_of, [], steps=3), "batches is empty"),
    (lambda m, b: hessian_vector_product(m, loss_of, b, [torch.ones(2)]), "vector has shapes"),
    (lambda m, b: sharpness_report(m, loss_of, b, hessian_iters=-1), "hessian_iters=-1"),
])
def test_bad_input_is_a_clear_value_error_and_changes_nothing(call, match):
    model = toy_model()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace("[", r"\[")):
        call(model, [batch_for("mlp")])
    _assert_same(model, before)


@pytest.mark.parametrize("fn", [expected_sharpness, sam_sharpness, top_hessian_eigenvalue, loss_landscape_1d])
def test_a_model_without_lora_layers_is_refused(fn):
    with pytest.raises(ValueError, match="no PEFT LoRA layers"):
        fn(_plain_model(), loss_of, [batch_for("mlp")], progress=False)
