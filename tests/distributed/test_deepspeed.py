"""DeepSpeed ZeRO-2 and ZeRO-3 through the Trainer (``TrainingArguments(deepspeed=...)``) with the real package.

One torchrun launch per world size (1 and 2 gloo processes, CPU) runs ``deepspeed_worker.py``: the same
3 optimizer steps of 2 micro-batches per rank under DDP (the reference), DDP at rho = 0, ZeRO-2 and ZeRO-3
(every parameter partitioned), and a DoRA model under DDP and ZeRO-3 (base weights partitioned, the small
LoRA factors and magnitudes kept whole, as DeepSpeed's default persistence threshold does in a real LLM).
Skipped where deepspeed is not installed (the ``deepspeed`` extra, built with ``DS_BUILD_OPS=0``).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")

import deepspeed_worker as W  # noqa: E402
from _dist_common import load_ranks, torchrun  # noqa: E402
from flatlora import layer_seed  # noqa: E402
from kit.adapters import lora_layers  # noqa: E402
from kit.models import dist_bert  # noqa: E402
from kit.references import merged_by_hand, row_std  # noqa: E402

pytestmark = pytest.mark.distributed
ZERO = ["zero2", "zero3", "zero3-dora"]


@pytest.fixture(scope="module", params=[1, 2], ids=["world1", "world2"])
def ranks(request, tmp_path_factory) -> list[dict]:
    world = request.param
    out = tmp_path_factory.mktemp(f"deepspeed{world}")
    torchrun("deepspeed_worker.py", str(out), "ddp", "plain", "ddp-dora", "plain-dora", *ZERO, nproc=world)
    results = load_ranks(out, world)
    for rank, r in enumerate(results):
        for backend, run in r.items():
            if "error" in run:
                raise AssertionError(f"{backend} failed on rank {rank}:\n{run['error']}")
    return results


def reference(backend: str, engine: str = "ddp") -> str:
    """The DDP run on the same model (``engine="plain"``: at rho = 0)."""
    return f"{engine}-dora" if backend.endswith("-dora") else engine


def test_zero3_partitions_the_parameters_and_refuses_the_inplace_mode(ranks):
    for r in ranks:
        assert r["zero3"]["param_kinds"] == r["zero3-dora"]["param_kinds"] == ["zero3"]
        assert r["zero2"]["param_kinds"] == ["whole"] and r["zero3"]["persistent"] == []
        persistent = r["zero3-dora"]["persistent"]  # whole on every rank: A, B, magnitude of 2 x 3 layers, norms
        assert len([n for n in persistent if "lora_" in n]) == 2 * 3 * 3, persistent
        assert not any("base_layer" in n for n in persistent), persistent
        error = r["zero3"]["inplace_error"]
        assert error is not None and "mode='inplace'" in error and "ZeRO-3" in error and "mode='exact'" in error
        assert r["zero2"]["inplace_error"] is None  # whole fp32 weights: the in-place mode is allowed


@pytest.mark.parametrize("backend", ZERO)
def test_losses_and_adapters_equal_ddp_to_fp32_rounding(ranks, backend):
    for r in ranks:
        ddp, run = r[reference(backend)], r[backend]
        assert run["world"] == ddp["world"] == len(ranks) and run["steps"] == W.MAX_STEPS
        assert set(run["micro_losses"]) == set(ddp["micro_losses"])
        assert len(ddp["micro_losses"]) == W.MAX_STEPS * W.ACCUM
        for key, loss in ddp["micro_losses"].items():
            assert run["micro_losses"][key] == pytest.approx(loss, rel=1e-5, abs=1e-6), key[0]
        for name, a in ddp["adapters"].items():
            torch.testing.assert_close(run["adapters"][name], a, rtol=1e-5, atol=1e-6, msg=name)
        # the tolerance can tell: without the noise (rho = 0) the losses move by far more
        plain = r[reference(backend, "plain")]["micro_losses"]
        assert max(abs(plain[k] - v) for k, v in ddp["micro_losses"].items()) > 1e-3


@pytest.mark.parametrize("backend", ZERO)
def test_optimizer_step_inside_backward_leaves_the_exact_mode_unaffected(ranks, backend):
    """accelerate runs DeepSpeed's optimizer step inside the last micro-batch's backward, before the callback
    removes the noise at on_pre_optimizer_step: the step is taken with the noise still on. The exact mode
    never writes the base weights, so that changes nothing: base bit-identical, adapters as under DDP."""
    for r in ranks:
        run = r[backend]
        assert run["perturbed_pre_opt"] == [True] * W.MAX_STEPS
        assert run["stepped_before_restore"] == [True] * W.MAX_STEPS  # the adapters had moved already
        assert r["ddp"]["stepped_before_restore"] == [False] * W.MAX_STEPS  # DDP: the optimizer steps after
        assert run["base_unchanged"] and r[reference(backend)]["base_unchanged"] and not run["is_perturbed_after"]


def test_zero3_noise_specs_outside_forward_use_the_whole_merged_weight(ranks):
    """``noise_specs`` after training (outside forward) gathers each layer: its row std is that of the
    merged weight built by hand from the trained adapters, its seed the rank's."""
    for rank, r in enumerate(ranks):
        run = r["zero3"]
        model = dist_bert(seed=0)
        model.load_state_dict(run["adapters"], strict=False)
        layers = lora_layers(model)
        assert list(run["specs"]) == list(layers) and run["noise_rank"] == rank
        for index, (name, layer) in enumerate(layers.items()):
            seed, scale, shape = run["specs"][name]
            w = merged_by_hand(layer)
            assert shape == tuple(w.shape) and seed == layer_seed(W.SEED, W.MAX_STEPS, rank, index)
            torch.testing.assert_close(scale.double(), row_std(w, W.RHO, torch.float64), rtol=1e-5, atol=0, msg=name)
