"""FSDP2 (``fully_shard``, DTensor shards outside forward): LoRA gradients of one step against one process.

The reference writes ``W_base + E_r`` into a copy of the unsharded model (the noise of rank r, from the
closed-form row std of the merged weight computed by hand) and runs rank r's micro-batches through it;
FSDP2 averages the ranks' gradients, so the reference does too. The ranks run in the shared torchrun
launch (``suite_worker.py``, section ``fsdp2``).
"""

from __future__ import annotations

import pytest
import torch

import fsdp2_worker as W
from _dist_common import micro_batch, suite_section
from flatlora import FlatLora, FlatLoraConfig, filter_noise, layer_seed
from kit.adapters import lora_layers
from kit.models import dist_llama
from kit.references import cosine_sigma, merged_by_hand, row_std, with_base_at

pytestmark = pytest.mark.distributed
WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return suite_section(tmp_path_factory, "fsdp2")


def reference_grads(same_noise: bool) -> dict[str, torch.Tensor]:
    model = dist_llama(seed=0)
    layers = lora_layers(model)
    sigma = cosine_sigma(W.T, W.T, W.RHO)
    grads: dict[str, torch.Tensor] = {}
    for rank in range(WORLD):
        noise = {}
        for index, (name, layer) in enumerate(layers.items()):
            w = merged_by_hand(layer)
            seed = layer_seed(W.SEED, W.T, 0 if same_noise else rank, index)
            noise[name] = filter_noise(w.shape, row_std(w, sigma), seed)
        ref = with_base_at(model, noise)
        for k in range(W.MICRO):
            (ref(**micro_batch(W.T, WORLD * k + rank, lm=True)).loss / (W.MICRO * WORLD)).backward()
        for name, p in ref.named_parameters():
            if p.grad is not None:
                grads[name] = grads.get(name, 0) + p.grad
    return grads


def test_parameters_are_sharded_and_inplace_mode_is_refused(ranks):
    for r in ranks:
        assert set(r["param_types"].values()) == {"DTensor"}
        assert r["inplace_error"] is not None and "mode='inplace'" in r["inplace_error"]
        assert "DTensor" in r["inplace_error"] and "mode='exact'" in r["inplace_error"]


def test_base_weights_untouched(ranks):
    frozen = {n: p for n, p in dist_llama(seed=0).named_parameters() if not p.requires_grad}
    for r in ranks:
        assert r["shards_unchanged"]
        assert set(r["frozen_full"]) == set(frozen)
        assert all(torch.equal(r["frozen_full"][n], w) for n, w in frozen.items())
        assert r["default"]["swapped"] == [] and r["same"]["swapped"] == []  # forwards restored


def test_every_layer_counted_as_perturbed_and_no_warning(ranks):
    """The bypass guard under FSDP2: every layer computed with its noise (no false alarm), nothing warned."""
    for r in ranks:
        for scenario in ("default", "same"):
            assert r[scenario]["ran"] == list(range(len(r[scenario]["targets"]))) == list(range(6))
            assert r[scenario]["warnings"] == []


def test_noise_specs_outside_forward_use_the_whole_merged_weight(ranks):
    layers = lora_layers(dist_llama(seed=0))
    sigma = cosine_sigma(W.T, W.T, W.RHO)
    for rank, r in enumerate(ranks):
        for scenario in ("default", "same"):
            specs = r[scenario]["specs"]
            assert list(specs) == list(layers) == r[scenario]["targets"]
            for index, (name, layer) in enumerate(layers.items()):
                seed, scale, shape = specs[name]
                w = merged_by_hand(layer)
                assert shape == tuple(w.shape)
                assert seed == layer_seed(W.SEED, W.T, 0 if scenario == "same" else rank, index)
                torch.testing.assert_close(scale.double(), row_std(w, sigma, torch.float64), rtol=1e-5, atol=0,
                                           msg=name)


@pytest.mark.parametrize("scenario", ["default", "same"])
def test_lora_gradients_match_one_process_with_the_same_noise(ranks, scenario):
    want = reference_grads(same_noise=scenario == "same")
    assert len(want) == 12 and all("lora_" in n for n in want)  # A and B of 2 layers x 3 projections
    for r in ranks:
        got = r[scenario]["grads"]
        assert set(got) == set(want)
        for name, g in want.items():
            torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6 * g.abs().max().item(), msg=name)
    # the tolerance tells the two noise choices apart
    other = reference_grads(same_noise=scenario != "same")
    assert max(((other[n] - g).abs().max() / g.abs().max()).item() for n, g in want.items()) > 1e-2


def test_dora_layers_under_fsdp2_match_one_process(ranks):
    """DoRA takes the hook path (op(x, E) added to the layer output); the reference is one process, same noise."""
    model = dist_llama(seed=0, dora=True)
    flat = FlatLora(model, FlatLoraConfig(rho=W.RHO, seed=W.SEED), total_steps=W.T)
    with flat.perturbed(W.T):
        for j in range(W.MICRO * WORLD):
            (model(**micro_batch(W.T, j, lm=True)).loss / (W.MICRO * WORLD)).backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(want) == 18 and sum("magnitude" in n for n in want) == 6
    for r in ranks:
        assert set(r["dora"]) == set(want)
        for name, g in want.items():
            torch.testing.assert_close(r["dora"][name], g, rtol=1e-5, atol=1e-6 * g.abs().max().item(), msg=name)
