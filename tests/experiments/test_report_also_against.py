"""`also_against`: a compare's report pairs every method against extra baselines (the peer map: against LoRA and
against Flat-LoRA), marks pairs whose initial adapters differ, and the differences are the seed-paired ones
(checked against a hand computation with a Student-t table value)."""

import math

import pytest

from flatlora.experiments import ExperimentConfig
from flatlora.experiments.compare import check_resumable
from flatlora.experiments.report import summarize, table_md

T_975_DF4 = 2.7764451  # Student-t 97.5% quantile, 4 degrees of freedom (printed tables)


def _run(method: str, seed: int, test: float, ood: float) -> dict:
    return {"method": method, "rank": 8, "seed": seed, "steps": 10, "n_train": 64, "rho": 0.0,
            "trainable_params": 100,
            "metrics": {"test_accuracy": test, "ood_accuracy": ood, "train_loss": 0.1, "ood": {"tweets": ood}},
            "timings": {"step_s_mean": 0.1, "peak_memory_mib": 1.0, "train_s": 1.0}}


def _runs(methods: dict[str, tuple[list[float], list[float]]]) -> dict[str, list[dict]]:
    return {m: [_run(m, s, t, o) for s, (t, o) in enumerate(zip(*vals))] for m, vals in methods.items()}


def test_every_method_is_paired_against_the_extra_baselines():
    ood = {"lora": [0.50, 0.52, 0.49, 0.51, 0.50], "flat-lora": [0.60, 0.63, 0.58, 0.62, 0.61],
           "sam-w": [0.55, 0.52, 0.57, 0.50, 0.56], "alora": [0.40, 0.45, 0.41, 0.47, 0.42]}
    runs = _runs({m: ([0.8] * 5, v) for m, v in ood.items()})
    cfg = ExperimentConfig(methods=list(ood), seeds=[0, 1, 2, 3, 4], also_against=["lora", "flat-lora"])
    paired = {p["name"]: p for p in summarize(runs, cfg)["paired"]}
    assert list(paired) == ["flat-lora − lora", "sam-w − lora", "alora − lora (different init)",
                            "sam-w − flat-lora", "alora − flat-lora (different init)"]  # not lora − flat-lora
    d = paired["sam-w − flat-lora"]["diffs"]["ood_accuracy"]
    diffs = [a - b for a, b in zip(ood["sam-w"], ood["flat-lora"])]
    mean = sum(diffs) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 4)
    assert d["mean"] == pytest.approx(mean)
    assert (d["low"], d["high"]) == pytest.approx((mean - T_975_DF4 * sd / math.sqrt(5),
                                                   mean + T_975_DF4 * sd / math.sqrt(5)))
    table = table_md(summarize(runs, cfg))
    assert "| alora − lora (different init) | ood_accuracy |" in table
    assert "| sam-w − flat-lora | ood_accuracy | -6.80 |" in table  # mean of -0.05, -0.11, -0.01, -0.12, -0.05


def test_without_also_against_only_the_own_baselines_are_paired():
    runs = _runs({m: ([0.8] * 3, [0.5, 0.6, 0.7]) for m in ("lora", "flat-lora", "alora")})
    cfg = ExperimentConfig(methods=["lora", "flat-lora", "alora"])
    assert [p["name"] for p in summarize(runs, cfg)["paired"]] == ["flat-lora − lora"]


def test_also_against_must_name_a_compared_method_and_may_change_on_resume(tmp_path):
    with pytest.raises(ValueError, match=r"also_against=\['sam-w'\].*--methods"):
        ExperimentConfig(methods=["lora", "flat-lora"], also_against=["sam-w"])
    ExperimentConfig(methods=["lora", "flat-lora"]).save(tmp_path / "config.yaml")
    check_resumable(tmp_path, ExperimentConfig(methods=["lora", "flat-lora"], also_against=["flat-lora"]))
    with pytest.raises(ValueError, match="lr"):
        check_resumable(tmp_path, ExperimentConfig(methods=["lora", "flat-lora"], lr=1e-3))
