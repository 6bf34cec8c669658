"""Evaluation the paper used: GLUE classification scores (scikit-learn), top-1 accuracy, and GSM8K accuracy by
greedy generation with the final number extracted and compared exactly.

GSM8K is scored twice (`gsm8k_accuracy`). The headline, ``eval_gsm8k_accuracy``, is the official code's scorer
(`official_gsm8k_number`, nblt/Flat-LoRA ``eval_gsm8k_batch.py``: ``extract_num``), which the paper's numbers use:
commas removed, then the digits after the first ``####`` (``####\s*(\d+)``), else the digits after ``#### -``
(the sign dropped), else 0; applied to the generation and to the reference alike. Its quirks are kept on purpose:
``#### 3.5`` reads 3, ``#### -5`` reads 5, and a generation without ``####`` reads 0. Beside it,
``eval_gsm8k_accuracy_lenient`` uses `extract_final_number`, which also reads "The answer is N" and the last number
(it can only score higher on answers that lack ``####``, and it reads negatives and decimals exactly):

Lenient answer extraction (`extract_final_number`), applied the same way to the reference answer and to the
generated text:

1. if the text holds ``####`` (GSM8K's reference format, which MetaMathQA's GSM answers also end with), the
   first number after the first ``####``;
2. else, if it holds "The answer is" (MetaMathQA's last line; any case), the first number after its last
   occurrence;
3. else the last number in the text; no number at all: no answer (counted wrong).

A number is an optional sign (``-`` or ``−``), an optional ``$``, digits with optional thousands commas
(``1,234``; a comma is a thousands separator only before exactly three digits) and an optional decimal part
(``-3.75``, ``.5``). Numbers compare as exact decimals: ``1,234`` = ``1234`` = ``1234.00``, ``0.5`` = ``.5``;
``1234.5`` != ``1234``. Fractions (``3/4``), words ("five") and units are not converted.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Sequence

import numpy as np

from .._extras import require

_NUMBER = re.compile(r"(?<![\d.])([-−]?)(?:\$\s?)?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?!\d)")
_ANSWER_IS = re.compile(r"the answer is", re.IGNORECASE)


def _numbers(text: str) -> list[Decimal]:
    out = []
    for sign, digits in _NUMBER.findall(text):
        try:
            value = Decimal(digits.replace(",", ""))
        except InvalidOperation:  # pragma: no cover - the pattern only matches decimal literals
            continue
        out.append(-value if sign else value)
    return out


def extract_final_number(text: str) -> str | None:
    """The final answer of a GSM8K-style solution as a canonical decimal string (``"1234"``, ``"-3.5"``), or
    None when the text holds no number. See the module docstring for the rules."""
    if not isinstance(text, str):
        return None
    if "####" in text:
        found = _numbers(text.split("####", 1)[1])
        value = found[0] if found else None
    else:
        marks = list(_ANSWER_IS.finditer(text))
        if marks:
            found = _numbers(text[marks[-1].end():])
            value = found[0] if found else None
        else:
            found = _numbers(text)
            value = found[-1] if found else None
    return None if value is None else _canonical(value)


def _canonical(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


_OFFICIAL = re.compile(r"####\s*(\d+)")
_OFFICIAL_NEGATIVE = re.compile(r"####\s*-(\d+)")


def official_gsm8k_number(text: str) -> int:
    """The official code's GSM8K answer (``extract_num`` of nblt/Flat-LoRA ``eval_gsm8k_batch.py``): commas
    removed, the digits after the first ``####``, else after ``#### -`` (sign dropped), else 0."""
    text = str(text).replace(",", "")
    match = _OFFICIAL.search(text) or _OFFICIAL_NEGATIVE.search(text)
    return int(match.group(1)) if match else 0


def gsm8k_accuracy(generations: Sequence[str], references: Sequence[str]) -> tuple[float, float, list[dict]]:
    """(official accuracy, lenient accuracy, one record per example). The official score compares
    `official_gsm8k_number` of generation and reference; the lenient one `extract_final_number`. Records hold
    ``prediction``, ``reference``, ``correct`` (official) and ``lenient_prediction``, ``lenient_reference``,
    ``lenient_correct``."""
    if len(generations) != len(references):
        raise ValueError(f"{len(generations)} generations but {len(references)} references")
    if not references:
        raise ValueError("no evaluation examples: gsm8k_accuracy needs at least one")
    records = []
    for i, (gen, ref) in enumerate(zip(generations, references)):
        gold = extract_final_number(ref)
        if gold is None:
            raise ValueError(f"eval row {i}: the reference answer {ref[-80:]!r} holds no number; check "
                             "task.answer_column")
        pred = extract_final_number(gen)
        official, official_gold = official_gsm8k_number(gen), official_gsm8k_number(ref)
        records.append({"prediction": official, "reference": official_gold, "correct": official == official_gold,
                        "lenient_prediction": pred, "lenient_reference": gold, "lenient_correct": pred == gold})
    n = len(records)
    return sum(r["correct"] for r in records) / n, sum(r["lenient_correct"] for r in records) / n, records


def classification_metrics(predictions: Sequence[int], labels: Sequence[int], names: Sequence[str]) -> dict[str, float]:
    """``accuracy``, ``f1`` (of class 1 for two classes, as GLUE's MRPC; macro average otherwise) and
    ``matthews_correlation`` (CoLA) with scikit-learn, for the metric names asked for."""
    sk = require("sklearn.metrics", "flatlora train's classification metrics")
    accuracy_score, f1_score, matthews_corrcoef = sk.accuracy_score, sk.f1_score, sk.matthews_corrcoef

    y_pred, y_true = np.asarray(predictions), np.asarray(labels)
    if y_pred.shape != y_true.shape:
        raise ValueError(f"{y_pred.shape[0]} predictions but {y_true.shape[0]} labels")
    out: dict[str, float] = {}
    for name in names:
        if name == "accuracy":
            out[name] = float(accuracy_score(y_true, y_pred))
        elif name == "f1":
            binary = set(np.unique(y_true)) | set(np.unique(y_pred)) <= {0, 1}
            out[name] = float(f1_score(y_true, y_pred, average="binary" if binary else "macro", zero_division=0))
        elif name == "matthews_correlation":
            out[name] = float(matthews_corrcoef(y_true, y_pred))
        else:
            raise ValueError(f"unknown classification metric {name!r}; choose accuracy, f1 or matthews_correlation")
    return out


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after stripping surrounding white space."""
    if len(predictions) != len(references) or not references:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)
