"""Export a gated (ALoRA) model as a standard PEFT LoRA adapter with per-module ranks.

For each gated module with open slots ``O`` (``|O| = r_m``) the exported factors are

    A' = A[O]               (r_m, n)      conv: (r_m, c, kh, kw)
    B' = B[:, O] * g[O]     (m, r_m)      conv: (m, r_m, 1, 1)      (the gate folded into B over its rank dim 1;
                                                                     g = 1 for ALoRA's gates)

so ``s · B' · A' = s · B · diag(g) · A`` exactly (closed slots contribute zero), for ``lora.Linear`` and
``lora.Conv2d`` layers alike. The ``LoraConfig`` names the kept modules explicitly (``target_modules``), gives
each its rank in ``rank_pattern`` and keeps the scaling ``s`` of the gated model through ``alpha_pattern``
(``alpha_m = s · r_m``, or ``s · sqrt(r_m)`` with rsLoRA). A module whose ranks were all pruned is left out. The
files are written by PEFT's own ``save_pretrained`` (given the sliced state dict, with the new config swapped in
for the call): ``adapter_model.safetensors``, ``adapter_config.json`` and the model card, loadable by plain
``PeftModel.from_pretrained`` and by servers that read PEFT adapters.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from pathlib import Path

from torch import nn

from .gates import gate_of, gated_layers

_PREFIX = "base_model.model."


def exported_ranks(model: nn.Module, adapter: str = "default") -> dict[str, int]:
    """Open ranks per gated module, module names relative to the base model (as PEFT's config names them)."""
    return {name.removeprefix(_PREFIX): int((gate_of(m) != 0).sum()) for name, m in gated_layers(model, adapter)}


def export_adapter(model: nn.Module, path: str | Path, adapter: str = "default") -> dict[str, int]:
    """Write the open ranks of ``model``'s gated ``adapter`` as a plain PEFT LoRA adapter in ``path``.

    Returns the rank of every exported module. ``model`` is a ``PeftModel`` gated by `flatlora.alora`;
    it is not changed.
    """
    layers = gated_layers(model, adapter)
    if not layers:
        raise ValueError(f"the model has no layer gated for adapter {adapter!r}; export_adapter writes ALoRA "
                         "models (for a plain PEFT model use model.save_pretrained)")
    if not hasattr(model, "peft_config") or adapter not in model.peft_config:
        raise ValueError(f"export_adapter needs the PeftModel itself (with peft_config[{adapter!r}]), got "
                         f"{type(model).__name__}")
    old = model.peft_config[adapter]
    scaling = {name: float(m.scaling[adapter]) for name, m in layers}
    state = dict(model.state_dict())
    ranks: dict[str, int] = {}
    for name, m in layers:
        gate = gate_of(m).detach()
        keep = (gate != 0).nonzero().flatten()
        keys = [f"{name}.lora_{w}.{adapter}.weight" for w in ("A", "B")]
        if len(keep) == 0:  # all pruned: the module leaves the adapter (with its lora_B bias, if any)
            for k in [k for k in state if k.startswith(f"{name}.lora_") and f".{adapter}." in k]:
                del state[k]
            continue
        a, b = m.lora_A[adapter].weight.detach(), m.lora_B[adapter].weight.detach()
        state[keys[0]] = a[keep].contiguous()
        fold = gate[keep].to(b.dtype).view(1, -1, *([1] * (b.dim() - 2)))  # over B's rank dim 1 (conv: 4-D)
        state[keys[1]] = (b[:, keep] * fold).contiguous()
        ranks[name.removeprefix(_PREFIX)] = len(keep)
    if not ranks:
        raise ValueError("every rank of every gated module is closed: there is no adapter to export")
    r = Counter(ranks.values()).most_common(1)[0][0]
    s_of = {name.removeprefix(_PREFIX): s for name, s in scaling.items()}
    alpha = {k: (s_of[k] * (v ** 0.5 if old.use_rslora else v)) for k, v in ranks.items()}
    new = copy.deepcopy(old)
    new.target_modules = sorted(ranks)
    new.exclude_modules = None
    new.layers_to_transform = None
    new.layers_pattern = None
    new.r = r
    new.lora_alpha = alpha[next(k for k, v in ranks.items() if v == r)]
    new.rank_pattern = {re.escape(k): v for k, v in ranks.items() if v != r}
    new.alpha_pattern = {re.escape(k): a for k, a in alpha.items() if a != new.lora_alpha}
    model.peft_config[adapter] = new
    try:
        model.save_pretrained(str(path), selected_adapters=[adapter], state_dict=state)
    finally:
        model.peft_config[adapter] = old
    return ranks


__all__ = ["export_adapter", "exported_ranks"]
