"""Shared plumbing for the typed config dataclasses: dict/JSON/YAML round trips and argparse flags.

Every field carries its help text in ``field(metadata={"help": ...})``; the same text documents the
dataclass, drives ``--help`` of the CLI and names the field in error messages. A config dataclass inherits
`DataclassIO` for its ``to_dict``/``from_dict``/``to_json``/``from_json``/``save``/``load``/``replace``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

from ._jsonio import write_text_atomic

T = TypeVar("T")
C = TypeVar("C", bound="DataclassIO")


class DataclassIO:
    """Serialisation of a config dataclass (mixed in; it adds no fields). Every reader validates: the
    dataclass's ``__post_init__`` runs, and an unknown field or a bad value is a ``ValueError`` naming it."""

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        return from_dict(cls, data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        """Write as JSON or YAML, chosen by the file suffix."""
        return dump_file(self, path)

    @classmethod
    def load(cls: type[C], path: str | Path) -> C:
        """Read a ``.json``, ``.yaml`` or ``.yml`` file written by `save` (or by hand)."""
        return load_file(cls, path)

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


def help_field(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with help text; list defaults are copied per instance."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=default: list(d), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__} expects a mapping of field names to values, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(names)}")
    try:
        return cls(**data)
    except TypeError as exc:  # a validator met a value of the wrong kind: say which field
        _check_types(cls, data)
        raise ValueError(f"{cls.__name__}: a field has a value of the wrong type ({exc})") from None


_TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _check_types(cls: type, data: dict[str, Any]) -> None:
    """Raise a ``ValueError`` naming the first field whose value is of the wrong kind (e.g. a mapping where a
    number goes). A list field also takes one bare value; an int is a valid float."""
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        tp, is_list = base_type(hints[name])
        if value is None or tp not in _TYPE_WORDS:
            continue
        items = value if is_list and isinstance(value, (list, tuple)) else [value]
        if not all(_is_a(x, tp) for x in items):
            want = f"{_TYPE_WORDS[tp]} or a list of them" if is_list else _TYPE_WORDS[tp]
            raise ValueError(f"{name}={value!r} must be {want}")


def _is_a(x: Any, tp: type) -> bool:
    if tp is float:
        return isinstance(x, (int, float)) and not isinstance(x, bool)
    if tp is int:
        return isinstance(x, int) and not isinstance(x, bool)
    return isinstance(x, tp)


def load_file(cls: type[T], path: str | Path) -> T:
    """Read a config from ``.json``, ``.yaml`` or ``.yml``.

    Every problem (missing or unreadable file, malformed YAML/JSON, not a mapping, unknown field, bad value)
    is a one-line ``ValueError`` that names the file.
    """
    path = Path(path)
    if path.suffix not in (".json", ".yaml", ".yml"):
        raise ValueError(f"config file {str(path)!r} must end in .json, .yaml or .yml")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"config file {str(path)!r}: cannot read it: {_reason(exc)}") from None
    data = parse_text(text, path)
    if data is None:  # an empty YAML document (or one with comments only): no values
        data = {}
    try:
        return from_dict(cls, data)
    except ValueError as exc:
        raise ValueError(f"config file {str(path)!r}: {_one_line(str(exc))}") from None


def parse_text(text: str, path: str | Path) -> Any:
    """Parse YAML (``.yaml``/``.yml``) or JSON (any other suffix); a syntax error is a one-line ``ValueError``
    naming ``path`` and the line and column."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise ValueError(f"{str(path)!r} is not valid YAML: {where}{_one_line(problem)}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON: line {exc.lineno}, column {exc.colno}: {exc.msg}"
                         ) from None


def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else _one_line(str(exc))


def _one_line(msg: str) -> str:
    return " ".join(msg.split())


def dump_file(obj: Any, path: str | Path) -> Path:
    """Write a config as ``.json`` or ``.yaml``/``.yml``, chosen by the suffix."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        text = yaml.safe_dump(to_dict(obj), sort_keys=False)
    elif path.suffix == ".json":
        text = json.dumps(to_dict(obj), indent=2) + "\n"
    else:
        raise ValueError(f"config file {str(path)!r} must end in .json, .yaml or .yml")
    return write_text_atomic(path, text)


def base_type(tp: Any) -> tuple[Any, bool]:
    """Return (element type, is_list) of a field annotation such as ``list[str] | None``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return (args[0] if args else str), True
    if args and origin is not None:  # Optional[...] / X | None
        return base_type(args[0])
    return tp, False


def add_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add one ``--flag`` per dataclass field; defaults stay ``None`` so unset flags can be told apart."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        tp, is_list = base_type(hints[f.name])
        flag = "--" + prefix + f.name.replace("_", "-")
        helptext = f.metadata.get("help", "")
        if f.default is not dataclasses.MISSING:
            helptext += f" (default: {f.default!r})"
        helptext = helptext.replace("%", "%%")  # argparse %-formats help strings
        if tp is bool:
            parser.add_argument(flag, dest=prefix + f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=helptext)
        elif is_list:
            parser.add_argument(flag, dest=prefix + f.name, nargs="*", type=tp, default=None, help=helptext)
        else:
            parser.add_argument(flag, dest=prefix + f.name, type=tp if tp in (int, float) else str, default=None,
                                help=helptext)


def overrides(ns: argparse.Namespace, cls: type, prefix: str = "") -> dict[str, Any]:
    """The fields the user set on the command line, as a dict for ``dataclasses.replace`` or ``cls(**...)``."""
    out = {}
    for f in dataclasses.fields(cls):
        v = getattr(ns, prefix + f.name, None)
        if v is not None:
            out[f.name] = v
    return out
