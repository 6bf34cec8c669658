"""Type checks of recipe values against dataclass annotations (ours, PEFT's ``LoraConfig``, transformers'
``TrainingArguments``): does a value parsed from YAML or a flag fit, how to say what was expected, and the few
safe coercions (``5e-4`` read by PyYAML as a string -> float; a number where only a string goes -> its text)."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from typing import Any

_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}


def field_types(cls: type) -> dict[str, Any]:
    """``{field name: annotation}`` of a dataclass, resolved where possible (``Any`` where not)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: fall back to the raw ones
        hints = {}
    out = {}
    for f in dataclasses.fields(cls):
        tp = hints.get(f.name, f.type)
        out[f.name] = Any if isinstance(tp, str) else tp
    return out


def _args(tp: Any) -> tuple:
    return tuple(a for a in typing.get_args(tp))


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def fits(value: Any, tp: Any) -> bool:
    """Whether ``value`` (plain YAML data) is acceptable for a field annotated ``tp``. Unknown classes pass:
    the real class judges them when it is built."""
    if tp is Any or tp is object:
        return True
    if tp is type(None) or tp is None:
        return value is None
    if _is_union(tp):
        return any(fits(value, a) for a in _args(tp))
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        # a pattern among the literals (PEFT's 'pissa_niter_[number of iters]') stands for many strings
        patterned = any(isinstance(a, str) and "[" in a for a in _args(tp))
        return value in _args(tp) or (patterned and isinstance(value, str))
    if origin in (list, tuple, set, typing.List, typing.Tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        inner = _args(tp)
        if not inner or (origin is tuple and len(inner) != 2):  # tuple[int, int] etc.: leave to the class
            return True
        return all(fits(v, inner[0]) for v in value)
    if origin in (dict, typing.Dict) or tp is dict:
        return isinstance(value, dict)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return isinstance(value, tp) or value in [m.value for m in tp]
    return True


def describe(tp: Any) -> str:
    """What a field of type ``tp`` takes, in words (for error messages)."""
    if _is_union(tp):
        parts = [describe(a) for a in _args(tp) if a is not type(None)]
        parts = list(dict.fromkeys(parts))
        text = " or ".join(parts) if parts else "null"
        return text + (" (or null)" if type(None) in _args(tp) else "")
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in _args(tp))
    if origin in (list, tuple, typing.List, typing.Tuple) or tp in (list, tuple):
        inner = _args(tp)
        return f"a list of {_plural(inner[0])}" if inner else "a list"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    return _WORDS.get(tp, getattr(tp, "__name__", str(tp)))


def _plural(tp: Any) -> str:
    word = describe(tp)
    return {"a string": "strings", "an integer": "integers", "a number": "numbers"}.get(word, word)


def _wants_only_str(tp: Any) -> bool:
    parts = [a for a in _args(tp) if a is not type(None)] if _is_union(tp) else [tp]
    return parts == [str]


def coerce(value: Any, tp: Any) -> Any:
    """The value the field should get: ``"5e-4"`` -> ``0.0005`` for a number field (PyYAML reads exponents
    without a dot as strings), a number -> its text for a string-only field. Anything else unchanged."""
    if isinstance(value, str) and not fits(value, tp):
        for num in (int, float):
            if fits(num(1), tp) and not fits("x", tp):
                try:
                    return num(value)
                except ValueError:
                    pass
    if isinstance(value, (int, float)) and not isinstance(value, bool) and _wants_only_str(tp):
        return str(value)
    return value


def check_mapping(values: dict[str, Any], types_: dict[str, Any], where: str, owner: str) -> dict[str, Any]:
    """Check keys and value types of ``values`` against ``types_``; return the coerced values.

    ``where``: the recipe key prefix (``"training."``), ``owner``: what the keys belong to (for messages)."""
    out = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise ValueError(f"{where}{key!r}: keys must be strings")
        if key not in types_:
            raise ValueError(f"unknown key {where}{key}: not a {owner} field{suggest(key, types_)}")
        value = coerce(value, types_[key])
        if not fits(value, types_[key]):
            raise ValueError(f"{where}{key}={value!r} must be {describe(types_[key])}")
        out[key] = value
    return out


def suggest(key: str, names: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
