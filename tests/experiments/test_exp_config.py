"""ExperimentConfig: validation, presets, YAML/JSON round trip, CLI precedence."""

import pytest

from flatlora.cli import build_parser
from flatlora.experiments.cli import resolve
from flatlora.experiments.config import PRESETS, ExperimentConfig, preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name):
    cfg = preset(name)
    assert cfg.preset == name and cfg.run_labels()


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip(tmp_path, suffix):
    cfg = preset("rank-sweep", seeds=[3, 4], rho=0.1)
    path = cfg.save(tmp_path / f"c{suffix}")
    assert ExperimentConfig.load(path) == cfg


@pytest.mark.parametrize("bad,match", [
    (dict(task="audio"), "unknown task"), (dict(methods=["lora", "dora"]), "unknown method"),
    (dict(seeds=[-1]), "seeds value"), (dict(severities=[6]), "severities value"),
    (dict(train_size=0), "train_size"), (dict(lr=0), "lr="), (dict(rho=-0.1), "rho="),
    (dict(name="a/b"), "name="), (dict(methods=["lora", "lora"]), "twice"),
    (dict(corruptions=["fog"]), "corruption"), (dict(device="tpu"), "device="),
])
def test_bad_values_raise_valueerror(bad, match):
    with pytest.raises(ValueError, match=match):
        ExperimentConfig(**bad)


def test_labels_and_rank_sweep():
    cfg = ExperimentConfig(methods=["lora", "flat-lora"], seeds=[0, 1], ranks=[4])
    assert [lab[3] for lab in cfg.run_labels()] == ["lora/seed0", "flat-lora/seed0", "lora/seed1", "flat-lora/seed1"]
    sweep = ExperimentConfig(methods=["lora"], seeds=[0], ranks=[4, 16])
    assert [lab[3] for lab in sweep.run_labels()] == ["lora-r4/seed0", "lora-r16/seed0"]
    assert ExperimentConfig(task="vision").flat_rhos() == [0.15] and ExperimentConfig().flat_rhos() == [0.05]


def test_cli_precedence_preset_file_flags(tmp_path):
    ExperimentConfig(name="x", epochs=7.0, lr=1e-3).save(tmp_path / "c.yaml")
    ns = build_parser().parse_args(["compare", "--preset", "small-data", "--config", str(tmp_path / "c.yaml"),
                                    "--lr", "0.01", "--seeds", "5", "6"])
    cfg = resolve(ns)
    assert cfg.preset == "small-data" and cfg.epochs == 7.0 and cfg.lr == 0.01 and cfg.seeds == [5, 6]
    ns = build_parser().parse_args(["compare"])
    assert resolve(ns) == preset("default")


def test_help_renders_and_bad_flags_fail_cleanly(capsys):
    from flatlora.cli import main

    text = build_parser()._subparsers._group_actions[0].choices["compare"].format_help()
    assert "--rho" in text and "--preset" in text
    assert main(["compare", "--rho", "-1", "--dry-run"]) == 2
    assert "rho=" in capsys.readouterr().err


def test_peer_options_are_validated_with_the_fix():
    from flatlora.experiments import preset

    cfg = preset("smoke", eflat_norm="global", eflat_schedule="constant", eflat_beta=1.0, eflat_rho=0.1)
    assert (cfg.eflat_norm, cfg.eflat_schedule, cfg.eflat_beta, cfg.eflat_rho) == ("global", "constant", 1.0, 0.1)
    assert preset("smoke", bi_lora_norm="unscaled").bi_lora_norm == "unscaled"
    for bad, match in ((dict(eflat_norm="all"), "eflat_norm='all' is unknown; choose 'layer'"),
                       (dict(eflat_schedule="cos"), "eflat_schedule='cos' is unknown; choose 'inv-sqrt'"),
                       (dict(eflat_beta=0.0), "eflat_beta=0.0 must be a number > 0"),
                       (dict(eflat_beta=1.5), r"eflat_beta=1.5 must be in \(0, 1\]"),
                       (dict(eflat_rho=-0.1), "eflat_rho=-0.1 must be a number >= 0"),
                       (dict(bi_lora_norm="s"), "bi_lora_norm='s' is unknown; choose 'scaled'"),
                       (dict(bi_lora_rho=0.0), "bi_lora_rho=0.0 must be a number > 0")):
        with pytest.raises(ValueError, match=match):
            preset("smoke", **bad)
