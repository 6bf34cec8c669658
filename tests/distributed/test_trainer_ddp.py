"""transformers Trainer + FlatLoraCallback under DDP (2 ranks x accumulation 2, gloo, ``use_cpu=True``).

The shared torchrun launch (``suite_worker.py``, section ``trainer``) trains twice (default noise, same
noise); the one-process reference (accumulation 4, the same micro-batches in each optimizer step) trains
in this process.
"""

from __future__ import annotations

import math

import pytest
import torch

import trainer_worker as W
from _dist_common import suite_section
from flatlora import filter_noise, layer_seed
from kit.models import dist_bert
from kit.references import fitted_row_std, row_std

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return suite_section(tmp_path_factory, "trainer")


@pytest.fixture(scope="module")
def single() -> dict:
    return W.run(world=1, accum=4, same_noise=True)


@pytest.mark.parametrize("scenario", ["default", "same"])
def test_callback_sees_the_unwrapped_model_and_perturbs_every_optimizer_step(ranks, scenario):
    for rank in ranks:
        r = rank[scenario]
        assert r["world"] == 2
        assert r["model_type"] == r["flat_model_type"] == "PeftModelForSequenceClassification"  # not the DDP wrapper
        assert r["steps"] == list(range(1, r["max_steps"] + 1)) and r["total_steps"] == r["max_steps"]
        assert all(r["clean_begin"]) and all(r["clean_pre_opt"])  # exact mode: base never written
        assert all(r["perturbed_pre_opt"]) and not r["is_perturbed_after"]


@pytest.mark.parametrize("scenario", ["default", "same"])
def test_adapters_equal_across_ranks_and_base_weights_bit_identical(ranks, scenario):
    r0, r1 = ranks[0][scenario], ranks[1][scenario]
    init = dist_bert(seed=0)
    for name, a in r0["adapters"].items():
        assert torch.equal(a, r1["adapters"][name]), name
        assert not torch.equal(a, init.get_parameter(name)), name
    for r in (r0, r1):
        for name, w in r["base_end"].items():
            assert torch.equal(w, init.state_dict()[name]), name


@pytest.mark.parametrize("scenario", ["default", "same"])
def test_noise_differs_across_ranks_by_default_and_is_shared_with_the_option(ranks, scenario):
    r0, r1 = ranks[0][scenario], ranks[1][scenario]
    same = scenario == "same"
    assert (r0["noise_rank"], r1["noise_rank"]) == ((0, 0) if same else (0, 1))
    assert len(r0["probe"]) == 4
    for name, e0 in r0["probe"].items():
        e1 = r1["probe"][name]
        assert torch.equal(e0, e1) if same else (e0 - e1).norm() > 0.5 * e0.norm(), name


@pytest.mark.parametrize("world", [1, 2])
def test_sigma_at_the_last_optimizer_step_is_rho(ranks, single, world):
    """T = max_steps comes from the data, world size and accumulation; the noise of step T has sigma = rho."""
    runs = [single] if world == 1 else [ranks[0]["default"], ranks[1]["default"], ranks[1]["same"]]
    accum = 4 if world == 1 else 2
    for r in runs:
        assert r["world"] == world
        assert r["max_steps"] == math.ceil(W.N / (W.BATCH * accum * world)) * W.EPOCHS == r["steps"][-1]
        for index, (name, e) in enumerate(r["probe"].items()):
            seed = layer_seed(W.SEED, r["max_steps"], r["noise_rank"], index)
            s, resid = fitted_row_std(e, filter_noise(e.shape, torch.ones(e.shape[0]), seed))
            assert resid < 1e-5, (name, resid)
            ratio = s / row_std(r["merged_last"][name], 1.0, torch.float64)
            torch.testing.assert_close(ratio, torch.full_like(ratio, W.RHO), rtol=1e-5, atol=0, msg=name)


def test_loss_and_adapters_match_one_process_with_the_same_noise(ranks, single):
    r0, r1 = ranks[0]["same"], ranks[1]["same"]
    ddp = {**r0["micro_losses"], **r1["micro_losses"]}
    assert set(r0["micro_losses"]).isdisjoint(r1["micro_losses"])
    assert set(ddp) == set(single["micro_losses"]) and len(ddp) == W.N // W.BATCH * W.EPOCHS
    for key, loss in single["micro_losses"].items():
        assert ddp[key] == pytest.approx(loss, rel=1e-5, abs=1e-6), key[0]
    for name, a in single["adapters"].items():
        torch.testing.assert_close(r0["adapters"][name], a, rtol=1e-5, atol=1e-6, msg=name)
    other = {**ranks[0]["default"]["micro_losses"], **ranks[1]["default"]["micro_losses"]}
    assert max(abs(other[k] - v) for k, v in single["micro_losses"].items()) > 1e-3  # the tolerance can tell
