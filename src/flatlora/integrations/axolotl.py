"""`FlatLoraPlugin`: Flat-LoRA in Axolotl, switched on from the YAML config.

    adapter: lora                   # or qlora
    plugins:
      - flatlora.integrations.axolotl.FlatLoraPlugin
    flat_lora_rho: 0.05             # every FlatLoraArguments field, same names (flatlora.hf_args)
    flat_lora_seed: 0

What the plugin does, at the hooks of Axolotl 0.21.0 (``axolotl/integrations/base.py``):

* ``register(cfg)``: Axolotl calls it with the raw YAML (after command-line overrides) before validating it
  (``axolotl/cli/config.py`` ``load_cfg`` -> ``utils/config`` ``prepare_plugins``). The plugin checks the
  ``flat_lora_*`` keys (an unknown key or a bad value raises, naming the key), and switches Axolotl's fused LoRA
  kernels off: ``lora_mlp_kernel``, ``lora_qkv_kernel``, ``lora_o_kernel`` and ``lora_embedding_kernel`` become
  ``false``. For ``adapter: lora/qlora`` Axolotl switches them on when none is set (the schema's
  ``check_auto_enable_lora_kernels`` with ``lora_kernels_auto_enable``, utils/schemas/config.py and
  validation.py); a kernel reads ``base_layer.weight`` and does its own matmul, so Flat-LoRA's noise would never
  reach those layers. A kernel the user set to ``true`` is refused with one line naming the key.
* ``get_input_args()``: `FlatLoraAxolotlArgs`, the ``flat_lora_*`` fields as a pydantic model that Axolotl merges
  into its config schema (without it, validation would drop the keys).
* ``post_trainer_create(cfg, trainer)``: refuses a model that still runs a fused LoRA kernel on a perturbed layer
  (`flatlora.integrations.check_fused_paths`), then adds `FlatLoraCallback` with `FlatLoraCallback.attach`, ahead
  of the ``report_to`` integrations so that they log ``flat_lora_sigma`` (callbacks from ``add_callbacks_*`` would
  land after them).

Importing this module needs no Axolotl: the plugin class subclasses Axolotl's ``BasePlugin`` and is built when
first looked up (``flatlora.integrations.axolotl.FlatLoraPlugin``), raising ``ImportError`` with the install line
when Axolotl is missing. Do not register it as an entry point: Axolotl loads every entry-point plugin into
every run.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Mapping

from ..config import FlatLoraConfig
from ..hf_args import FlatLoraArguments
from ._fused import check_fused_paths
from ._keys import config_from_keys

__all__ = ["FlatLoraAxolotlArgs", "FlatLoraPlugin", "KERNEL_KEYS", "flat_lora_config"]

PLUGIN = f"{__name__}.FlatLoraPlugin"
KERNEL_KEYS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")
ADAPTERS = ("lora", "qlora")
_OFF = (None, False, 0, "false", "False", "0", "no", "off")  # what pydantic's bool reads as false (or unset)
_LOG = logging.getLogger(__name__)


def flat_lora_config(cfg: Mapping[str, Any]) -> FlatLoraConfig:
    """The `FlatLoraConfig` of the ``flat_lora_*`` keys of an Axolotl config (a dict or Axolotl's ``DictDefault``).

    Unset keys take `FlatLoraArguments`' defaults. Raises ``ValueError`` naming the key for an unknown
    ``flat_lora_*`` key (Axolotl's validation would drop it silently) or a bad value.
    """
    return config_from_keys(cfg, "Axolotl config")


class FlatLoraPluginHooks:
    """The plugin's hooks; `FlatLoraPlugin` is this class on top of Axolotl's ``BasePlugin``."""

    def __init__(self) -> None:
        super().__init__()
        self.callback: Any = None  # the FlatLoraCallback added to the trainer

    def register(self, cfg: dict) -> None:
        """Check the ``flat_lora_*`` keys and the adapter; switch the fused LoRA kernels off (or refuse one set on)."""
        flat_lora_config(cfg)
        adapter = cfg.get("adapter")
        if adapter not in ADAPTERS:
            raise ValueError(f"adapter: {adapter} in the Axolotl config; {PLUGIN} perturbs PEFT LoRA layers: "
                             "set adapter: lora or adapter: qlora (or remove the plugin)")
        on = [key for key in KERNEL_KEYS if cfg.get(key) not in _OFF]
        if on:
            raise ValueError(
                f"{on[0]}: {cfg.get(on[0])} in the Axolotl config: this fused LoRA kernel reads the base weight "
                f"itself, so Flat-LoRA's noise would never reach those layers; set {on[0]}: false, or remove it "
                f"({PLUGIN} switches the LoRA kernels off)")
        for key in KERNEL_KEYS:
            cfg[key] = False
        _LOG.warning("%s: %s set to false (fused LoRA kernels bypass the Flat-LoRA noise)", PLUGIN,
                     ", ".join(KERNEL_KEYS))

    def get_input_args(self) -> str:
        return f"{__name__}.FlatLoraAxolotlArgs"

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        """Refuse fused kernels left on perturbed layers; add `FlatLoraCallback` ahead of the reporting callbacks."""
        from ..callback import FlatLoraCallback
        from ..targets import find_targets

        config = flat_lora_config(cfg)
        model = trainer.model
        targets = find_targets(model, config.target_modules, config.exclude_modules)
        check_fused_paths(model, [t.name for t in targets])
        self.callback = FlatLoraCallback(config).attach(trainer)


@functools.cache
def _plugin_class() -> type:
    try:
        from axolotl.integrations.base import BasePlugin
    except ImportError as exc:
        raise ImportError(f"{PLUGIN} needs Axolotl: pip install axolotl (Axolotl needs Python >= 3.12); "
                          f"importing it failed with: {exc}") from exc
    return type("FlatLoraPlugin", (FlatLoraPluginHooks, BasePlugin), {
        "__module__": __name__,
        "__doc__": "Axolotl plugin: Flat-LoRA from the flat_lora_* config keys (see flatlora.integrations.axolotl)."})


@functools.cache
def _args_class() -> type:
    """`FlatLoraArguments`' fields as a pydantic model (Axolotl merges it into its config schema)."""
    try:
        from pydantic import Field, create_model
    except ImportError as exc:
        raise ImportError(f"{__name__}.FlatLoraAxolotlArgs needs pydantic (installed with Axolotl: "
                          "pip install axolotl)") from exc
    fields = {}
    for f in dataclasses.fields(FlatLoraArguments):
        kw = {"default": f.default} if f.default is not dataclasses.MISSING else {"default_factory": f.default_factory}
        help_text = f.metadata.get("help", "").replace("%%", "%")  # hf_args doubles '%' for argparse
        fields[f.name] = (f.type | None, Field(**kw, json_schema_extra={"description": help_text}))
    return create_model("FlatLoraAxolotlArgs", __module__=__name__, **fields)


def __getattr__(name: str) -> Any:
    if name == "FlatLoraPlugin":
        return _plugin_class()
    if name == "FlatLoraAxolotlArgs":
        return _args_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
