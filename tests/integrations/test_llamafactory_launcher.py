"""examples/llamafactory_train.py and flatlora.integrations.llamafactory: the flat_lora_* keys of a LLaMA-Factory
config become a FlatLoraCallback handed to run_exp.

The key handling runs everywhere. The runs need LLaMA-Factory (0.9.5 pins peft <= 0.18.1 and transformers <= 5.6,
so it lives in a venv of its own, not the project's): the example YAML with the model, data and step count
overridden on the command line (a tiny random Llama, 8 alpaca rows, 3 steps), offline on CPU.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import _tiny_lm
from flatlora import FlatLoraCallback, FlatLoraConfig, sigma_at
from flatlora.integrations import llamafactory as fl_lf
from flatlora.integrations.unsloth import PrepareCallback

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "llamafactory_train.py"
EXAMPLE_YAML = ROOT / "examples" / "llamafactory_lora_sft.yaml"
HAS_LF = importlib.util.find_spec("llamafactory") is not None
needs_lf = pytest.mark.skipif(not HAS_LF, reason="LLaMA-Factory is not installed (pip install llamafactory)")


def test_yaml_keys_are_taken_out_and_become_the_config():
    args = {"stage": "sft", "flat_lora_rho": "1e-1", "flat_lora_seed": 4, "flat_lora_exclude_modules": ["lm_head"],
            "flat_lora_mode": None, "lora_rank": 8}
    before = dict(args)
    config, rest = fl_lf.split_args(args)
    assert config == FlatLoraConfig(rho=0.1, seed=4, exclude_modules=["lm_head"])
    assert rest == {"stage": "sft", "lora_rank": 8}
    assert args == before  # the caller's dict is left as it was
    assert fl_lf.split_args({"stage": "sft"}) == (FlatLoraConfig(), {"stage": "sft"})


def test_command_line_flags_are_taken_out():
    argv = ["--stage", "sft", "--flat_lora_rho", "0.2", "--flat_lora_target_modules", "q_proj", "v_proj",
            "--lora_target", "all", "--flat_lora_same_noise_across_ranks", "true", "--do_train"]
    config, rest = fl_lf.split_args(argv)
    assert config == FlatLoraConfig(rho=0.2, target_modules=["q_proj", "v_proj"], same_noise_across_ranks=True)
    assert rest == ["--stage", "sft", "--lora_target", "all", "--do_train"]


@pytest.mark.parametrize("args, message", [
    ({"flat_lora_rh": 0.1}, r"^LLaMA-Factory arguments: unknown key 'flat_lora_rh'; the flat_lora_\* keys are: "),
    ({"flat_lora_rho": "big"}, r"^LLaMA-Factory arguments: flat_lora_rho: rho='big' must be a number"),
    ({"flat_lora_mode": "fast"}, r"^LLaMA-Factory arguments: flat_lora_mode: "),
    (["--flat_lora_rh", "0.1"], r"^LLaMA-Factory arguments: unknown key '--flat_lora_rh'"),
    (["--flat_lora_rho=-1"], r"--flat_lora_rho: rho=-1"),
    ("config.yaml", r"args must be a dict .* got str"),
])
def test_bad_keys_are_refused_naming_them(args, message):
    with pytest.raises(ValueError, match=message):
        fl_lf.split_args(args)


@pytest.mark.parametrize("args, unsloth", [
    ({"stage": "sft"}, False), ({"use_unsloth": True}, True), ({"use_unsloth": "false"}, False),
    (["--use_unsloth"], True), (["--use_unsloth", "false"], False), (["--use_unsloth=true"], True), ([], False),
])
def test_use_unsloth_adds_the_prepare_callback(args, unsloth):
    config = FlatLoraConfig(rho=0.1)
    found = fl_lf.callbacks(config, args)
    assert isinstance(found[0], FlatLoraCallback) and found[0].config == config
    assert [type(c) for c in found[1:]] == ([PrepareCallback] if unsloth else [])
    if unsloth:
        assert found[1].config == config


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "WANDB_MODE": "disabled",
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)}


def _launch(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLE), str(EXAMPLE_YAML), *overrides], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=600)


def _tiny_overrides(tmp_path: Path, out: str) -> list[str]:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    _tiny_lm.write_alpaca(data / "tiny.jsonl")
    (data / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny.jsonl"}}))
    model = tmp_path / "model"
    if not model.exists():
        _tiny_lm.write_model(model)
    return [f"model_name_or_path={model}", "dataset=tiny", f"dataset_dir={data}", "template=default",
            f"output_dir={tmp_path / out}", "max_steps=3", "per_device_train_batch_size=2",
            "gradient_accumulation_steps=2", "logging_steps=1", "save_steps=100", "bf16=false", "cutoff_len=64",
            "learning_rate=1e-3", "lr_scheduler_type=constant", "warmup_ratio=0", "plot_loss=false",
            "preprocessing_num_workers=1", "seed=42", "flat_lora_seed=1"]


def test_cli_bad_key_prints_one_line_and_exits_2(tmp_path):
    proc = _launch(tmp_path, "flat_lora_rho=-0.5")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    expected = ("flat_lora_rho: rho=-0.5 must be finite and >= 0" if HAS_LF
                else "needs LLaMA-Factory: pip install llamafactory")
    assert lines[0].startswith("llamafactory_train.py: ") and expected in lines[0]


@needs_lf
def test_example_trains_with_flat_lora(tmp_path):
    """The example YAML through the launcher: sigma_t of the cosine schedule in every logged step, the config
    recorded beside the adapter, and losses that differ from the same run at flat_lora_rho=0."""
    losses = {}
    for rho in (0.1, 0.0):
        out = f"out-{rho}"
        proc = _launch(tmp_path, *_tiny_overrides(tmp_path, out), f"flat_lora_rho={rho}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        history = json.loads((tmp_path / out / "trainer_state.json").read_text())["log_history"]
        steps = [e for e in history if "loss" in e]
        assert [e["step"] for e in steps] == [1, 2, 3]
        for e in steps:
            assert math.isclose(e["flat_lora_sigma"], sigma_at(e["step"], 3, rho, "cosine"), rel_tol=1e-9)
        record = json.loads((tmp_path / out / "flat_lora_config.json").read_text())
        assert record["total_steps"] == 3 and record["config"]["rho"] == rho and record["config"]["seed"] == 1
        losses[rho] = [e["loss"] for e in steps]
    assert all(a != b for a, b in zip(losses[0.1], losses[0.0]))
