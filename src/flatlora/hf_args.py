"""`FlatLoraArguments`: `FlatLoraConfig` as ``flat_lora_*`` fields for ``HfArgumentParser``, TRL and YAML recipes.

``HfArgumentParser((FlatLoraConfig, TrainingArguments))`` fails: the config's ``seed`` is also a
``TrainingArguments`` field, and short names such as ``rho`` or ``mode`` invite more clashes with TRL's configs.
`FlatLoraArguments` holds the same fields under prefixed names (``flat_lora_rho``, ``flat_lora_seed``,
``flat_lora_target_modules``, ...), with the config's types, defaults and help text::

    parser = HfArgumentParser((FlatLoraArguments, TrainingArguments))   # or TrlParser((FlatLoraArguments, SFTConfig))
    flat_args, training_args = parser.parse_args_into_dataclasses()     # --flat_lora_rho 0.05 --output_dir out ...
    trainer = Trainer(..., args=training_args, callbacks=[FlatLoraCallback(flat_args.to_config())])

One source of truth: the class is generated from ``dataclasses.fields(FlatLoraConfig)`` when this module is
imported, so a field added to the config appears here, on the command line and in YAML by itself. Fields marked
``metadata={"cli": False}`` in the config stay out, as they do in flatlora's own CLI. List fields parse from the
command line as ``--flat_lora_target_modules q_proj v_proj`` (nargs) and from YAML as lists.

Values are checked when the object is built (also by ``parse_yaml_file``/``parse_dict``, which bypass argparse),
by `FlatLoraConfig` itself; the error names the offending option. No transformers import here.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import TYPE_CHECKING, Any

from .config import FlatLoraConfig

PREFIX = "flat_lora_"


def _coerce(value: Any, tp: Any) -> Any:
    """A number written as text -> the number. PyYAML reads ``1e-2`` (no dot) as a string, and
    ``HfArgumentParser.parse_yaml_file`` passes YAML values to the dataclass unconverted."""
    if isinstance(value, str) and tp in (int, float):
        try:
            return tp(value)
        except ValueError:
            return value  # FlatLoraConfig rejects it with its own message
    return value


def _to_config(self: Any) -> FlatLoraConfig:
    """The `FlatLoraConfig` these arguments describe; a bad value raises ``ValueError`` naming its option."""
    values = {name: getattr(self, PREFIX + name) for name in _NAMES}
    try:
        return FlatLoraConfig(**values)
    except (ValueError, TypeError) as exc:
        bad = []  # the options that fail on their own; none when only a combination is invalid
        for name, value in values.items():
            try:
                FlatLoraConfig(**{name: value})
            except (ValueError, TypeError):
                bad.append(name)
        names = bad or [n for n in _NAMES if values[n] != _DEFAULTS.get(n)] or list(_NAMES)
        flags = ", ".join(f"--{PREFIX}{n}" for n in names)
        raise ValueError(f"{flags}: {exc}") from None


def _post_init(self: Any) -> None:
    for name in _NAMES:
        setattr(self, PREFIX + name, _coerce(getattr(self, PREFIX + name), _HINTS[name]))
    self.to_config()  # fail at parse time, naming the option, like TrainingArguments does


def _from_config(cls: type, config: FlatLoraConfig) -> Any:
    """The arguments that `to_config` turns back into ``config``."""
    if not isinstance(config, FlatLoraConfig):
        raise ValueError(f"config must be a FlatLoraConfig, got {type(config).__name__}")
    return cls(**{PREFIX + name: getattr(config, name) for name in _NAMES})


def _build() -> type:
    specs = []
    for f in dataclasses.fields(FlatLoraConfig):
        if f.metadata.get("cli") is False:
            continue
        # HfArgumentParser hands a field's metadata to argparse.add_argument: keep only the help text, with
        # '%' doubled since argparse %-formats help strings
        kw: dict[str, Any] = {"metadata": {"help": f.metadata.get("help", "").replace("%", "%%")}}
        if f.default is not dataclasses.MISSING:
            kw["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kw["default_factory"] = f.default_factory
        specs.append((PREFIX + f.name, _HINTS[f.name], dataclasses.field(**kw)))
    doc = ("Flat-LoRA options for HfArgumentParser / TrlParser / YAML recipes: every FlatLoraConfig field, "
           f"prefixed {PREFIX!r}. ``to_config()`` gives the FlatLoraConfig.")
    cls = dataclasses.make_dataclass(
        "FlatLoraArguments", specs,
        namespace={"__doc__": doc, "__post_init__": _post_init, "to_config": _to_config,
                   "from_config": classmethod(_from_config)})
    cls.__module__ = __name__  # make_dataclass's module= is Python >= 3.12; pickling finds the class here
    return cls


_HINTS = typing.get_type_hints(FlatLoraConfig)  # resolved types: config.py uses `from __future__ import annotations`
_NAMES = tuple(f.name for f in dataclasses.fields(FlatLoraConfig) if f.metadata.get("cli") is not False)
_DEFAULTS = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
             for f in dataclasses.fields(FlatLoraConfig) if f.name in _NAMES}

if TYPE_CHECKING:  # the generated class is opaque to type checkers: describe its interface
    class FlatLoraArguments:
        def __init__(self, **flat_lora_fields: Any) -> None: ...
        def __getattr__(self, name: str) -> Any: ...
        def to_config(self) -> FlatLoraConfig: ...
        @classmethod
        def from_config(cls, config: FlatLoraConfig) -> "FlatLoraArguments": ...
else:
    FlatLoraArguments = _build()
