"""``flatlora train RECIPE --methods lora flat-lora --seeds ...``: the plan, the runs (finished ones skipped,
interrupted ones resumed from their checkpoint) and the paired table, whose numbers are recomputed here by hand
from the runs' metrics.json with `flatlora._stats` and the closed forms of Student's t with 2 degrees of freedom."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flatlora import _stats
from flatlora.cli import main
from flatlora.train import load_recipe
from flatlora.train.runner import prepare, run, train

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "train_minilm.yaml"
SHORT = ["--training.max_steps", "4", "--training.logging_steps", "1"]


def t2_interval(d: list[float]) -> tuple[float, float, float]:
    """95% interval and two-sided p of the mean of 3 values by the closed forms of Student's t with 2 degrees of
    freedom: CDF 1/2 + t / (2 sqrt(2 + t^2)), so the 0.975 quantile is 0.95 sqrt(2 / (4 * 0.975 * 0.025))."""
    m, s = _stats.mean(d), _stats.std(d)
    half = 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025)) * s / math.sqrt(3)
    t = m / (s / math.sqrt(3))
    return m - half, m + half, 1 - abs(t) / math.sqrt(2 + t * t)


def rows(table: str, first: str, key: int = 0) -> dict[str, list[str]]:
    """The cells of the table rows whose first cell is ``first``, by their cell ``key``."""
    out = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and cells[0] == first:
            out[cells[key]] = cells
    return out


def test_paired_table_matches_the_runs_metrics_by_hand(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["train", str(EXAMPLE), "--methods", "lora", "flat-lora", "--seeds", "0", "1", "2", *SHORT,
            "--data.cache_dir", str(tmp_path / "cache")]
    assert main(args + ["--dry-run"]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert plan[0].startswith("6 runs (0 finished)") and not (tmp_path / "runs").exists()
    assert [line.split()[1:4] for line in plan[1:]] == [[s, m, "run"] for s in "012" for m in ("lora", "flat-lora")]
    assert main(args) == 0
    table = capsys.readouterr().out
    root = next((tmp_path / "runs" / "train" / "train_minilm").iterdir())  # the folder of the max_steps override
    assert root.name.startswith("training.max_steps=4-")
    runs = {(m, s): json.loads((root / m / f"seed{s}" / "metrics.json").read_text())
            for m in ("lora", "flat-lora") for s in (0, 1, 2)}
    for (m, s), mt in runs.items():  # both seeds recorded; the noise seed follows the training seed
        assert mt["training_seed"] == s and mt["optimizer_steps"] == 4
        if m == "flat-lora":
            assert (mt["flat_lora_seed"], mt["flat_lora_seed_from"]) == (s, "training.seed")
    # per method: mean ± sample std over the seeds
    per_method = {m: rows(table, m)[m] for m in ("lora", "flat-lora")}
    header = next(line for line in table.splitlines() if line.startswith("| method |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    for m in ("lora", "flat-lora"):
        cells = dict(zip(columns, per_method[m]))
        assert cells["seeds"] == "3"
        for key, column, scale, fmt in (("eval_accuracy", "eval accuracy (%)", 100, ".2f"),
                                        ("eval_f1", "eval f1 (%)", 100, ".2f"),
                                        ("eval_loss", "eval loss", 1, ".4f"), ("train_loss", "train loss", 1, ".4f")):
            xs = [runs[(m, s)][key] for s in (0, 1, 2)]
            assert cells[column] == f"{scale * _stats.mean(xs):{fmt}} ± {scale * _stats.std(xs):{fmt}}"
    # paired: flat-lora − lora seed by seed, the interval and p-value by hand
    paired = rows(table, "flat-lora − lora", key=1)
    assert set(paired) == {"eval accuracy", "eval f1", "eval loss", "train loss"}
    for key, scale in (("eval_accuracy", 100), ("eval_f1", 100), ("eval_loss", 1), ("train_loss", 1)):
        d = [runs[("flat-lora", s)][key] - runs[("lora", s)][key] for s in (0, 1, 2)]
        cells = paired[key.replace("_", " ")]
        fmt = (lambda x: f"{100 * x:+.2f}") if scale == 100 else (lambda x: f"{x:+.4g}")
        assert cells[2] == fmt(_stats.mean(d)) and cells[5] == "3"
        if max(d) - min(d) <= 1e-12:
            assert cells[3] == cells[4] == "n/a (all paired differences equal)"
        else:
            lo, hi, p = t2_interval(d)
            assert cells[3] == f"[{fmt(lo)}, {fmt(hi)}]" and cells[4] == f"{p:.3f}"
    assert "| flat-lora − lora | eval loss |" in table  # losses differ by a little: a real interval, not n/a
    assert (root / "table.md").read_text() == table
    assert json.loads((root / "paired.json").read_text())["paired"][0]["seeds"] == [0, 1, 2]

    # finished runs are skipped; a missing one is run again, and the same seed gives the same numbers
    lost = root / "lora" / "seed1" / "metrics.json"
    before = json.loads(lost.read_text())
    lost.unlink()
    assert main(args + ["--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert plan.startswith("6 runs (5 finished)") and plan.count(" done ") == 5
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.err.count("finished before, skipped") == 5
    again = json.loads(lost.read_text())
    for key in ("eval_loss", "eval_accuracy", "train_loss"):
        assert again[key] == before[key]
    assert captured.out == table


class Interrupt(Exception):
    pass


def test_an_interrupted_run_resumes_from_its_checkpoint_to_the_same_adapter(tmp_path, capsys):
    from transformers import TrainerCallback

    class StopAfterSaving(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise Interrupt("the machine went down")

    flags = [*SHORT, "--training.save_strategy", "steps", "--training.save_steps", "2", "--data.cache_dir",
             str(tmp_path / "cache")]
    whole = load_recipe(EXAMPLE, flags + ["--output_dir", str(tmp_path / "whole")])
    train(whole)
    broken = load_recipe(EXAMPLE, flags + ["--output_dir", str(tmp_path / "broken")])
    prep = prepare(broken)
    prep.trainer.add_callback(StopAfterSaving())
    with pytest.raises(Interrupt):
        run(prep)
    out = Path(broken.output_dir)
    assert (out / "checkpoint-2").is_dir() and not (out / "metrics.json").exists()
    capsys.readouterr()
    metrics = train(broken)  # the same command again
    assert "resuming the unfinished run" in capsys.readouterr().err
    assert metrics["optimizer_steps"] == 4
    a = load_file(str(out / "adapter_model.safetensors"))
    b = load_file(str(Path(whole.output_dir) / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # the noise is keyed by step, the data order and RNG states come back from the checkpoint
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("flags, message", [
    (["--methods", "lora", "sam"], "'sam' is not a method"),
    (["--seeds", "0", "x"], "'x' is not a seed"),
    (["--seeds", "0", "0"], "each method and seed once"),
    (["--methods", "lora", "--method", "flat-lora"], "give the methods and seeds as --methods and --seeds"),
    (["--methods"], "--methods needs values"),
])
def test_bad_sweep_flags(flags, message, tmp_path, capsys):
    assert main(["train", str(EXAMPLE), *flags, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
