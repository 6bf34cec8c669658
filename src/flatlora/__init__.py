"""flatlora: Flat-LoRA (Li et al., ICML 2025) for Hugging Face PEFT models.

LoRA training at ``W + E`` with filter-wise random noise ``E`` of the full merged weight, so the adapter
lands in a minimum that is flat in the full parameter space, at LoRA's cost.
"""

from ._version import __version__
from .config import FlatLoraConfig
from .core import FlatLora
from .hf_args import FlatLoraArguments
from .noise import NoiseSpec, filter_noise, layer_noise_spec, layer_seed, row_scale
from .schedule import sigma_at

__all__ = [
    "FlatLora",
    "FlatLoraArguments",
    "FlatLoraCallback",
    "FlatLoraConfig",
    "NoiseSpec",
    "filter_noise",
    "layer_noise_spec",
    "layer_seed",
    "load_flat_lora_config",
    "row_scale",
    "save_flat_lora_config",
    "sigma_at",
    "__version__",
]


_LAZY = ("FlatLoraCallback", "save_flat_lora_config", "load_flat_lora_config")


def __getattr__(name: str):
    # transformers is imported only by users of the Trainer callback and its saved-adapter record
    if name in _LAZY:
        from . import callback

        return getattr(callback, name)
    raise AttributeError(f"module 'flatlora' has no attribute {name!r}")
