"""Building and saving each method's PEFT model: the initialisation half of a method (see `.methods`).

* ``lora``: PEFT's default (A Kaiming-uniform, B = 0).
* ``lora-ga``: PEFT's LoRA-GA, from the SVD of the gradient accumulated over `LORA_GA_BATCHES` training
  batches. It rewrites the base weights, so its trained adapter is saved converted (PEFT's weight conversion,
  which needs the initial adapter of `save_initial_adapter`) to a plain LoRA adapter of rank ``2r`` that loads
  on the unmodified backbone.
* ``adalora``: PEFT's AdaLoRA, ``init_r = ceil(1.5 r)`` pruned to ``target_r = r`` over the run.
* ``alora``: PEFT LoRA at rank ``2r`` gated to ``r`` open ranks per module (`flatlora.alora.attach_gates`);
  saved with its open ranks only (per-module ranks in ``rank_pattern``).
* Bi-LoRA's auxiliary adapter is added after LoRA's draws, so its primary adapter is LoRA's; only the primary
  adapter is saved.

Every initialisation draws from torch's global RNG under ``seeded(20_000 + seed)``, so the methods that share
an initialisation start from the same adapter and head for a given seed.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from .methods import get_method, seeded

LORA_GA_BATCHES = 8  # training batches whose accumulated gradient initialises LoRA-GA

def build_peft_model(task: Any, cfg: Any, method: str, rank: int, seed: int, total_steps: int,
                     train_batches: Callable[[], list[dict]], device: torch.device | str = "cpu") -> nn.Module:
    """Backbone + adapter for ``method``; identical initial adapter for every method with the same init."""
    from peft import get_peft_model

    spec = get_method(method)
    base = task.build_model(cfg, seed).to(device)
    kw = dict(task.lora_kwargs(cfg))
    common = dict(lora_alpha=cfg.alpha_over_rank * rank, lora_dropout=cfg.lora_dropout, **kw)
    with seeded(20_000 + seed):
        if spec.init == "lora":
            from peft import LoraConfig

            model = get_peft_model(base, LoraConfig(r=rank, **common))
        elif spec.init == "lora-ga":
            from peft import LoraConfig, LoraGAConfig, preprocess_loraga

            lcfg = LoraConfig(r=rank, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(), **common)
            batches = train_batches()

            def grad_step() -> None:
                for batch in batches:
                    with torch.enable_grad():
                        task.loss(base, batch).backward()

            preprocess_loraga(base, lcfg, grad_step)
            model = get_peft_model(base, lcfg)
            for p in base.parameters():  # drop gradients left on the frozen backbone by the estimate
                p.grad = None
        elif spec.init == "adalora":
            from peft import AdaLoraConfig

            t = max(total_steps, 3)
            model = get_peft_model(base, AdaLoraConfig(
                init_r=math.ceil(1.5 * rank), target_r=rank, total_step=t, tinit=t // 10, tfinal=t // 5,
                deltaT=max(1, t // 20), **common))
        elif spec.init == "alora":  # slots 0..r-1 open, r..2r-1 the reserve; scaling alpha/r as LoRA's
            from peft import LoraConfig

            from ..alora import attach_gates

            common["lora_alpha"] = cfg.alpha_over_rank * 2 * rank
            model = get_peft_model(base, LoraConfig(r=2 * rank, **common))
            attach_gates(model, init_rank=rank)
        else:  # pragma: no cover - the registry holds only these
            raise ValueError(f"unknown init {spec.init!r}")
        if spec.rule == "bi-lora":  # the primary adapter is LoRA's (same draws); the auxiliary one comes after
            from .peers import add_auxiliary_adapter

            add_auxiliary_adapter(model)
    return model


def save_adapter(model: nn.Module, method: str, path: str, initial_dir: str | None) -> None:
    """``save_pretrained`` (safetensors). LoRA-GA rewrote the base weights, so its adapter is converted to a
    plain LoRA adapter of rank 2r that loads on the unmodified backbone (PEFT's weight conversion)."""
    spec = get_method(method)
    if spec.init == "lora-ga":
        model.save_pretrained(path, path_initial_model_for_weight_conversion=initial_dir)
        _add_missing_modules_to_save(model, path)
    elif spec.init == "alora":  # the open ranks only, per-module ranks in rank_pattern
        from ..alora import export_adapter

        export_adapter(model, path)
    elif spec.rule == "bi-lora":  # never the auxiliary adapter (Method.finish deletes it; this is a safeguard)
        model.save_pretrained(path, selected_adapters=["default"])
    else:
        model.save_pretrained(path)


def _add_missing_modules_to_save(model: nn.Module, path: str) -> None:
    """PEFT 0.21's weight conversion keeps only lora_A/lora_B tensors and drops the trained head
    (``modules_to_save``); write those tensors back into the converted adapter file."""
    import os

    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "adapter_model.safetensors")
    saved = load_file(file)
    extra = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()
             if "lora_" not in k and k not in saved}
    if extra:
        save_file({**saved, **extra}, file + ".tmp", metadata={"format": "pt"})
        os.replace(file + ".tmp", file)


def save_initial_adapter(model: nn.Module, method: str, path: str) -> str | None:
    """LoRA-GA only: store the initial adapter, needed to convert the trained one (see `save_adapter`)."""
    if get_method(method).init != "lora-ga":
        return None
    cfg = model.peft_config["default"]
    init = cfg.init_lora_weights
    cfg.init_lora_weights = True  # PEFT's recipe: the initial adapter is saved as a plain LoRA init
    try:
        model.save_pretrained(path)
    finally:
        cfg.init_lora_weights = init
    return path


__all__ = ["LORA_GA_BATCHES", "build_peft_model", "save_adapter", "save_initial_adapter"]
