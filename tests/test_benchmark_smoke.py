"""Smoke tests of benchmarks/overhead.py (the --quick run writes well-formed JSON and Markdown) and
benchmarks/levers.py (its measured-only parallel draw and its in-step timing).

Nothing here asserts a timing (speed is what the benchmark reports, not what tests check); the checks are
on the structure and on relations that hold whatever the machine: quartiles around medians, LoRA's ratio to
itself, peak memory at least what is held, one table row per measured variant.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kit.scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "overhead.py"
VARIANTS = {"lora", "flat-exact", "flat-inplace", "lora-sam", "bi-lora", "eflat-lora", "alora"}


def _load(script=SCRIPT):
    return load_benchmark(script.stem)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert _load().main(["--quick", "--quiet", "--out", str(out)]) == 0
    return out, json.loads((out / "overhead-cpu-quick.json").read_text()), (out / "overhead-cpu-quick.md").read_text()


def test_quick_json_is_well_formed(quick_run):
    _, result, _ = quick_run
    assert {"meta", "config", "models", "sweep", "memory_method"} <= set(result)
    assert result["config"]["quick"] is True
    (model,) = result["models"]
    assert model["name"] == "tiny" and model["targets"] == 4  # 2 layers x (query, value)
    assert set(model["variants"]) == VARIANTS
    for name, v in model["variants"].items():
        for clock in ("wall", "cpu"):
            s = v[clock]
            assert s["n"] == model["rounds"] == result["config"]["rounds"]
            assert 0 < s["min_ms"] <= s["q1_ms"] <= s["median_ms"] <= s["q3_ms"] <= s["max_ms"]
        assert v["ratio_wall"] > 0 and v["paired_ratio_cpu"] > 0
        lo, hi = v["paired_ci95_cpu"]
        assert lo <= v["paired_ratio_cpu"] <= hi
    assert model["variants"]["lora"]["ratio_wall"] == 1.0 and model["variants"]["lora"]["paired_ratio_cpu"] == 1.0
    for name, mem in model["memory"].items():
        assert mem["tensor_peak_bytes"] >= mem["held_bytes"] > 0
        assert "rss_peak_bytes" not in mem  # --quick skips the fresh processes
    assert model["memory"]["lora"]["tensor_ratio"] == 1.0
    # own models: Bi-LoRA holds an auxiliary adapter and its optimizer state, ALoRA a rank-2r super-network
    assert model["memory"]["bi-lora"]["held_bytes"] > model["memory"]["lora"]["held_bytes"]
    assert model["memory"]["alora"]["held_bytes"] > model["memory"]["lora"]["held_bytes"]
    rnd = model["alora_round"]  # 4 layers x 8 open ranks, 2K + 1 forwards
    assert rnd["open_ranks"] == 32 and rnd["forwards"] == 65 and rnd["seconds"] > 0 and rnd["lora_steps"] > 0
    per_step = model["breakdown"]["per_step_ms"]
    for mode in ("flat-exact", "flat-inplace"):
        p = per_step[mode]
        assert p["norms"] > 0 and p["draw"] > 0
        assert p["total"] == pytest.approx(p["norms"] + p["draw"] + p["apply"])
    layers = model["breakdown"]["layers"]
    assert sum(layer["count"] for layer in layers) == model["targets"]
    assert [row["hidden"] for row in result["sweep"]] == result["config"]["sweep_hidden"]
    assert all(row["noise_ms"] > 0 and row["matmul_ms"] > 0 for row in result["sweep"])


def test_quick_markdown_has_every_row(quick_run):
    _, result, md = quick_run
    assert result["meta"]["command"] in md
    rows = [line for line in md.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == len(VARIANTS) + 3  # main table + breakdown (exact, inplace) + ALoRA round
    assert all(line.count("|") == 13 for line in rows[: len(VARIANTS)])
    assert len([line for line in md.splitlines() if line.startswith("| tiny | 32 | 65 |")]) == 1  # ALoRA round
    sweep_rows = [line for line in md.splitlines() if line.startswith("| 32 |") or line.startswith("| 64 |")]
    assert len(sweep_rows) == len(result["sweep"]) == 2


def test_bad_configuration_is_a_value_error():
    bench = _load()
    with pytest.raises(ValueError, match="unknown model"):
        bench.parse_config(["--models", "gpt5"])
    with pytest.raises(ValueError, match="rounds=0"):
        bench.parse_config(["--rounds", "0"])
    with pytest.raises(ValueError, match="unknown variant"):
        bench.parse_config(["--variants", "lora", "sam-everything"])
    cfg, _ = bench.parse_config(["--variants", "flat-exact", "--quick", "--rounds", "3"])
    assert cfg.variants == ["lora", "flat-exact"] and cfg.rounds == 3 and cfg.models == ["tiny"]


@pytest.mark.slow
def test_rss_in_fresh_processes(tmp_path):
    """The CPU RSS path: one fresh interpreter per variant (slow: each imports torch, transformers, PEFT)."""
    cmd = [sys.executable, str(SCRIPT), "--quick", "--quiet", "--rss", "--variants", "lora", "flat-exact",
           "--sweep-hidden", "--no-breakdown", "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=900)
    mem = json.loads((tmp_path / "overhead-cpu-quick.json").read_text())["models"][0]["memory"]
    assert set(mem) == {"lora", "flat-exact"}
    assert all(m["rss_peak_bytes"] > 0 for m in mem.values())
    assert mem["lora"]["rss_ratio"] == 1.0 and mem["flat-exact"]["rss_ratio"] > 0


def test_levers_parallel_streams_is_the_library_draw_per_row_range():
    """The measured-only parallel draw: range ``k`` of the rows is `add_filter_noise` of that range with seed
    ``seed + k``, whichever thread drew it, out of place and in place."""
    import torch

    from flatlora.noise import add_filter_noise

    levers = _load(ROOT / "benchmarks" / "levers.py")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w, scale = torch.randn(301, 200), torch.rand(301) + 0.1
        want = torch.cat([add_filter_noise(w[:150], scale[:150], 7), add_filter_noise(w[150:], scale[150:], 8)])
        assert torch.equal(levers._parallel_streams(w, scale, 7), want)
        w2 = w.clone()
        assert levers._parallel_streams(w2, scale, 7, inplace=True) is w2 and torch.equal(w2, want)
    finally:
        torch.set_num_threads(before)


def test_levers_quick_run_restores_the_library_draw(tmp_path):
    import flatlora.noise as noise

    original = noise.add_filter_noise
    levers = _load(ROOT / "benchmarks" / "levers.py")
    assert levers.main(["--shapes", "32", "--repeats", "2", "--micro-batch-rounds", "0", "--in-step-rounds", "2",
                        "--model", "tiny", "--out", str(tmp_path)]) == 0
    assert noise.add_filter_noise is original
    result = json.loads((tmp_path / "levers-cpu.json").read_text())
    draws = result["in_step"]["draws"]
    assert set(draws) == {"blocks (now)", "parallel streams"}
    assert all(d["noise_ms"] > 0 and d["step_ms"] > d["noise_ms"] for d in draws.values())
    md = (tmp_path / "levers-cpu.md").read_text()
    assert "| parallel streams |" in md and "| W+E, parallel streams |" in md


def test_quick_qlora_section_has_both_bases_from_the_same_rounds(quick_run):
    _, result, md = quick_run
    q = result["qlora"]
    assert (q["layers"], q["hidden"], q["rounds"]) == (2, 64, result["config"]["qlora_rounds"])
    assert set(q["bases"]) == {"dense", "nf4"}
    for b in q["bases"].values():
        for clock in ("lora", "flat"):
            s = b[clock]
            assert s["n"] == q["rounds"] and 0 < s["min_ms"] <= s["q1_ms"] <= s["median_ms"] <= s["q3_ms"] <= s["max_ms"]
        assert b["ratio"] == pytest.approx(b["flat"]["median_ms"] / b["lora"]["median_ms"])
        lo, hi = b["paired_ci95"]
        assert lo <= b["paired_ratio"] <= hi
    assert q["ratio_gap"] == pytest.approx(q["bases"]["nf4"]["ratio"] - q["bases"]["dense"]["ratio"])
    assert "## QLoRA" in md and len([ln for ln in md.splitlines() if ln.startswith(("| float32", "| bitsandbytes"))]) == 2
