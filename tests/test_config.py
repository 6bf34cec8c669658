import argparse

import pytest

from flatlora import FlatLoraConfig
from flatlora import _dataclass_io as dio


def test_defaults_are_the_paper_text_setting():
    cfg = FlatLoraConfig()
    assert (cfg.rho, cfg.schedule, cfg.mode, cfg.seed) == (0.05, "cosine", "auto", 0)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trip_files(tmp_path, suffix):
    cfg = FlatLoraConfig(rho=0.15, schedule="linear", seed=7, mode="inplace", target_modules=["query"],
                         exclude_modules=["layer\\.0\\."], same_noise_across_ranks=True,
                         allow_unperturbed=[r"experts\.\d+\."])
    path = cfg.save(tmp_path / f"cfg{suffix}")
    assert FlatLoraConfig.load(path) == cfg


def test_round_trip_json_and_dict():
    cfg = FlatLoraConfig(rho=0.1, seed=3)
    assert FlatLoraConfig.from_json(cfg.to_json()) == cfg
    assert FlatLoraConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kwargs,match", [
    (dict(rho=-0.1), "rho=-0.1"),
    (dict(rho=float("nan")), "rho=nan"),
    (dict(rho=float("inf")), "rho=inf"),
    (dict(rho="0.05"), "rho='0.05'"),
    (dict(schedule="exp"), "unknown schedule 'exp'"),
    (dict(mode="fast"), "unknown mode 'fast'"),
    (dict(seed=-1), "seed=-1"),
    (dict(seed=2**63), r"seed=9223372036854775808 must be an integer in \[0, 2\*\*63\)"),
    (dict(seed=1.5), "seed=1.5"),
    (dict(exclude_modules=5), "exclude_modules=5 must be a list"),
    (dict(target_modules=7), "target_modules=7 must be a list"),
    (dict(target_modules=["("]), "not a valid regular expression"),
    (dict(target_modules=[]), "selects nothing"),
    (dict(allow_unperturbed=3), "allow_unperturbed=3 must be a list"),
    (dict(allow_unperturbed=["experts.("]), "allow_unperturbed pattern 'experts.\\(' is not a valid regular"),
])
def test_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlatLoraConfig(**kwargs)


def test_unknown_field_is_named():
    with pytest.raises(ValueError, match=r"unknown FlatLoraConfig field\(s\) \['rh0'\]"):
        FlatLoraConfig.from_dict({"rh0": 0.1})


def test_bad_file_suffix(tmp_path):
    with pytest.raises(ValueError, match=".toml"):
        FlatLoraConfig().save(tmp_path / "cfg.toml")


def test_argparse_flags_from_the_dataclass():
    parser = argparse.ArgumentParser()
    dio.add_arguments(parser, FlatLoraConfig)
    ns = parser.parse_args(["--rho", "0.2", "--target-modules", "q", "v", "--same-noise-across-ranks"])
    cfg = FlatLoraConfig(**dio.overrides(ns, FlatLoraConfig))
    assert cfg.rho == 0.2 and cfg.target_modules == ["q", "v"] and cfg.same_noise_across_ranks is True
    assert cfg.schedule == "cosine"  # unset flags keep the defaults
    assert "relative noise strength" in parser.format_help()


def test_help_text_with_a_percent_sign_prints():
    """argparse %-formats help strings: a literal '%' in a field's help must not break ``--help``."""
    import dataclasses

    @dataclasses.dataclass
    class Knob:
        spread: float = dio.help_field(0.04, "moves step times by +-4% (or 100%)")

    parser = argparse.ArgumentParser()
    dio.add_arguments(parser, Knob)
    assert "+-4% (or 100%)" in parser.format_help()


def test_largest_seed_is_accepted_and_used():
    from flatlora import layer_seed

    cfg = FlatLoraConfig(seed=2**63 - 1)
    assert 0 <= layer_seed(cfg.seed, 1, 0, 0) < 2**63


def test_exclude_modules_none_means_none_excluded():
    cfg = FlatLoraConfig(exclude_modules=None)
    assert cfg.exclude_modules == []
    assert FlatLoraConfig.from_json(cfg.to_json()) == FlatLoraConfig()


def test_allow_unperturbed_takes_one_string_or_none():
    assert FlatLoraConfig(allow_unperturbed="lm_head").allow_unperturbed == ["lm_head"]
    assert FlatLoraConfig(allow_unperturbed=None).allow_unperturbed == []
    assert FlatLoraConfig().allow_unperturbed == []
