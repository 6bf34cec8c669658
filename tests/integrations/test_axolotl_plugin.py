"""flatlora.integrations.axolotl: the Axolotl plugin switches the fused LoRA kernels off and attaches the callback.

Two halves:

* everywhere: the plugin's hooks (`FlatLoraPluginHooks`) driven the way Axolotl 0.21.0 drives them, by a stand-in
  taken from its source: ``prepare_plugins`` (axolotl/utils/config/__init__.py: ``register(cfg)`` on the raw
  config) followed by the schema's ``check_auto_enable_lora_kernels`` / ``lora_kernels_auto_enable``
  (axolotl/utils/schemas/config.py, validation.py), then ``post_trainer_create(cfg, trainer)`` on a real
  transformers Trainer;
* where Axolotl imports (it needs Python >= 3.12; this machine's project venv is 3.11, so these run in a separate
  3.12 venv with ``pip install axolotl==0.21.0``): Axolotl's own ``load_cfg`` + ``PluginManager``, its real
  ``apply_lora_kernel_patches`` on a PEFT Llama, and ``axolotl train`` on a tiny random Llama, offline on CPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import _tiny_lm
from flatlora import FlatLoraArguments, FlatLoraCallback, FlatLoraConfig, sigma_at
from flatlora.integrations import fused_lora_paths
from flatlora.integrations import axolotl as fl_axolotl

HAS_AXOLOTL = importlib.util.find_spec("axolotl") is not None
needs_axolotl = pytest.mark.skipif(not HAS_AXOLOTL, reason="Axolotl is not installed (it needs Python >= 3.12)")
PLUGIN = "flatlora.integrations.axolotl.FlatLoraPlugin"
KERNELS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")


# --- the stand-in: Axolotl 0.21.0's config path, as far as the plugin sees it ------------------------------------
class StandInBasePlugin:
    """axolotl/integrations/base.py ``BasePlugin``: every hook a no-op (the ones this plugin overrides, and one
    it does not, to show the base's defaults still apply)."""

    def __init__(self):
        pass

    def register(self, cfg):
        pass

    def get_input_args(self):
        return None

    def post_trainer_create(self, cfg, trainer):
        pass

    def add_callbacks_post_trainer(self, cfg, trainer):
        return []


def lora_kernels_auto_enable(get) -> bool:
    """axolotl/utils/schemas/validation.py (model-support lookup left out: a Llama supports the kernels)."""
    if get("rl") or get("nvfp4_merge_aware"):
        return False
    adapter = get("adapter")
    if adapter not in ("lora", "qlora"):
        return False
    if any(get(flag) is not None for flag in KERNELS):
        return False
    if adapter == "lora" and get("load_in_8bit"):
        return False
    if get("trust_remote_code"):
        return False
    return True


def stand_in_load_cfg(cfg: dict) -> dict:
    """``prepare_plugins`` (register each configured plugin on the raw dict), then the schema's
    ``check_auto_enable_lora_kernels`` (set every unset kernel flag to True when auto-enable applies)."""
    plugins = []
    for name in cfg.get("plugins") or []:
        module_name, class_name = name.rsplit(".", 1)
        cls = getattr(importlib.import_module(module_name), class_name) if HAS_AXOLOTL else type(
            class_name, (fl_axolotl.FlatLoraPluginHooks, StandInBasePlugin), {})
        plugins.append(cls())
    for plugin in plugins:
        plugin.register(cfg)
    if lora_kernels_auto_enable(cfg.get):
        for flag in KERNELS:
            if cfg.get(flag) is None:
                cfg[flag] = True
    cfg["_plugins"] = plugins
    return cfg


def base_cfg(**extra) -> dict:
    return {"base_model": "tiny", "adapter": "lora", "plugins": [PLUGIN], **extra}


def test_module_imports_without_axolotl():
    if HAS_AXOLOTL:
        pytest.skip("Axolotl is installed here")
    assert "axolotl" not in sys.modules
    with pytest.raises(ImportError, match=r"needs Axolotl: pip install axolotl \(Axolotl needs Python >= 3.12\)"):
        fl_axolotl.FlatLoraPlugin


def test_without_the_plugin_axolotl_switches_the_kernels_on():
    """The default the plugin counters: adapter lora with no kernel flag set -> all four on."""
    cfg = stand_in_load_cfg({"base_model": "tiny", "adapter": "lora"})
    assert [cfg[k] for k in KERNELS] == [True] * 4


@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_register_switches_every_kernel_off(adapter):
    cfg = stand_in_load_cfg(base_cfg(adapter=adapter, flat_lora_rho=0.1))
    assert [cfg[k] for k in KERNELS] == [False] * 4
    assert cfg["flat_lora_rho"] == 0.1


@pytest.mark.parametrize("key", KERNELS)
@pytest.mark.parametrize("value", [True, "true"])
def test_a_kernel_set_on_is_refused_naming_the_key(key, value):
    with pytest.raises(ValueError, match=rf"^{key}: {value} in the Axolotl config: .* set {key}: false") as err:
        stand_in_load_cfg(base_cfg(**{key: value}))
    assert "\n" not in str(err.value)


def test_kernels_set_off_by_the_user_are_fine():
    cfg = stand_in_load_cfg(base_cfg(lora_qkv_kernel=False, lora_o_kernel="false"))
    assert [cfg[k] for k in KERNELS] == [False] * 4


@pytest.mark.parametrize("extra, message", [
    ({"flat_lora_rh": 0.1}, r"^Axolotl config: unknown key 'flat_lora_rh'; the flat_lora_\* keys are: flat_lora_rho"),
    ({"flat_lora_rho": -1}, r"^Axolotl config: flat_lora_rho: rho=-1"),
    ({"flat_lora_schedule": "zigzag"}, r"^Axolotl config: flat_lora_schedule: unknown schedule 'zigzag'"),
    ({"adapter": "llama-adapter"}, r"^adapter: llama-adapter in the Axolotl config; .* adapter: lora"),
    ({"adapter": None}, r"^adapter: None in the Axolotl config"),
])
def test_bad_config_is_refused_before_anything_changes(extra, message):
    cfg = base_cfg(**extra)
    before = dict(cfg)
    with pytest.raises(ValueError, match=message):
        stand_in_load_cfg(cfg)
    assert cfg == before


def test_flat_lora_keys_map_to_the_config():
    cfg = {"flat_lora_rho": "1e-2", "flat_lora_seed": 7, "flat_lora_target_modules": ["q_proj"],
           "flat_lora_schedule": None, "lora_r": 8}
    assert fl_axolotl.flat_lora_config(cfg) == FlatLoraConfig(rho=0.01, seed=7, target_modules=["q_proj"])
    assert fl_axolotl.flat_lora_config({}) == FlatLoraConfig()


def test_input_args_model_has_every_flat_lora_field():
    """The pydantic model Axolotl merges into its schema: the FlatLoraArguments fields with their defaults."""
    args = fl_axolotl.FlatLoraAxolotlArgs
    names = [f.name for f in dataclasses.fields(FlatLoraArguments)]
    assert list(args.model_fields) == names
    dumped = args().model_dump(exclude_none=True)
    assert fl_axolotl.flat_lora_config(dumped) == FlatLoraConfig()
    assert args(flat_lora_rho="0.2").flat_lora_rho == 0.2
    assert "noise strength" in args.model_fields["flat_lora_rho"].json_schema_extra["description"]


def _trainer(tmp_path, **lora):
    from transformers import Trainer, TrainingArguments

    from kit.models import llama_model

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=1)
    return Trainer(model=llama_model(**lora), args=args)


def test_post_trainer_create_attaches_the_callback_first(tmp_path):
    cfg = stand_in_load_cfg(base_cfg(flat_lora_rho=0.2, flat_lora_seed=3))
    plugin = cfg["_plugins"][0]
    trainer = _trainer(tmp_path)
    plugin.post_trainer_create(cfg, trainer)
    first = trainer.callback_handler.callbacks[0]
    assert first is plugin.callback and isinstance(first, FlatLoraCallback)
    assert first.config == FlatLoraConfig(rho=0.2, seed=3)
    with pytest.raises(ValueError, match="already holds a FlatLoraCallback"):  # a second plugin run would double it
        plugin.post_trainer_create(cfg, trainer)


# --- the real package ---------------------------------------------------------------------------------------------
@pytest.fixture
def plugin_manager():
    from axolotl.integrations.base import PluginManager

    PluginManager._instance = None  # a singleton: each test starts with a fresh one
    yield PluginManager
    PluginManager._instance = None


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "axolotl_lora.yml"


def _write_cfg(tmp_path: Path, **extra) -> Path:
    """examples/axolotl_lora.yml with the model, data, size and outputs replaced by local tiny ones (``extra``
    overrides; None removes a key)."""
    model = _tiny_lm.write_model(tmp_path / "model")
    data = _tiny_lm.write_alpaca(tmp_path / "data.jsonl")
    cfg = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    assert cfg["plugins"] == [PLUGIN] and cfg["adapter"] == "lora"
    cfg.update({"base_model": str(model), "lora_r": 4, "lora_alpha": 8, "flat_lora_rho": 0.1, "flat_lora_seed": 1,
                "datasets": [{"path": str(data), "ds_type": "json", "type": "alpaca"}], "sequence_len": 64,
                "micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 3,
                "learning_rate": 0.001, "lr_scheduler": "constant", "warmup_ratio": None,
                "output_dir": str(tmp_path / "out"), "dataset_prepared_path": str(tmp_path / "prepared"),
                "logging_steps": 1, "save_strategy": "no", "bf16": False, "val_set_size": 0, **extra})
    cfg = {k: v for k, v in cfg.items() if v is not None}
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@pytest.fixture
def offline(monkeypatch):
    for k, v in {"AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
                 "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}.items():
        monkeypatch.setenv(k, v)


@needs_axolotl
def test_real_load_cfg_registers_the_plugin_and_switches_kernels_off(tmp_path, plugin_manager, offline):
    from axolotl.cli.config import load_cfg
    from axolotl.integrations.base import BasePlugin

    cfg = load_cfg(str(_write_cfg(tmp_path)))
    plugin = plugin_manager.get_instance().plugins[PLUGIN]
    assert isinstance(plugin, BasePlugin) and isinstance(plugin, fl_axolotl.FlatLoraPluginHooks)
    assert [cfg[k] for k in KERNELS] == [False] * 4
    assert fl_axolotl.flat_lora_config(cfg) == FlatLoraConfig(rho=0.1, seed=1)  # the keys survived validation


@needs_axolotl
def test_real_load_cfg_without_the_plugin_switches_kernels_on(tmp_path, plugin_manager, offline):
    from axolotl.cli.config import load_cfg

    cfg = load_cfg(str(_write_cfg(tmp_path, plugins=None, flat_lora_rho=None, flat_lora_seed=None)))
    assert [cfg[k] for k in KERNELS] == [True] * 4


@needs_axolotl
def test_real_load_cfg_refuses_a_kernel_set_on(tmp_path, plugin_manager, offline):
    from axolotl.cli.config import load_cfg

    with pytest.raises(ValueError, match=r"lora_o_kernel: True in the Axolotl config: .* set lora_o_kernel: false"):
        load_cfg(str(_write_cfg(tmp_path, lora_o_kernel=True)))


@needs_axolotl
def test_real_kernel_patches_are_detected_and_refused(tmp_path, plugin_manager):
    """Axolotl's own apply_lora_kernel_patches on a PEFT Llama: every projection is found behind a kernel, and
    post_trainer_create refuses the model naming the keys; with the flags the plugin sets nothing is patched."""
    from axolotl.monkeypatch.lora_kernels import apply_lora_kernel_patches
    from axolotl.utils.dict import DictDefault

    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    trainer = _trainer(tmp_path, target_modules=every)
    cfg = DictDefault({**base_cfg(), **{k: True for k in KERNELS[:3]}})
    apply_lora_kernel_patches(trainer.model, cfg)
    paths = fused_lora_paths(trainer.model)
    assert {p.kernel.rpartition(".")[2] for p in paths} == {"apply_lora_qkv", "apply_lora_o", "apply_lora_mlp_swiglu"}
    assert all(p.stack == "Axolotl" for p in paths)
    read = {n for p in paths for n in p.layers}
    lora = {n for n, m in trainer.model.named_modules() if hasattr(m, "lora_A")}
    assert lora == read  # every LoRA layer sits behind a kernel
    keys = "set lora_mlp_kernel: false, lora_o_kernel: false, lora_qkv_kernel: false in the Axolotl config"
    with pytest.raises(ValueError, match=keys):
        fl_axolotl.FlatLoraPluginHooks().post_trainer_create(DictDefault(base_cfg()), trainer)

    clean = _trainer(tmp_path, target_modules=every)
    apply_lora_kernel_patches(clean.model, DictDefault({**base_cfg(), **{k: False for k in KERNELS}}))
    assert fused_lora_paths(clean.model) == []  # only Axolotl's plain fallbacks (original_apply_qkv/o)


def _train(tmp_path: Path, **extra) -> subprocess.CompletedProcess:
    env = {**os.environ, "AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(Path(fl_axolotl.__file__).parents[2]),
                                                     os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", "axolotl.cli.train", str(_write_cfg(tmp_path, **extra))],
                          env=env, capture_output=True, text=True, timeout=900)


def _scalars(out: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in out.glob("runs/*/events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


@needs_axolotl
def test_axolotl_train_end_to_end(tmp_path):
    """``axolotl train`` with the plugin, offline on CPU: TensorBoard (report_to) records sigma_t of the cosine
    schedule at every step, flat_lora_config.json lands beside the adapter, and the losses differ from the same
    run at flat_lora_rho 0 (same seeds: the noise reached the forward)."""
    flat, plain = tmp_path / "flat", tmp_path / "plain"
    runs = {}
    for folder, rho in ((flat, 0.1), (plain, 0.0)):
        folder.mkdir()
        runs[folder] = proc = _train(folder, flat_lora_rho=rho)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lora_qkv_kernel, lora_o_kernel, lora_embedding_kernel set to false" in runs[flat].stdout + runs[flat].stderr
    sigma = _scalars(flat / "out", "train/flat_lora_sigma")
    assert sigma.keys() == {1, 2, 3}
    for t, value in sigma.items():
        assert math.isclose(value, sigma_at(t, 3, 0.1, "cosine"), rel_tol=1e-6)
    record = json.loads((flat / "out" / "flat_lora_config.json").read_text())
    assert record["total_steps"] == 3 and record["config"]["rho"] == 0.1 and record["config"]["seed"] == 1
    loss_flat, loss_plain = _scalars(flat / "out", "train/loss"), _scalars(plain / "out", "train/loss")
    assert loss_flat.keys() == loss_plain.keys() == {1, 2, 3}
    assert all(loss_flat[t] != loss_plain[t] for t in (1, 2, 3))
    assert torch.isfinite(torch.tensor(list(loss_flat.values()))).all()
