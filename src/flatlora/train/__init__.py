"""``flatlora train``: fine-tune a real model with LoRA or Flat-LoRA from one YAML recipe, on the real engines
(transformers' ``Trainer`` / ``Seq2SeqTrainer``, TRL's ``SFTTrainer``, accelerate for several processes), with
`FlatLoraCallback` added for ``method: flat-lora`` and nothing else changed.

    from flatlora.train import load_recipe, train
    metrics = train(load_recipe("recipes/glue/t5-base_sst2.yaml", ["--lora.r", "16"]))

Modules: `recipe` (the `Recipe` dataclass, built from dicts and YAML), `sections` (its model, task and data
sections), `resolve` (file + flags -> recipe), `passthrough` (``lora`` -> ``LoraConfig``, ``training`` ->
``TrainingArguments``), `data` (``datasets.load_dataset`` and column checks), `tasks` (per task type: model class,
inputs, Trainer, metric hooks), `zero_shot` (CLIP's frozen zero-shot head), `metrics` (scikit-learn scores, GSM8K
scorers), `runner` (`train`), `sweep` (``--methods``/``--seeds``: paired runs and their table), `cli` (the
sub-command). Needs the ``train`` extra (``pip install 'flatlora[train]'``: datasets, TRL, scikit-learn).
"""

from __future__ import annotations

from typing import Any

from .recipe import Recipe
from .resolve import load_recipe
from .sections import DataSource, DataSpec, ModelSpec, TaskSpec

__all__ = ["DataSource", "DataSpec", "ModelSpec", "Recipe", "TaskSpec", "load_recipe", "prepare", "run", "train"]


def train(recipe: Recipe) -> dict[str, Any]:
    """Run ``recipe`` (see `flatlora.train.runner.train`); return its metrics."""
    from .runner import train as _train

    return _train(recipe)


def run(prepared: Any) -> dict[str, Any]:
    """Train, evaluate and write a prepared run (see `flatlora.train.runner.run`); return its metrics."""
    from .runner import run as _run

    return _run(prepared)


def prepare(recipe: Recipe) -> Any:
    """Load and check a run without training or writing (see `flatlora.train.runner.prepare`)."""
    from .runner import prepare as _prepare

    return _prepare(recipe)
