"""`Recipe`: everything `flatlora train` needs, in one typed, validated dataclass that round-trips through YAML.

Sections (every key is also a flag: ``--section.key value``; flags override the file)::

    model:      ModelSpec   hub id or local folder, dtype, optional bitsandbytes 4-bit
    task:       TaskSpec    causal-lm-sft | seq2seq | sequence-classification | image-classification, columns,
                            templates, metrics
    data:       DataSpec    train and eval sources for ``datasets.load_dataset`` (hub id + config + split, or
                            local json/jsonl/csv/parquet files), column renames, filters
    lora:       dict        any ``peft.LoraConfig`` field
    training:   dict        any ``TrainingArguments`` (``Seq2SeqTrainingArguments``, TRL ``SFTConfig``) field
    flat_lora:  FlatLoraConfig fields (used when ``method: flat-lora``)
    method:     lora | flat-lora   (the only difference: `FlatLoraCallback` is added to the Trainer)
    output_dir: where the adapter, metrics.json, recipe.yaml and logs go

Building a `Recipe` validates every value (``ValueError`` naming the key, e.g. ``training.learning_rat``, and the
fix), including the ``lora`` and ``training`` dicts, which are checked by building the real PEFT/transformers
classes. Nothing is loaded or written.

This module holds the whole: `Recipe`, `build` (a section from a dict, errors naming the full key), its YAML
round-trip and `resolve_paths`; the model, task and data sections and their checks are in `.sections`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import _dataclass_io as dio
from ..config import FlatLoraConfig
from . import _types
from .sections import EMBEDDED_PREFIX, DataSource, DataSpec, ModelSpec, TaskSpec, field, one_of

METHODS = ("lora", "flat-lora")
SECTIONS = ("model", "task", "data", "lora", "training", "flat_lora", "early_stopping_patience", "method",
            "output_dir")


@dataclass
class Recipe:
    """One fine-tuning run of `flatlora train`; see the module docstring and ``flatlora train --help``."""

    model: ModelSpec | None = field(None, "the base model")
    task: TaskSpec | None = field(None, "the task type and how rows become inputs")
    data: DataSpec | None = field(None, "train and eval data")
    lora: dict[str, Any] = field({}, "peft.LoraConfig fields (task_type is set from the task when omitted)")
    training: dict[str, Any] = field(
        {}, "TrainingArguments fields (Seq2SeqTrainingArguments for seq2seq, trl.SFTConfig for causal-lm-sft); "
            "output_dir is the recipe's own key")
    flat_lora: FlatLoraConfig | None = field(
        None, "FlatLoraConfig fields (method flat-lora); flat_lora.seed, the noise seed, defaults to training.seed "
              "(each seed its own noise stream); set it to fix the noise across training seeds")
    early_stopping_patience: int | None = field(
        None, "stop when training.metric_for_best_model has not improved for this many evaluations (transformers' "
              "EarlyStoppingCallback; needs training.load_best_model_at_end); null: no early stopping")
    method: str = field("flat-lora", "lora or flat-lora: flat-lora adds FlatLoraCallback, nothing else changes")
    output_dir: str | None = field(None, "run folder (default: runs/train/<recipe file name>/<method>/seed<seed>)")

    def __post_init__(self) -> None:
        for name, cls in (("model", ModelSpec), ("task", TaskSpec), ("data", DataSpec)):
            value = getattr(self, name)
            if value is None:
                raise ValueError(f"{name} is required: the recipe has no {name} section")
            if isinstance(value, dict):
                setattr(self, name, build(cls, value, name + "."))
        for name in ("lora", "training"):
            value = {} if getattr(self, name) is None else getattr(self, name)
            if not isinstance(value, dict):
                raise ValueError(f"{name} must be a mapping of field names to values, got {type(value).__name__}")
            setattr(self, name, dict(value))
        # the noise seed follows the training seed unless flat_lora.seed is given: three training seeds are three
        # noise streams, as three independent trials need (a FlatLoraConfig object counts as given)
        flat = {} if self.flat_lora is None else self.flat_lora
        self.noise_seed_derived = isinstance(flat, dict) and "seed" not in flat
        if isinstance(flat, dict):
            if self.noise_seed_derived:
                flat = {**flat, "seed": self.training_seed}
            self.flat_lora = build(FlatLoraConfig, flat, "flat_lora.")
        one_of("method", self.method, METHODS)
        if self.early_stopping_patience is not None:
            if self.early_stopping_patience < 1:
                raise ValueError(f"early_stopping_patience={self.early_stopping_patience} must be >= 1 (or null)")
            if not self.training.get("load_best_model_at_end"):
                raise ValueError("early_stopping_patience needs training.load_best_model_at_end: true (and an "
                                 "eval_strategy equal to save_strategy)")
            if self.training.get("eval_strategy", "no") == "no":
                raise ValueError("early_stopping_patience needs evaluations: set training.eval_strategy (and "
                                 "save_strategy) to epoch or steps, or early_stopping_patience to null")
        if "output_dir" in self.training:
            raise ValueError("training.output_dir: set the run folder with the recipe's top-level output_dir")
        if self.task.type == "causal-lm-sft" and self.data.eval is not None and "gsm8k_accuracy" in \
                self.task.metrics and not self.task.answer_column:
            raise ValueError("task.answer_column must name the eval column holding the reference answer")
        from . import passthrough  # the lora and training dicts, checked by building the real classes

        passthrough.validate(self)

    @property
    def training_seed(self) -> int:
        """``training.seed``, or ``TrainingArguments``' default 42 when the recipe does not set it."""
        seed = self.training.get("seed", 42)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise ValueError(f"training.seed={seed!r} must be an integer in [0, 2**63)")
        return seed

    # --- serialisation ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data; a derived noise seed is left out (it is derived again from training.seed on load)."""
        out = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if getattr(self, "noise_seed_derived", False):
            del out["flat_lora"]["seed"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        return build(cls, data, "")

    def to_yaml(self) -> str:
        import yaml

        class Dumper(yaml.SafeDumper):  # templates with line breaks stay one readable "...\n..." line
            pass

        def text(dumper: yaml.SafeDumper, value: str) -> Any:
            style = '"' if "\n" in value else None
            return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

        Dumper.add_representer(str, text)
        body = yaml.dump(self.to_dict(), Dumper=Dumper, sort_keys=False, allow_unicode=True, width=120)
        if self.noise_seed_derived:
            body += f"# flat_lora.seed: {self.flat_lora.seed}, derived from training.seed (set it to fix it)\n"
        return body

    @classmethod
    def from_yaml(cls, text: str) -> "Recipe":
        return cls.from_dict(dio.parse_text(text, "recipe.yaml") or {})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml(), encoding="utf-8")
        return path

    def replace(self, **changes: Any) -> "Recipe":
        return Recipe.from_dict({**self.to_dict(), **changes})


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


_NESTED = {"model": ModelSpec, "task": TaskSpec, "data": DataSpec, "train": DataSource, "eval": DataSource,
           "flat_lora": FlatLoraConfig}


def nested_class(cls: type, name: str) -> type | None:
    """The dataclass a field of ``cls`` holds (``Recipe.model`` -> ModelSpec), or None for a plain value."""
    sub = _NESTED.get(name)
    return sub if sub is not None and name in {f.name for f in dataclasses.fields(cls)} and \
        cls in (Recipe, DataSpec) else None


def build(cls: type, data: Any, prefix: str) -> Any:
    """``cls(**data)`` for a recipe dataclass, sections built recursively; every error is one ``ValueError`` that
    names the full key (``data.train.split``) and what it takes."""
    where = prefix[:-1] or "the recipe"
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping of keys to values, got {type(data).__name__} {data!r}")
    types_ = _types.field_types(cls)
    names = list(types_)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in types_:
            valid = ", ".join(names)
            raise ValueError(f"unknown key {prefix}{key}{_types.suggest(str(key), names)}; keys of {where}: {valid}")
        if cls is Recipe and (key in ("lora", "training") or key == "flat_lora" and isinstance(value, dict)):
            # flat_lora is built by Recipe itself: it needs to know whether the noise seed was given
            kwargs[key] = value
            continue
        sub = nested_class(cls, key)
        if sub is not None and value is not None:
            kwargs[key] = value if isinstance(value, sub) else build(sub, value, f"{prefix}{key}.")
            continue
        value = _types.coerce(value, types_[key])
        if not _types.fits(value, types_[key]):
            raise ValueError(f"{prefix}{key}={value!r} must be {_types.describe(types_[key])}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ValueError as exc:
        msg = " ".join(str(exc).split())
        if cls is Recipe or any(msg.startswith(p) for p in ("unknown key ", "model.", "task.", "data.", "lora.",
                                                            "training.", "flat_lora.")):
            raise ValueError(msg) from None
        first = msg.split("=")[0].split(":")[0].split(" ")[0]
        if first in types_:
            raise ValueError(f"{prefix}{msg}") from None
        raise ValueError(f"{where}: {msg}") from None


def resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Make the relative local paths of a recipe file's raw data absolute against ``base`` (the file's folder):
    ``data_files`` always; ``model.name_or_path``, ``model.tokenizer`` and a data ``path`` when they start with
    ``./`` or ``../`` or name something that exists there (otherwise they stay hub ids, or paths relative to the
    working directory). ``~`` is expanded."""
    def fix(value: Any, always: bool) -> Any:
        if not isinstance(value, str) or "://" in value or value.startswith(EMBEDDED_PREFIX):
            return value
        path = Path(value).expanduser()
        if path.is_absolute():
            return str(path)
        if always or value.startswith(("./", "../")) or (base / path).exists():
            return str((base / path).resolve())
        return value

    model = raw.get("model")
    if isinstance(model, dict):
        for key in ("name_or_path", "tokenizer"):
            if key in model:
                model[key] = fix(model[key], False)
    data = raw.get("data")
    for split in ("train", "eval"):
        src = data.get(split) if isinstance(data, dict) else None
        if not isinstance(src, dict):
            continue
        if "path" in src:
            src["path"] = fix(src["path"], False)
        files = src.get("data_files")
        if isinstance(files, str):
            src["data_files"] = fix(files, True)
        elif isinstance(files, list):
            src["data_files"] = [fix(f, True) for f in files]
