"""The shared plumbing: validators (`flatlora._checks`), the JSON writer and its NaN policy (`flatlora._jsonio`),
mean / standard error (`flatlora._stats`), the config IO mixin and the task registry's interface."""

import json
import math
from pathlib import Path

import pytest
import torch

from flatlora import FlatLoraConfig
from flatlora._checks import check_choice, check_count, check_counts, check_number, check_positive
from flatlora._dataclass_io import DataclassIO
from flatlora._jsonio import as_float, read_json, to_jsonable, write_json
from flatlora._stats import mean, std, stderr


def _strict(token):
    raise AssertionError(f"{token} is not JSON")


def test_nan_and_inf_are_written_as_null_and_read_back_as_nan(tmp_path):
    data = {"a": math.nan, "b": (1.5, -math.inf), "c": [{"d": math.inf}], "p": Path("x/y"), "t": torch.tensor([1, 2])}
    path = write_json(tmp_path / "sub" / "r.json", data)
    back = json.loads(path.read_text(), parse_constant=_strict)
    assert back == {"a": None, "b": [1.5, None], "c": [{"d": None}], "p": "x/y", "t": [1, 2]}
    assert read_json(path) == back and math.isnan(as_float(back["a"])) and as_float(back["b"][0]) == 1.5
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temp file left
    assert to_jsonable({"x": (math.nan,)}) == {"x": [None]}
    with pytest.raises(TypeError, match="object is not JSON serialisable"):
        to_jsonable({"x": object()})


def test_validators_name_the_value_and_the_range():
    assert check_count("n", 3) == 3 and check_count("n", None, optional=True) is None
    for call, match in [
        (lambda: check_count("steps", 0), "steps=0 must be an integer >= 1"),
        (lambda: check_count("n", True), "n=True must be an integer >= 1"),
        (lambda: check_count("size", 0, optional=True), "size=0 must be an integer >= 1 or None"),
        (lambda: check_counts("severities", [1, 6], 1, 5), "severities value 6 must be an integer in 1..5"),
        (lambda: check_positive("rho", math.nan), r"rho=nan must be a finite number > 0 \(e.g. rho=0.05\)"),
        (lambda: check_number("lr", 0, 0, above=True), "lr=0 must be a number > 0"),
        (lambda: check_number("p", 1.0, 0, 1, optional=True), r"p=1.0 must be in \[0, 1\) or None"),
        (lambda: check_choice("space", "x", {"full": "W", "lora": "A, B"}),
         r"space='x' is unknown; choose 'full' \(W\) or 'lora' \(A, B\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()


def test_mean_std_stderr():
    assert mean([1.0, 2.0, 3.0]) == 2.0 and std([1.0, 2.0, 3.0]) == 1.0
    assert stderr([1.0, 2.0, 3.0]) == pytest.approx(1 / math.sqrt(3))
    assert math.isnan(std([1.0])) and math.isnan(stderr([1.0]))


def test_the_three_configs_share_one_io_mixin(tmp_path):
    from flatlora.analysis.config import LandscapeConfig, SharpnessConfig
    from flatlora.experiments.config import ExperimentConfig

    for cfg in (FlatLoraConfig(rho=0.1), SharpnessConfig(samples=3), LandscapeConfig(steps=5),
                ExperimentConfig(seeds=[4])):
        cls = type(cfg)
        assert isinstance(cfg, DataclassIO)
        assert cls.from_json(cfg.to_json()) == cfg and cls.from_dict(cfg.to_dict()) == cfg
        assert cls.load(cfg.save(tmp_path / f"{cls.__name__}.yaml")) == cfg
        assert cls.load(cfg.save(tmp_path / f"{cls.__name__}.json")) == cfg
        assert cfg.replace() == cfg and cfg.replace() is not cfg
    with pytest.raises(ValueError, match="samples=0"):
        SharpnessConfig().replace(samples=0)


def test_tasks_come_from_the_registry_and_check_their_own_fields():
    from flatlora.experiments.config import ExperimentConfig
    from flatlora.experiments.tasks import _REGISTRY, TASKS, task_class

    assert TASKS == tuple(_REGISTRY) == ("text", "vision")
    assert task_class("vision").name == "vision" and task_class("text").default_rho == 0.05
    # the vision task checks its fields whichever task is chosen (a config file stays valid for both)
    with pytest.raises(ValueError, match="image_size=0"):
        ExperimentConfig(task="text", image_size=0)
    with pytest.raises(ValueError, match="max_length=0"):
        ExperimentConfig(task="vision", max_length=0)


def test_the_report_reads_null_metrics_as_undefined():
    from flatlora.experiments.config import ExperimentConfig
    from flatlora.experiments.report import summarize

    cfg = ExperimentConfig(methods=["lora"], seeds=[0, 1])
    runs = {"lora": [{"method": "lora", "rank": 8, "seed": s, "steps": 3, "n_train": 8, "rho": 0.0,
                      "metrics": {"test_accuracy": 0.5 + s / 10, "ood_accuracy": None, "train_loss": 0.7, "ood": {}},
                      "timings": {"step_s_mean": 0.1, "peak_memory_mib": None, "train_s": 1.0}} for s in (0, 1)]}
    m = summarize(runs, cfg)["methods"]["lora"]
    assert m["test_accuracy"]["mean"] == pytest.approx(0.55)
    assert math.isnan(m["ood_accuracy"]["mean"]) and math.isnan(m["peak_memory_mib"]["mean"])
