"""Recipe file + ``--section.key value`` flags -> one resolved `Recipe` (flags override the file).

Every recipe key is a flag: ``--model.dtype bfloat16``, ``--data.train.max_samples 1000``, ``--lora.r 16``,
``--training.learning_rate 5e-4``, ``--flat_lora.rho 0.1``, ``--method lora``, ``--output_dir runs/x``.
A flag's value is read as YAML (``true``, ``16``, ``5e-4``, ``[q, v]``, ``null``), except for keys that only take
text (templates, names), which get the text as given; several values after one flag make a list
(``--lora.target_modules q v``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from .. import _dataclass_io as dio
from . import _types
from .recipe import Recipe, build, nested_class, resolve_paths
from .sections import DataSource


def parse_overrides(tokens: list[str]) -> list[tuple[str, list[str]]]:
    """``["--lora.r", "16", "--training.bf16=true"]`` -> ``[("lora.r", ["16"]), ("training.bf16", ["true"])]``."""
    out: list[tuple[str, list[str]]] = []
    for token in tokens:
        if token.startswith("--") and len(token) > 2 and not _is_number(token):
            key, eq, value = token[2:].partition("=")
            out.append((key.replace("-", "_"), [value] if eq else []))
        elif not out:
            raise ValueError(f"unexpected argument {token!r}: recipe keys are flags, --section.key value "
                             "(e.g. --lora.r 16); the recipe file comes first")
        else:
            out[-1][1].append(token)
    return out


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def _annotation(path: list[str], task_type: str | None) -> Any:
    """The type a dotted key takes (``Any`` for an unknown pass-through field: the recipe check names it)."""
    cls: Any = Recipe
    for i, name in enumerate(path):
        if cls in (Recipe,) and name in ("lora", "training") and len(path) == 2:
            from .passthrough import section_types

            try:
                return section_types(name, task_type).get(path[1], Any)
            except ValueError:
                return Any
        types_ = _types.field_types(cls)
        if name not in types_:
            where = ".".join(path[:i]) or "the recipe"
            raise ValueError(f"unknown key --{'.'.join(path)}{_types.suggest(name, types_)}; keys of {where}: "
                             + ", ".join(types_))
        sub = nested_class(cls, name)
        if sub is None:
            if i != len(path) - 1 and not (cls is DataSource and name in ("columns", "filter", "exclude")):
                raise ValueError(f"--{'.'.join(path)}: {'.'.join(path[:i + 1])} has no sub-keys")
            return types_[name]
        cls = sub
    raise ValueError(f"--{'.'.join(path)} names a whole section; set its keys, e.g. --{'.'.join(path)}.<key> value")


def parse_value(raw: str, tp: Any) -> Any:
    """One flag value: the text itself for a text-only key, else YAML (falling back to the text)."""
    import yaml

    if _types.fits("x", tp) and not _types.fits(1, tp) and not _types.fits([], tp) and not _types.fits({}, tp):
        return None if raw in ("null", "~") and _types.fits(None, tp) else raw
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, dict) and not _types.fits(value, tp):
        return raw  # "a: b" meant as text
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[tuple[str, list[str]]]) -> dict[str, Any]:
    """Set each dotted key of ``overrides`` in the raw recipe mapping (in place; also returned)."""
    for key, values in overrides:
        path = key.split(".")
        task = raw.get("task") if isinstance(raw.get("task"), dict) else {}
        tp = _annotation(path[:2] if path[0] in ("lora", "training") else path, task.get("type"))
        inner = _list_item(tp)
        if not values:
            if not _types.fits(True, tp):
                raise ValueError(f"--{key} needs a value (e.g. --{key} VALUE)")
            value: Any = True
        elif len(values) == 1:
            value = parse_value(values[0], tp)
            if inner is not None and not _types.fits(value, tp) and _types.fits([value], tp):
                value = [value]
        else:
            value = [parse_value(v, inner if inner is not None else Any) for v in values]
        node = raw
        for name in path[:-1]:
            if not isinstance(node.get(name), dict):
                node[name] = {}
            node = node[name]
        node[path[-1]] = value
    return raw


def _list_item(tp: Any) -> Any:
    import typing

    parts = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, __import__("types").UnionType) else (tp,)
    for part in parts:
        if typing.get_origin(part) in (list, tuple):
            args = typing.get_args(part)
            return args[0] if args else Any
    return None


def load_recipe(path: str | Path | None, overrides: list[str] | list[tuple[str, list[str]]] = (),
                ) -> Recipe:
    """The `Recipe` of a YAML/JSON file with flag overrides (flags win). Relative paths in the file are taken from
    the file's folder; ``output_dir`` defaults to ``runs/train/<file name>/<method>/seed<training.seed>``, with a
    level for the overrides that change the run between (`variant_folder`)."""
    raw: dict[str, Any] = {}
    stem = "recipe"
    if path is not None:
        path = Path(path)
        if path.suffix not in (".yaml", ".yml", ".json"):
            raise ValueError(f"recipe file {str(path)!r} must end in .yaml, .yml or .json")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ValueError(f"recipe file {str(path)!r}: cannot read it: {reason}") from None
        raw = dio.parse_text(text, path) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"recipe file {str(path)!r} must hold a mapping of sections (model, task, data, ...)")
        resolve_paths(raw, path.resolve().parent)
        stem = path.stem
    pairs = overrides if overrides and not isinstance(overrides[0], str) else parse_overrides(list(overrides))
    file_raw = copy.deepcopy(raw)
    apply_overrides(raw, list(pairs))
    if raw.get("output_dir") is None:
        training = raw.get("training") if isinstance(raw.get("training"), dict) else {}
        seed = training.get("seed", 42)  # TrainingArguments' default seed
        method = str(raw.get("method", "flat-lora"))
        raw["output_dir"] = str(variant_folder(stem, changed_keys(file_raw, raw, [k for k, _ in pairs], method))
                                / method / f"seed{seed}")
    where = f"recipe file {str(path)!r}: " if path is not None else ""
    try:
        return build(Recipe, raw, "")
    except ValueError as exc:
        raise ValueError(f"{where}{exc}") from None


# overrides that leave the trained adapter and its scores as they are: they do not key the run folder
_NOT_RUN_KEYS = {"method", "output_dir", "training.seed", "data.cache_dir", "training.logging_steps",
                 "training.logging_strategy", "training.logging_first_step", "training.logging_dir",
                 "training.report_to", "training.run_name", "training.disable_tqdm", "training.dataloader_num_workers",
                 "training.resume_from_checkpoint", "training.save_total_limit"}


def _get(raw: Any, path: list[str]) -> Any:
    for name in path:
        if not isinstance(raw, dict) or name not in raw:
            return _MISSING
        raw = raw[name]
    return raw


_MISSING = object()


def changed_keys(file_raw: dict[str, Any], raw: dict[str, Any], keys: list[str], method: str) -> dict[str, Any]:
    """``{key: new value}`` of the overridden keys that change the run: the value differs from the file's, and the
    key is neither the method nor the seed (they have their own folder levels) nor a logging setting; ``flat_lora``
    keys do not change a ``method: lora`` run."""
    out = {}
    for key in dict.fromkeys(keys):
        if key in _NOT_RUN_KEYS or (method == "lora" and key.startswith("flat_lora.")):
            continue
        new = _get(raw, key.split("."))
        if new != _get(file_raw, key.split(".")):
            out[key] = new
    return dict(sorted(out.items()))


def variant_folder(stem: str, changed: dict[str, Any]) -> Path:
    """``runs/train/<stem>`` for the file as it is; ``runs/train/<stem>/<key=value+...>-<hash>`` when overrides
    change the run: a readable name (cut at 60 characters) and 8 hex digits of the SHA-1 of the exact values, so
    every distinct set of overrides has its own folder and the same set finds the same one."""
    root = Path("runs") / "train" / stem
    if not changed:
        return root

    def text(value: Any) -> str:
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)

    readable = "+".join(f"{k}={text(v)}" for k, v in changed.items())
    readable = re.sub(r"[^A-Za-z0-9._=,+-]", "_", readable)[:60]
    digest = hashlib.sha1(json.dumps(changed, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return root / f"{readable}-{digest}"


def key_help() -> list[tuple[str, str]]:
    """``(flag, help)`` of every typed recipe key, for ``flatlora train --help``."""
    rows: list[tuple[str, str]] = []

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            sub = nested_class(cls, f.name)
            if sub is not None:
                walk(sub, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            text = f.metadata.get("help", "")
            if f.name not in ("lora", "training") and default not in (None, [], {}):
                text += f" (default: {default!r})"
            rows.append((f"--{prefix}{f.name}" + (".<field>" if f.name in ("lora", "training") else ""), text))

    walk(Recipe, "")
    return rows
