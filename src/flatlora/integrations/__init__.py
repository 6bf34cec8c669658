"""Flat-LoRA inside LLM fine-tuning stacks that replace PEFT's forwards with fused LoRA kernels.

Flat-LoRA's exact mode swaps the forward of each perturbed layer's *base layer* for ``op(x, W + E, b)``. A fused
LoRA kernel reads ``lora_layer.base_layer.weight`` (or its 4-bit ``quant_state``) and does its own matmul, so it
never calls that forward: the step would silently be plain LoRA. This package finds such kernels and turns them
off, or refuses with one line naming what to change:

* `fused_lora_paths` / `check_fused_paths` (``flatlora.integrations._fused``): detect the fused LoRA paths of
  Unsloth and Axolotl on a model, by the kernels' own module and function names (neither package is imported).
* ``flatlora.integrations.unsloth``: ``prepare(model)`` puts PEFT's forwards back on the perturbed layers.
* ``flatlora.integrations.axolotl``: ``FlatLoraPlugin``, an Axolotl plugin (needs ``pip install axolotl``).

docs/stacks.md has one section per stack (LLaMA-Factory's launcher is examples/llamafactory_train.py).
"""

from ._fused import FusedPath, check_fused_paths, fused_lora_paths

__all__ = ["FusedPath", "check_fused_paths", "fused_lora_paths"]
