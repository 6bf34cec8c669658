"""Pluggable tasks: a task is a model loader, data splits, a metric, LoRA targets and a default rho.

Adding a task is one small module defining a `Task` subclass, plus its line in ``_REGISTRY`` below
(``TASKS`` lists the registry's names). Everything the harness needs goes through this interface, so
`flatlora compare --task NAME` just works:

* ``validate(cfg)`` (a classmethod): check the config fields only this task reads (text: ``max_length``;
  vision: ``image_size``, ``severities``, ``corruptions``), raising ``ValueError`` naming the field. Every
  registered task checks its fields whatever ``cfg.task`` is, so a config file stays valid for each task.
* ``build_model(cfg, seed)``: the pretrained backbone with a freshly initialised head (fp32, CPU);
  the head's initial values come from ``torch.Generator(seed)``.
* ``lora_kwargs(cfg)``: ``target_modules``, ``modules_to_save``/``task_type`` for the PEFT config.
* ``splits(cfg)``: `Splits` of `TensorData` (train, test, named out-of-domain sets), deterministic in
  ``cfg.data_seed`` and the sizes, identical for every method and seed.
* ``collate(data, cfg)``: a `TensorData` slice -> the model's keyword inputs plus ``labels``.
* ``logits(model, batch)``: class scores; the loss is cross-entropy and the metric accuracy.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TensorData:
    """Examples as a dict of tensors sharing their first dimension (``labels`` among them)."""

    tensors: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        sizes = {k: len(v) for k, v in self.tensors.items()}
        if "labels" not in self.tensors or len(set(sizes.values())) != 1:
            raise ValueError(f"TensorData needs 'labels' and equal first dimensions, got sizes {sizes}")

    def __len__(self) -> int:
        return len(self.tensors["labels"])

    def take(self, index: torch.Tensor | slice) -> "TensorData":
        return TensorData({k: v[index] for k, v in self.tensors.items()})

    def head(self, n: int | None) -> "TensorData":
        return self if n is None or n >= len(self) else self.take(slice(0, n))

    def chunks(self, size: int) -> Iterator["TensorData"]:
        for i in range(0, len(self), size):
            yield self.take(slice(i, i + size))


@dataclass
class Splits:
    train: TensorData
    test: TensorData
    ood: dict[str, TensorData] = field(default_factory=dict)


class Task:
    """Base class of a task; subclasses fill in the class attributes and the four methods."""

    name: str = ""
    description: str = ""
    default_rho: float = 0.05
    num_labels: int = 2

    @classmethod
    def validate(cls, cfg: Any) -> None:
        """Check the fields of ``cfg`` (an `ExperimentConfig`) that only this task reads; none by default."""

    def build_model(self, cfg: Any, seed: int) -> nn.Module:
        raise NotImplementedError

    def lora_kwargs(self, cfg: Any) -> dict[str, Any]:
        raise NotImplementedError

    def splits(self, cfg: Any) -> Splits:
        raise NotImplementedError

    def collate(self, data: TensorData, cfg: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def ood_groups(self, cfg: Any) -> dict[str, list[str]]:
        """Named groups of OOD sets averaged in the table (vision: one group per severity)."""
        return {}

    # --- shared --------------------------------------------------------------------------------------
    def run_splits(self, cfg: Any) -> Splits:
        """The splits a run trains and is measured on: `splits` with ``cfg.label_noise`` of the training labels
        replaced (`flip_labels`, drawn from ``cfg.data_seed``); test and out-of-domain sets are untouched."""
        splits = self.splits(cfg)
        if not getattr(cfg, "label_noise", 0.0):
            return splits
        labels = flip_labels(splits.train.tensors["labels"], cfg.label_noise, self.num_labels, cfg.data_seed)
        return Splits(TensorData({**splits.train.tensors, "labels": labels}), splits.test, splits.ood)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of one batch (a scalar tensor); by default `ce_loss`."""
        return self.ce_loss(model, batch)

    def ce_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy of one batch from the logits alone (no method-specific regulariser)."""
        return F.cross_entropy(self.logits(model, batch).float(), batch["labels"])

    def eval_order(self, data: TensorData) -> torch.Tensor | None:
        """An order of ``data`` that makes evaluation cheaper (text: by length, so a batch is cut to its own
        longest example, not the longest of a random draw); ``None``: as stored. Accuracy and loss are sums over
        examples, so the order changes nothing but the rounding of the loss sum."""
        return None

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TensorData, cfg: Any,
                 device: torch.device | str = "cpu") -> dict[str, float]:
        """Accuracy and mean loss over ``data`` (model in whatever mode the caller set)."""
        order = self.eval_order(data)
        if order is not None:
            data = data.take(order)
        correct, loss_sum, n = 0, 0.0, 0
        for chunk in data.chunks(cfg.eval_batch_size):
            batch = to_device(self.collate(chunk, cfg), device)
            logits = self.logits(model, batch).float()
            loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
            n += len(chunk)
        return {"accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1), "n": n}


def flip_labels(labels: torch.Tensor, fraction: float, num_classes: int, seed: int) -> torch.Tensor:
    """Symmetric label noise: a copy of ``labels`` (shape ``(n,)``, ints in ``[0, num_classes)``) in which exactly
    ``round(fraction * n)`` examples, chosen by a seeded permutation, get a different class drawn uniformly from
    the other ``num_classes - 1`` (binary: the label is flipped). Deterministic in ``seed``; never in place."""
    if not 0 <= fraction < 1:
        raise ValueError(f"label noise fraction={fraction} must be in [0, 1)")
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}: label noise needs at least 2 classes")
    gen = torch.Generator().manual_seed(int(seed) + 424_242)
    n = len(labels)
    picked = torch.randperm(n, generator=gen)[: round(fraction * n)]
    shift = torch.randint(1, num_classes, (len(picked),), generator=gen)  # 1..C-1: never the same class
    out = labels.clone()
    out[picked] = (labels[picked] + shift) % num_classes
    return out


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def init_linear_(layer: nn.Linear, gen: torch.Generator, std: float = 0.02) -> None:
    """Re-initialise a new classification head from a local generator (HF would use the global RNG)."""
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * std)
        if layer.bias is not None:
            layer.bias.zero_()


# name -> "module:class", imported on first use (each task module imports this one for `Task`)
_REGISTRY: dict[str, str] = {"text": ".text:TextTask", "vision": ".vision:VisionTask"}
TASKS: tuple[str, ...] = tuple(_REGISTRY)
_INSTANCES: dict[str, Task] = {}


def task_class(name: str) -> type[Task]:
    """The `Task` subclass registered as ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(sorted(_REGISTRY))}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module, __name__), cls)


def get_task(name: str) -> Task:
    """The task registered as ``name`` (one shared instance, which caches its data)."""
    if name not in _INSTANCES:
        _INSTANCES[name] = task_class(name)()
    return _INSTANCES[name]


def validate_config(cfg: Any) -> None:
    """Check ``cfg.task`` and every registered task's own fields of ``cfg`` (see `Task.validate`)."""
    task_class(cfg.task)
    for name in TASKS:
        task_class(name).validate(cfg)


__all__ = ["Splits", "Task", "TensorData", "TASKS", "flip_labels", "get_task", "init_linear_", "task_class",
           "to_device", "validate_config"]
