"""The QLoRA configuration of the benchmarks (issue 25): `_bench/qlora.py` and its block in gpu_overhead.py, at
quick sizes on CPU. Nothing here asserts a timing; the checks are on the structure and on relations that hold
on any machine (quartiles around medians, ratios from the medians, the interval around the paired ratio)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/_bench

from _bench import qlora  # noqa: E402
from kit.scripts import load_benchmark  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _gpu_bench():
    return load_benchmark("gpu_overhead", "flatlora_bench_gpu_overhead_qlora")


def test_the_two_stacks_hold_the_same_weights_on_their_bases():
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    kw = {"hidden": 64, "layers": 2, "rank": 4, "seed": 0, "device": torch.device("cpu"), "dtype": torch.float32}
    dense, nf4 = qlora.build_stack("dense", **kw), qlora.build_stack("nf4", **kw)
    d_layers = [m.base_layer for m in dense.base_model.model.layers]
    q_layers = [m.base_layer for m in nf4.base_model.model.layers]
    assert all(type(m) is torch.nn.Linear for m in d_layers) and all(isinstance(m, bnb.nn.Linear4bit) for m in q_layers)
    for d, q in zip(d_layers, q_layers):  # NF4 of the same weight: within half the widest code gap per block
        w = dequantize_4bit(q.weight.data, q.weight.quant_state)
        blocks = d.weight.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
        assert ((w - d.weight).reshape(-1, 64).abs() <= blocks * 0.16).all()
    assert dense.training and nf4.training


def _check(res: dict, rounds: int) -> None:
    assert set(res["bases"]) == set(qlora.BASES) and res["rounds"] == rounds
    for b in res["bases"].values():
        for key in ("lora", "flat"):
            s = b[key]
            assert s["n"] == rounds and 0 < s["min_ms"] <= s["q1_ms"] <= s["median_ms"] <= s["q3_ms"] <= s["max_ms"]
        assert b["ratio"] == pytest.approx(b["flat"]["median_ms"] / b["lora"]["median_ms"])
        lo, hi = b["paired_ci95"]
        assert lo <= b["paired_ratio"] <= hi and b["cpu_ratio"] > 0
    assert res["ratio_gap"] == pytest.approx(res["bases"]["nf4"]["ratio"] - res["bases"]["dense"]["ratio"])


def test_gpu_overhead_runs_the_qlora_configuration_at_quick_sizes_on_cpu():
    bench = _gpu_bench()
    parser = argparse.ArgumentParser()
    bench.add_qlora_args(parser)
    defaults = parser.parse_args([])
    assert (defaults.qlora_hidden, defaults.qlora_layers, defaults.qlora_tokens) == (4096, 6, 8192)
    args = argparse.Namespace(**vars(defaults), quick=True, rank=4, rounds=2, warmup=1, seed=0, dtype="float32",
                              rho=0.05)
    res = bench.run_qlora(args, torch.device("cpu"))
    assert (res["hidden"], res["tokens"], res["layers"]) == (64, 64, 2)
    _check(res, 2)
    lines = bench.render_qlora(res)
    assert sum(ln.startswith(("| float32", "| bitsandbytes NF4")) for ln in lines) == 2
    assert bench.run_qlora(argparse.Namespace(**{**vars(args), "qlora_hidden": 0}), torch.device("cpu")) is None
    assert bench.render_qlora(None) == []
