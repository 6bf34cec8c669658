"""flatlora: Flat-LoRA (Li et al., ICML 2025) for Hugging Face PEFT models.

LoRA training at ``W + E`` with filter-wise random noise ``E`` of the full merged weight, so the adapter
lands in a minimum that is flat in the full parameter space, at LoRA's cost.
"""

from .config import FlatLoraConfig
from .core import FlatLora
from .noise import NoiseSpec, filter_noise, layer_seed, row_scale
from .schedule import sigma_at

__version__ = "0.1.0"

__all__ = [
    "FlatLora",
    "FlatLoraCallback",
    "FlatLoraConfig",
    "NoiseSpec",
    "filter_noise",
    "layer_seed",
    "row_scale",
    "sigma_at",
    "__version__",
]


def __getattr__(name: str):
    # transformers is imported only by users of the Trainer callback
    if name == "FlatLoraCallback":
        from .callback import FlatLoraCallback

        return FlatLoraCallback
    raise AttributeError(f"module 'flatlora' has no attribute {name!r}")
