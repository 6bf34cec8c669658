"""FlatLoraArguments: FlatLoraConfig's fields, prefixed, parsed by HfArgumentParser / TrlParser from the CLI and YAML."""

import argparse
import dataclasses
import pickle
import typing

import pytest
from transformers import HfArgumentParser, TrainingArguments

from flatlora import FlatLoraArguments, FlatLoraConfig

CLI = ["--output_dir", "out", "--seed", "3", "--flat_lora_seed", "7", "--flat_lora_rho", "0.15",
       "--flat_lora_schedule", "linear", "--flat_lora_target_modules", "q_proj", "v_proj",
       "--flat_lora_exclude_modules", r"layers\.0\.", "--flat_lora_same_noise_across_ranks",
       "--flat_lora_allow_unperturbed", r"experts\.7\.", "lm_head"]
EXPECTED = FlatLoraConfig(rho=0.15, schedule="linear", seed=7, target_modules=["q_proj", "v_proj"],
                          exclude_modules=[r"layers\.0\."], same_noise_across_ranks=True,
                          allow_unperturbed=[r"experts\.7\.", "lm_head"])

YAML = """\
output_dir: out
seed: 3
bf16: false
flat_lora_seed: 7
flat_lora_rho: 0.15
flat_lora_schedule: linear
flat_lora_target_modules: [q_proj, v_proj]
flat_lora_exclude_modules:
  - 'layers\\.0\\.'
flat_lora_same_noise_across_ranks: true
flat_lora_allow_unperturbed: ['experts\\.7\\.', lm_head]
"""


def test_every_config_field_is_an_option_with_its_type_default_and_help():
    config_fields = dataclasses.fields(FlatLoraConfig)
    arg_fields = {f.name: f for f in dataclasses.fields(FlatLoraArguments)}
    assert sorted(arg_fields) == sorted("flat_lora_" + f.name for f in config_fields)
    config_hints, arg_hints = typing.get_type_hints(FlatLoraConfig), typing.get_type_hints(FlatLoraArguments)
    defaults = FlatLoraConfig()
    plain = FlatLoraArguments()
    for f in config_fields:
        a = arg_fields["flat_lora_" + f.name]
        assert arg_hints[a.name] == config_hints[f.name], f.name
        assert a.metadata["help"].replace("%%", "%") == f.metadata["help"] and a.metadata["help"], f.name
        assert getattr(plain, a.name) == getattr(defaults, f.name), f.name
    assert plain.to_config() == defaults
    assert FlatLoraArguments().flat_lora_exclude_modules is not plain.flat_lora_exclude_modules  # no shared list


def test_help_shows_every_option_with_its_text():
    text = "".join(HfArgumentParser((FlatLoraArguments, TrainingArguments)).format_help().split())
    for f in dataclasses.fields(FlatLoraConfig):  # whitespace dropped: argparse wraps lines (also at hyphens)
        assert f"--flat_lora_{f.name}" in text
        assert "".join(f.metadata["help"].split()) in text, f.name


def test_the_config_alone_clashes_with_training_arguments():
    with pytest.raises(argparse.ArgumentError, match="--seed"):  # why FlatLoraArguments exists
        HfArgumentParser((FlatLoraConfig, TrainingArguments))


def test_hf_argument_parser_command_line():
    flat, training = HfArgumentParser((FlatLoraArguments, TrainingArguments)).parse_args_into_dataclasses(CLI)
    assert training.seed == 3 and flat.flat_lora_seed == 7
    assert flat.to_config() == EXPECTED
    defaults, _ = HfArgumentParser((FlatLoraArguments, TrainingArguments)).parse_args_into_dataclasses(
        ["--output_dir", "out"])
    assert defaults.to_config() == FlatLoraConfig()


def test_hf_argument_parser_yaml_file(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(YAML)
    flat, training = HfArgumentParser((FlatLoraArguments, TrainingArguments)).parse_yaml_file(str(path))
    assert training.seed == 3 and flat.to_config() == EXPECTED
    # PyYAML reads 1e-2 (no dot) as text and parse_yaml_file passes it on as is: it is read as the number
    path.write_text("output_dir: out\nflat_lora_rho: 1e-2\n")
    flat, _ = HfArgumentParser((FlatLoraArguments, TrainingArguments)).parse_yaml_file(str(path))
    assert flat.flat_lora_rho == 0.01 and flat.to_config().rho == 0.01


def test_trl_parser_with_sft_config_yaml_and_cli(tmp_path):
    trl = pytest.importorskip("trl")
    path = tmp_path / "recipe.yaml"
    path.write_text(YAML)
    parser = trl.TrlParser((FlatLoraArguments, trl.SFTConfig))
    flat, sft = parser.parse_args_and_config(["--config", str(path), "--flat_lora_rho", "0.3",
                                              "--flat_lora_target_modules", "o_proj"])
    assert isinstance(sft, trl.SFTConfig) and sft.seed == 3
    assert flat.to_config() == EXPECTED.replace(rho=0.3, target_modules=["o_proj"])  # the CLI wins over YAML


@pytest.mark.parametrize("argv, flag, why", [
    (["--flat_lora_schedule", "cos"], "--flat_lora_schedule", "unknown schedule 'cos'"),
    (["--flat_lora_rho", "-1"], "--flat_lora_rho", "rho=-1.0 must be finite and >= 0"),
    (["--flat_lora_target_modules", "("], "--flat_lora_target_modules", "not a valid regular expression"),
    (["--flat_lora_mode", "fast"], "--flat_lora_mode", "unknown mode 'fast'"),
])
def test_bad_values_name_the_option(argv, flag, why):
    parser = HfArgumentParser((FlatLoraArguments, TrainingArguments))
    with pytest.raises(ValueError) as info:
        parser.parse_args_into_dataclasses(["--output_dir", "out", *argv])
    assert str(info.value).startswith(flag + ":") and why in str(info.value)
    with pytest.raises(ValueError, match=r"^--flat_lora_seed: seed=-2"):
        parser.parse_dict({"output_dir": "out", "flat_lora_seed": -2})


def test_from_config_round_trip_and_pickle():
    cfg = FlatLoraConfig(rho=0.2, seed=5, mode="inplace", exclude_modules=["fc2"])
    args = FlatLoraArguments.from_config(cfg)
    assert args.flat_lora_mode == "inplace" and args.to_config() == cfg
    assert pickle.loads(pickle.dumps(args)) == args
    with pytest.raises(ValueError, match="config must be a FlatLoraConfig"):
        FlatLoraArguments.from_config(cfg.to_dict())
