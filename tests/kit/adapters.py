"""Adapter factors made non-trivial, and the LoRA layers of a model.

PEFT initialises one factor of each adapter to zero (lora_B, lora_embedding_A, AdaLoRA's lora_E), so at init
the merged weight equals the base weight and a test could not tell the two apart. The model builders in
``models.py`` therefore overwrite the factors with draws from a seeded generator. Two conventions exist, and
both stay because the suites' data depend on them (same seed, same draw order, same numbers):

* ``which="ab"``: only ``lora_A`` and ``lora_B`` (tests/*.py, tests/analysis, tests/distributed); DoRA
  magnitudes, ``lora_E`` and embedding factors keep PEFT's init;
* ``which="all"``: every factor (also ``lora_E``, ``lora_embedding_A/B``), and DoRA's magnitudes scaled by
  U(0.5, 1.5) per row, since at init they equal ``||W_base||_row`` and DoRA's merged weight would keep the
  base's row norms (tests/variants).
"""

from __future__ import annotations

import torch
from torch import nn

FACTORS = {"ab": ("lora_A", "lora_B"),
           "all": ("lora_A", "lora_B", "lora_E", "lora_embedding_A", "lora_embedding_B")}


def randomize_adapters(model: nn.Module, seed: int = 0, std: float = 0.1, which: str = "all") -> None:
    """Overwrite the adapter factors named by ``which`` ("ab" or "all", see above) with ``N(0, std^2)`` draws
    from ``Generator().manual_seed(seed)``, in ``named_parameters`` order; with "all", scale DoRA magnitudes too
    (one U(0, 1) draw per magnitude, from the same generator, in the same walk)."""
    factors = FACTORS[which]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in factors):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif which == "all" and "lora_magnitude_vector" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=gen))


def randomize_lora(model: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """``randomize_adapters(..., which="ab")``: give lora_A and lora_B random values (lora_B is zero at init)."""
    randomize_adapters(model, seed, std, which="ab")


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT LoRA layers by module name, in ``named_modules`` order (= Flat-LoRA's noise index)."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
