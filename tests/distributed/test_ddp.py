"""Plain PyTorch loop under DDP (2 ranks x gradient accumulation 2, gloo on CPU) against one process.

The shared torchrun launch (``suite_worker.py``, section ``ddp``) runs three scenarios (exact/default
noise, exact/same noise, inplace/default noise); the world-size-1 run of the same loop (accumulation 4, the
same micro-batches) runs in this process.
"""

from __future__ import annotations

import pytest
import torch

import ddp_worker as W
from _dist_common import suite_section
from flatlora import filter_noise, layer_seed
from kit.models import dist_bert
from kit.references import fitted_row_std, row_std

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return suite_section(tmp_path_factory, "ddp")


@pytest.fixture(scope="module")
def single() -> dict:
    return W.run("exact-same", rank=0, world=1)


def assert_sigma_T_is_rho(result: dict) -> None:
    """The noise measured at the last step is ``s_i z_i`` with ``z`` the draw of step T for this rank, and
    ``s_i / (||W_i|| / sqrt(n)) = rho`` (``W`` merged by hand at the start of step T)."""
    assert result["sigma_last"] == W.RHO
    assert list(result["probe"]) == result["targets"]
    for index, (name, e) in enumerate(result["probe"].items()):
        z = filter_noise(e.shape, torch.ones(e.shape[0]), layer_seed(W.SEED, W.STEPS, result["noise_rank"], index))
        s, resid = fitted_row_std(e, z)
        assert resid < 1e-5, (name, resid)  # E is this step's (and rank's) draw, scaled row-wise
        ratio = s / row_std(result["merged_last"][name], 1.0, torch.float64)
        torch.testing.assert_close(ratio, torch.full_like(ratio, W.RHO), rtol=1e-5, atol=0, msg=name)


@pytest.mark.parametrize("scenario", sorted(W.SCENARIOS))
def test_adapters_equal_across_ranks_and_base_weights_stay_clean(ranks, scenario):
    r0, r1 = ranks[0][scenario], ranks[1][scenario]
    init = dist_bert(seed=0)
    trained = {n for n, p in init.named_parameters() if p.requires_grad}
    assert set(r0["adapters"]) == trained and any("lora_A" in n for n in trained)
    for name in trained:
        assert torch.equal(r0["adapters"][name], r1["adapters"][name]), name  # DDP averaged the same gradients
        assert not torch.equal(r0["adapters"][name], init.get_parameter(name)), name  # and training moved them
    for rank in (r0, r1):
        for name, w0 in rank["base_start"].items():
            assert torch.equal(w0, init.state_dict()[name]), name
            if scenario.startswith("exact"):  # never written
                assert torch.equal(rank["base_end"][name], w0), name
            else:  # += E / -= E: back to fp32 rounding, so the ranks agree only to that
                torch.testing.assert_close(rank["base_end"][name], w0, rtol=0, atol=1e-6, msg=name)
                torch.testing.assert_close(r1["base_end"][name], r0["base_end"][name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("scenario", sorted(W.SCENARIOS))
def test_noise_differs_across_ranks_by_default_and_is_shared_with_the_option(ranks, scenario):
    r0, r1 = ranks[0][scenario], ranks[1][scenario]
    same = W.SCENARIOS[scenario]["same_noise_across_ranks"]
    assert (r0["noise_rank"], r1["noise_rank"]) == ((0, 0) if same else (0, 1))
    assert len(r0["probe"]) == 4
    for name, e0 in r0["probe"].items():
        e1 = r1["probe"][name]
        assert e0.norm() > 0
        if same:
            assert torch.equal(e0, e1), name
        else:  # independent draws: ||E0 - E1|| ~ sqrt(2) ||E0||
            assert (e0 - e1).norm() > 0.5 * e0.norm(), name


@pytest.mark.parametrize("world", [1, 2])
def test_sigma_at_the_last_optimizer_step_is_rho(ranks, single, world):
    for result in ([single] if world == 1 else [ranks[0]["exact-default"], ranks[1]["exact-default"],
                                                 ranks[0]["inplace-default"], ranks[1]["exact-same"]]):
        assert result["world"] == world
        assert_sigma_T_is_rho(result)


def test_loss_and_adapters_match_one_process_with_the_same_noise(ranks, single):
    """2 ranks x accumulation 2 with the same noise on both == 1 process x accumulation 4, to fp32 rounding."""
    r0, r1 = ranks[0]["exact-same"], ranks[1]["exact-same"]
    ddp = {**r0["losses"], **r1["losses"]}
    assert set(r0["losses"]).isdisjoint(r1["losses"]) and set(ddp) == set(single["losses"])
    assert len(ddp) == W.STEPS * W.GLOBAL_MICRO
    for key, loss in single["losses"].items():
        assert ddp[key] == pytest.approx(loss, rel=1e-5, abs=1e-6), key
    for name, a in single["adapters"].items():
        torch.testing.assert_close(r0["adapters"][name], a, rtol=1e-5, atol=1e-6, msg=name)
    # the tolerance tells noises apart: with its own noise on rank 1 the same run lands elsewhere
    other = {**ranks[0]["exact-default"]["losses"], **ranks[1]["exact-default"]["losses"]}
    assert max(abs(other[k] - v) for k, v in single["losses"].items()) > 1e-3
    assert max((ranks[0]["exact-default"]["adapters"][k] - a).abs().max() for k, a in single["adapters"].items()) > 1e-3


def test_default_noise_rank0_draws_the_single_process_noise_and_rank1_another(ranks, single):
    """At step 1 (same weights everywhere) rank 0's default noise is the one-process draw; rank 1's is not."""
    r0, r1 = ranks[0]["exact-default"]["losses"], ranks[1]["exact-default"]["losses"]
    ref = {j: single["losses"][(1, j)] for j in range(W.GLOBAL_MICRO)}
    for j in (0, 2):
        assert r0[(1, j)] == pytest.approx(ref[j], rel=1e-5, abs=1e-6)
    assert max(abs(r1[(1, j)] - ref[j]) for j in (1, 3)) > 1e-3
