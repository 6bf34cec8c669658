"""The recipe's data: ``datasets.load_dataset`` with the recipe's arguments, column renames, filters, and the
checks that every column the task needs is there (one ``ValueError`` naming the recipe key and the fix)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .._extras import require
from .sections import DataSource, TaskSpec, template_fields

if TYPE_CHECKING:
    from datasets import Dataset

    from .recipe import Recipe


def describe(src: DataSource) -> str:
    if src.data_files:
        return f"{src.path} files {', '.join(Path(f).name for f in src.data_files)} (split {src.split})"
    return f"{src.path}" + (f" [{src.name}]" if src.name else "") + f" split {src.split}"


def check_local_files(recipe: "Recipe") -> None:
    """Fail early on local data files and local model folders that do not exist (no loading)."""
    for role in ("train", "eval"):
        src = getattr(recipe.data, role)
        if src is None:
            continue
        for f in src.data_files or []:
            if "://" not in f and not any(c in f for c in "*?[") and not Path(f).exists():
                raise ValueError(f"data.{role}.data_files: {f!r} does not exist; give the path of a json, jsonl, "
                                 "csv or parquet file (relative paths in a recipe are relative to its folder)")


def _hub_hint(src: DataSource) -> str:
    args = repr(src.path) + (f", {src.name!r}" if src.name else "")
    return (f"on a machine with internet run python -c \"import datasets; datasets.load_dataset({args})\" (it "
            "fills ~/.cache/huggingface, which you can copy here), or use local files (data_files)")


def load_source(src: DataSource, role: str, cache_dir: str | None = None,
                keep: Callable[["Dataset"], "Dataset"] | None = None) -> "Dataset":
    """``datasets.load_dataset(path, name, split=..., data_files=...)``, then renames, filters, ``keep`` (a row
    selection of the task, e.g. the length limit of `flatlora.train.tasks.drop_long`) and max_samples."""
    from huggingface_hub import constants

    datasets = require("datasets", "flatlora train")

    key = f"data.{role}"
    kwargs: dict[str, Any] = {"split": src.split}
    if src.name:
        kwargs["name"] = src.name
    if src.data_files:
        kwargs["data_files"] = {src.split: list(src.data_files)}
    if src.revision:
        kwargs["revision"] = src.revision
    if cache_dir:
        kwargs["cache_dir"] = cache_dir
    offline = bool(constants.HF_HUB_OFFLINE)
    local = bool(src.data_files) or Path(src.path).exists()
    bars = datasets.utils.logging.is_progress_bar_enabled()
    if local:  # local files load in moments: no bars, so a bad recipe still ends in one line on stderr
        datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(src.path, **kwargs)
    except FileNotFoundError as exc:
        if src.data_files:
            raise ValueError(f"{key}.data_files: {_line(exc)}") from None
        if offline or _looks_like_path(src.path):
            raise ValueError(f"{key}.path={src.path!r} is not a local dataset folder, and as a hub id it is not in "
                             f"the datasets cache{' (offline: HF_HUB_OFFLINE=1)' if offline else ''}: "
                             f"{_hub_hint(src)}") from None
        raise ValueError(f"{key}.path={src.path!r}: {_line(exc)}") from None
    except ConnectionError as exc:  # OfflineModeIsEnabled, no network
        raise ValueError(f"{key}.path={src.path!r} is not in the datasets cache and the Hugging Face Hub cannot be "
                         f"reached ({_line(exc)}): {_hub_hint(src)}") from None
    except ValueError as exc:
        msg = _line(exc)
        fix = f"set {key}.split" if "split" in msg.lower() else f"set {key}.name" if "config" in msg.lower() else \
            f"check {key}"
        raise ValueError(f"{key} ({describe(src)}): {msg}; {fix}") from None
    except Exception as exc:  # e.g. DatasetNotFoundError, a malformed file
        if type(exc).__name__ in ("DatasetNotFoundError", "RepositoryNotFoundError", "GatedRepoError"):
            raise ValueError(f"{key}.path={src.path!r}: {_line(exc)}; {_hub_hint(src)}") from None
        raise ValueError(f"{key} ({describe(src)}): cannot load it: {type(exc).__name__}: {_line(exc)}") from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    if isinstance(ds, dict):  # a DatasetDict: split was not applied
        raise ValueError(f"{key}: got several splits {sorted(ds)}; set {key}.split")
    return _shape(ds, src, key, keep)


def _looks_like_path(path: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else names a local path."""
    return path.startswith(("/", "./", "../", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path


def _shape(ds: "Dataset", src: DataSource, key: str, keep: Callable[["Dataset"], "Dataset"] | None = None
           ) -> "Dataset":
    for old, new in src.columns.items():
        if old not in ds.column_names:
            raise ValueError(f"{key}.columns: {old!r} is not a column of {describe(src)}; its columns are "
                             f"{ds.column_names}")
        if old != new:
            if new in ds.column_names:
                ds = ds.remove_columns(new)
            ds = ds.rename_column(old, new)
    for column, text in src.filter.items():
        if column not in ds.column_names:
            raise ValueError(f"{key}.filter: {column!r} is not a column of {describe(src)} (after renames); its "
                             f"columns are {ds.column_names}")
        ds = ds.filter(lambda value, t=text: t in str(value), input_columns=[column])
    for column, texts in src.exclude.items():
        if column not in ds.column_names:
            raise ValueError(f"{key}.exclude: {column!r} is not a column of {describe(src)} (after renames); its "
                             f"columns are {ds.column_names}")
        lowered = [t.lower() for t in texts]
        ds = ds.filter(lambda value, ts=lowered: not any(t in str(value).lower() for t in ts), input_columns=[column])
    if keep is not None and len(ds):
        ds = keep(ds)
    if src.max_samples is not None:
        ds = ds.select(range(min(src.max_samples, len(ds))))
    if len(ds) == 0:
        raise ValueError(f"{key}: no rows left in {describe(src)} (check {key}.filter, {key}.exclude, "
                         f"{key}.max_samples and task.max_train_tokens)")
    return ds


def required_columns(task: TaskSpec, role: str) -> dict[str, str]:
    """``{column: the recipe key that needs it}`` for the train or eval data of a task."""
    need: dict[str, str] = {}
    if task.type == "sequence-classification":
        need.update({c: "task.text_columns" for c in task.text_columns})
        need[task.label_column] = "task.label_column"
    elif task.type == "image-classification":
        need[task.image_column] = "task.image_column"
        need[task.label_column] = "task.label_column"
    else:
        need.update({c: "task.prompt_template" for c in template_fields(task.prompt_template, "task.prompt_template")})
        if task.label_words:
            need[task.label_column] = "task.label_column"
        elif task.type == "seq2seq" or role == "train":
            need.update({c: "task.target_template"
                         for c in template_fields(task.target_template, "task.target_template")})
        if task.type == "causal-lm-sft" and role == "eval" and "gsm8k_accuracy" in task.metrics:
            need[task.answer_column] = "task.answer_column"
    return need


def check_columns(ds: "Dataset", src: DataSource, task: TaskSpec, role: str) -> None:
    for column, needed_by in required_columns(task, role).items():
        if column not in ds.column_names:
            raise ValueError(
                f"data.{role}: column {column!r} (needed by {needed_by}) is not in {describe(src)}; its columns are "
                f"{ds.column_names}; rename one with data.{role}.columns: {{<column>: {column}}} or change {needed_by}")


def label_names(train: "Dataset", task: TaskSpec) -> list[str] | None:
    """Class names of a classification task: the train label column's ``ClassLabel`` names, if it has them."""
    from datasets import ClassLabel

    feature = train.features.get(task.label_column)
    return list(feature.names) if isinstance(feature, ClassLabel) else None


def encode_labels(train: "Dataset", evals: "Dataset | None", task: TaskSpec) -> tuple["Dataset", "Dataset | None"]:
    """Text labels (e.g. ``positive`` in a csv) -> ``ClassLabel`` ids (sorted names; eval mapped the same way)."""
    from datasets import ClassLabel, Value

    col = task.label_column
    feature = train.features[col]
    if isinstance(feature, ClassLabel) or (isinstance(feature, Value) and feature.dtype.startswith(("int", "uint"))):
        return train, evals
    if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
        raise ValueError(f"task.label_column={col!r} holds {feature}; classification needs integer labels 0..K-1 or "
                         "text class names")
    train = train.class_encode_column(col)
    if evals is not None:
        names = train.features[col].names
        unknown = sorted(set(evals[col]) - set(names))
        if unknown:
            raise ValueError(f"data.eval: labels {unknown[:5]} in column {col!r} never occur in the training data "
                             f"(classes: {names})")
        evals = evals.cast_column(col, ClassLabel(names=names))
    return train, evals


def num_classes(train: "Dataset", task: TaskSpec) -> tuple[int, list[str] | None]:
    """(number of classes, class names or None): task.num_labels, else the ClassLabel names, else max + 1."""
    names = label_names(train, task)
    if task.num_labels is not None:
        if names is not None and len(names) != task.num_labels:
            raise ValueError(f"task.num_labels={task.num_labels} but the data's label column has {len(names)} "
                             f"classes {names}; drop task.num_labels or fix it")
        return task.num_labels, names
    if task.label_words:
        return len(task.label_words), names
    if names is not None:
        return len(names), names
    labels = train[task.label_column]
    if min(labels) < 0:
        raise ValueError(f"data.train: column {task.label_column!r} has negative labels (e.g. GLUE test splits, "
                         "which have no labels); train on a labelled split")
    return int(max(labels)) + 1, None


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
