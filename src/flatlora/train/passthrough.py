"""The recipe's pass-through sections: ``lora`` -> ``peft.LoraConfig`` and ``training`` -> the task's
``TrainingArguments`` class, both checked by building the real class (unknown keys and wrong types are named first,
with the recipe key), never re-implemented."""

from __future__ import annotations

import warnings
from typing import Any, Protocol

from . import _types
from .sections import TaskSpec


class _Sections(Protocol):
    """What this module reads of a `flatlora.train.recipe.Recipe` (a protocol: recipe.py imports this module)."""

    lora: dict[str, Any]
    training: dict[str, Any]
    task: TaskSpec
    method: str
    output_dir: str | None

PEFT_TASK_TYPES = {"sequence-classification": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM", "causal-lm-sft": "CAUSAL_LM",
                   "image-classification": None}


def training_class(task_type: str) -> type:
    """``trl.SFTConfig`` for causal-lm-sft, ``Seq2SeqTrainingArguments`` for seq2seq, else ``TrainingArguments``."""
    if task_type == "causal-lm-sft":
        try:
            from trl import SFTConfig
        except ImportError:
            raise ValueError("task.type=causal-lm-sft needs TRL: pip install 'flatlora[train]' (or pip install trl)"
                             ) from None
        return SFTConfig
    if task_type == "seq2seq":
        from transformers import Seq2SeqTrainingArguments

        return Seq2SeqTrainingArguments
    from transformers import TrainingArguments

    return TrainingArguments


def section_types(section: str, task_type: str | None) -> dict[str, Any]:
    """``{field: annotation}`` of the class behind ``lora`` or ``training`` (for typing flag values)."""
    if section == "lora":
        from peft import LoraConfig

        return _types.field_types(LoraConfig)
    return _types.field_types(training_class(task_type or "sequence-classification"))


def lora_values(recipe: _Sections) -> dict[str, Any]:
    from peft import LoraConfig

    values = _types.check_mapping(recipe.lora, _types.field_types(LoraConfig), "lora.", "peft.LoraConfig")
    task_type = PEFT_TASK_TYPES[recipe.task.type]
    if task_type is not None:
        values.setdefault("task_type", task_type)
    elif "modules_to_save" not in values and recipe.task.image_head == "linear":
        values["modules_to_save"] = ["classifier"]  # the new classification head is trained in full
    return values


def lora_config(recipe: _Sections) -> Any:
    """The ``peft.LoraConfig`` of the recipe (``ValueError`` naming the ``lora.`` key on a bad value)."""
    from peft import LoraConfig

    values = lora_values(recipe)
    try:
        return LoraConfig(**values)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"lora: {_first_line(exc)}") from None


def training_values(recipe: _Sections) -> dict[str, Any]:
    """The ``training`` dict checked against the class's fields, with the run's defaults filled in where unset."""
    cls = training_class(recipe.task.type)
    values = _types.check_mapping(recipe.training, _types.field_types(cls), "training.", cls.__name__)
    values["output_dir"] = recipe.output_dir or f"runs/train/{recipe.method}"
    task = recipe.task
    if task.type == "image-classification":
        values.setdefault("remove_unused_columns", False)  # the image transform needs the raw image column
    if task.type == "seq2seq":
        values.setdefault("predict_with_generate", not task.label_words)
        values.setdefault("generation_max_length", task.max_target_length)
    return values


def training_args(recipe: _Sections, *, hardware_checks: bool = True) -> Any:
    """The recipe's training arguments object. ``hardware_checks=False`` (validation on a machine without the
    recipe's GPU): a setting that only fails for want of a GPU (bf16, fp16, tf32) is validated as if on CPU."""
    cls = training_class(recipe.task.type)
    values = training_values(recipe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # e.g. TRL's own gradient_checkpointing default
        try:
            return cls(**values)
        except (ValueError, TypeError) as exc:
            error = exc
        if not hardware_checks:
            import torch

            if not torch.cuda.is_available():
                for extra in ({"use_cpu": True}, {"use_cpu": True, "fp16": False, "tf32": None}):
                    try:
                        return cls(**{**values, **extra})
                    except (ValueError, TypeError):
                        continue
    raise ValueError(f"training: {_first_line(error)} (checked by {cls.__module__.split('.')[0]}."
                     f"{cls.__name__})") from None


def validate(recipe: _Sections) -> None:
    """Check the ``lora`` and ``training`` sections by building the real classes (no GPU needed); their values
    are stored coerced (``"5e-4"`` as PyYAML reads it -> ``0.0005``)."""
    from peft import LoraConfig

    recipe.lora = _types.check_mapping(recipe.lora, _types.field_types(LoraConfig), "lora.", "peft.LoraConfig")
    cls = training_class(recipe.task.type)
    recipe.training = _types.check_mapping(recipe.training, _types.field_types(cls), "training.", cls.__name__)
    lora_config(recipe)
    training_args(recipe, hardware_checks=False)


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
