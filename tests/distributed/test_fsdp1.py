"""FSDP1 (``FullyShardedDataParallel``, accelerate's ``fsdp_version: 1``) is refused with one clear error.

The ranks run in the shared torchrun launch (``suite_worker.py``, section ``fsdp1``; 2 gloo processes): a
tiny Llama with LoRA wrapped with ``use_orig_params`` True and False (PEFT's auto-wrap policy, as accelerate
wraps a PEFT model) and with ``use_orig_params=True`` at the root only. Before this check, the norms were
taken from 1-D shards (a crash) or, with ``use_orig_params=False``, from freed storage (a segfault).
"""

from __future__ import annotations

import pytest

from _dist_common import suite_section

pytestmark = pytest.mark.distributed
CASES = ["orig=True,wrap=peft", "orig=False,wrap=peft", "orig=True,wrap=root"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return suite_section(tmp_path_factory, "fsdp1")


@pytest.mark.parametrize("case", CASES)
def test_flatlora_on_an_fsdp1_model_raises_one_error_naming_fsdp2(ranks, case):
    for r in ranks:
        c = r[case]
        # on the wrapper, on the model inside it (what the Trainer hands the callback), and at perturb() and
        # noise_specs() when FlatLora was built before the model was wrapped
        for where in ("on_wrapper", "on_inner", "perturb_after_wrap", "noise_specs_after_wrap"):
            error = c[where]
            assert error is not None, where
            assert error.startswith("Flat-LoRA does not support FSDP1 (torch FullyShardedDataParallel)"), error
            assert "fsdp_version: 2" in error and "fully_shard" in error, error
        assert not c["early_perturbed"] and c["loss_finite"]  # nothing applied; the model still trains


def test_what_gives_fsdp1_away(ranks):
    """The wrapper itself; with use_orig_params=True the original parameters marked as flattened (also when only
    the root is wrapped and no wrapper is inside the model); with False the nested units holding the factors."""
    c = ranks[0]
    assert "module '(the model)' is a FullyShardedDataParallel unit" in c["orig=True,wrap=root"]["on_wrapper"]
    assert "is flattened by FSDP1" in c["orig=True,wrap=root"]["on_inner"]
    assert "base_layer.weight' is flattened by FSDP1" in c["orig=True,wrap=peft"]["perturb_after_wrap"]
    assert "lora_A.default' is a FullyShardedDataParallel unit" in c["orig=False,wrap=peft"]["perturb_after_wrap"]
