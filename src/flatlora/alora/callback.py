"""`ALoRACallback`: ALoRA's rank allocation inside a transformers ``Trainer``.

The callback builds `flatlora.alora.ALoRA` on the Trainer's model at ``on_train_begin`` (gating it, unless it
is gated already) and calls ``ALoRA.update(state.global_step + 1, optimizer)`` at ``on_optimizer_step``: after
``optimizer.step()`` and before ``zero_grad()``, with the number of optimizer steps taken (the Trainer's
``global_step`` is still the 0-based index of the step just taken there), on clean weights (``FlatLoraCallback``
removes Flat-LoRA's noise at ``on_pre_optimizer_step``, before this event), so it composes with it in either
order. That is where AdaLoRA's update runs too (`flatlora.callback`).

Checkpoints: ``alora_state.json`` (gates and rounds, `ALoRA.state_dict`) is written beside every checkpoint
(``on_save``) and in ``args.output_dir`` at the end; the Trainer's own adapter files hold the ungated
``R``-rank tensors. A run resumed from ``output_dir/checkpoint-N`` reads that folder's ``alora_state.json``
(``state.global_step = N`` at ``on_train_begin``); without it the resumed gates would be unknown, which is a
``ValueError``. Export the final adapter with `flatlora.alora.export_adapter` (per-module ranks).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Sequence

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .allocator import ALoRA, ALoRAConfig
from .scores import LossFn

STATE_NAME = "alora_state.json"


class ALoRACallback(TrainerCallback):
    """``Trainer(..., callbacks=[ALoRACallback(ALoRAConfig(...), batches)])``; see the module docstring.

    ``batches``: held-out batches (dicts of tensors; moved to the model's device at ``on_train_begin``);
    ``loss_fn``: the loss of one batch (default ``model(**batch).loss``).
    """

    def __init__(self, config: ALoRAConfig, batches: Sequence[Any], loss_fn: LossFn | None = None) -> None:
        if not isinstance(config, ALoRAConfig):
            raise ValueError(f"config must be an ALoRAConfig, got {type(config).__name__}")
        self.config = config
        self.batches = list(batches)
        self.loss_fn = loss_fn
        self.alora: ALoRA | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("ALoRACallback needs the model in on_train_begin; use it with transformers' Trainer")
        device = next(p.device for p in model.parameters())
        batches = [_to(b, device) for b in self.batches]
        self.alora = ALoRA(model, self.config, batches, self.loss_fn)
        steps = self.config.round_steps()
        if state.max_steps > 0 and not any(s < state.max_steps for s in steps):
            warnings.warn(f"ALoRA: none of the round steps {steps} falls before the run's last step "
                          f"{state.max_steps}, so no rank is reallocated with training after it; lower warmup_steps "
                          f"(now {self.config.warmup_steps}) or train longer", RuntimeWarning, stacklevel=2)
        if state.global_step > 0:
            saved = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / STATE_NAME
            if not saved.is_file():
                raise ValueError(f"resuming at step {state.global_step}, but {str(saved)!r} is missing: the gates of "
                                 "the resumed run are unknown. Resume from a checkpoint written with ALoRACallback")
            self.alora.load_state_dict(json.loads(saved.read_text(encoding="utf-8")))

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.alora.update(state.global_step + 1, optimizer)

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if args.should_save and folder.is_dir() and self.alora is not None:
            _write(folder / STATE_NAME, self.alora.state_dict())

    def on_train_end(self, args, state, control, **kwargs):
        if args.should_save and self.alora is not None:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            _write(Path(args.output_dir) / STATE_NAME, self.alora.state_dict())


def _to(batch: Any, device) -> Any:
    if isinstance(batch, dict):
        return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}
    return batch


def _write(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


__all__ = ["ALoRACallback", "STATE_NAME"]
