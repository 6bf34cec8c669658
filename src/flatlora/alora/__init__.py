"""ALoRA (Liu et al., NAACL 2024, arXiv 2403.16187) on ordinary PEFT LoRA models, composable with Flat-LoRA.

Per-rank gates on every LoRA layer (`attach_gates`, PEFT ``lora.Linear`` and ``lora.Conv2d``: a super-network
with a reserve of closed slots), AB-LoRA ablation scores on held-out batches and a few reallocation rounds with a
fixed total rank (`ALoRA`, `ALoRAConfig`), a Trainer callback (`ALoRACallback`, imported lazily: it needs
transformers), and the export of the open ranks as a plain PEFT adapter with per-module ranks (`export_adapter`).
docs/variants.md (section "ALoRA") has the recipe and every choice where the paper is silent.
"""

from .allocator import ALoRA, ALoRAConfig, RoundReport
from .export import export_adapter, exported_ranks
from .gates import (GatedLoraConv2d, GatedLoraLinear, active_ranks, attach_gates, detach_gates, gated_conv2d_delta,
                    gated_delta, gated_layers)
from .scores import ab_scores, plan_reallocation

__all__ = ["ALoRA", "ALoRACallback", "ALoRAConfig", "GatedLoraConv2d", "GatedLoraLinear", "RoundReport", "ab_scores",
           "active_ranks", "attach_gates", "detach_gates", "export_adapter", "exported_ranks", "gated_conv2d_delta",
           "gated_delta", "gated_layers", "plan_reallocation"]


def __getattr__(name: str):
    if name == "ALoRACallback":
        from .callback import ALoRACallback

        return ALoRACallback
    raise AttributeError(f"module 'flatlora.alora' has no attribute {name!r}")
