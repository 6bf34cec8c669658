"""The JSON files flatlora writes (run.json, curve.json, results.json, sharpness.json, ...): one writer, one
reader, one policy for numbers that are not finite.

**NaN and infinities are written as ``null``.** Python's ``json`` writes them as bare ``NaN`` / ``Infinity`` by
default, which is not JSON (RFC 8259 has no such tokens): ``jq``, JavaScript's ``JSON.parse`` and other strict
parsers reject the whole file. Such values mean "undefined" in our results (a standard error of one seed, a
peak memory that was not measured, the mean over no out-of-domain set), which is what ``null`` says. A reader
that computes with one turns it back into ``nan`` with `as_float`.

Files are written atomically: to a hidden temp file beside the target (``.<name>.tmp-<pid>``), then renamed,
so a reader never sees half a file. `read_json` names the file in every error.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"  # in the names of temp files and folders; `flatlora.experiments.runs.clean_stale` removes them


def to_jsonable(obj: Any) -> Any:
    """``obj`` with nan/inf -> ``None``, tuples -> lists, paths -> strings and tensors/arrays -> nested lists,
    recursively through dicts and lists; a ``TypeError`` names a type JSON cannot hold."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # torch.Tensor, numpy arrays and numpy scalars
        return to_jsonable(obj.tolist())
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def dumps(obj: Any) -> str:
    """Strict JSON text of ``obj`` (see `to_jsonable`), indented, ending in a newline."""
    return json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"


def as_float(v: Any) -> float:
    """A number read back from one of our files: ``null`` (written for nan/inf) -> ``nan``."""
    return math.nan if v is None else float(v)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file and a rename (readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as strict JSON (nan/inf as ``null``), atomically."""
    return write_text_atomic(path, dumps(data))


def read_json(path: str | Path) -> Any:
    """``json.loads`` of a file; a missing, unreadable or malformed file is a ``ValueError`` naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"cannot read {str(path)!r}: {reason}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON (truncated or damaged?): line {exc.lineno}, "
                         f"column {exc.colno}: {exc.msg}") from None


__all__: list[str] = []  # private plumbing of flatlora
