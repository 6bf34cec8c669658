"""`FlatLoraCallback`: Flat-LoRA inside a transformers ``Trainer``, through its callback events only.

One optimizer step of the Trainer, with gradient accumulation:

    on_step_begin -> micro-batch forward/backward x k -> on_pre_optimizer_step -> optimizer.step -> ...

The noise is applied at ``on_step_begin`` (so all k micro-batches see the same ``E``) and removed at
``on_pre_optimizer_step`` (so the optimizer, evaluation and checkpoints see clean weights). The step index
is ``t = state.global_step + 1`` (1..T, ``sigma_T = rho`` at the last step) and ``T = state.max_steps``: both
come from the Trainer's state, so a run resumed from a checkpoint continues the same schedule with the same
noise. The callback is an ``ExportableState``: its saved args are the config as JSON, so a Trainer with
``restore_callback_states_from_checkpoint=True`` rebuilds it on resume.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .config import FlatLoraConfig
from .core import FlatLora


class FlatLoraCallback(TrainerCallback, ExportableState):
    """``Trainer(..., callbacks=[FlatLoraCallback(cfg)])`` or ``FlatLoraCallback(rho=0.05, seed=1)``.

    ``config`` may be a `FlatLoraConfig`, a dict or its JSON text; keyword arguments build one instead.
    """

    def __init__(self, config: FlatLoraConfig | dict | str | None = None, **kwargs: Any) -> None:
        if config is not None and kwargs:
            raise ValueError(f"pass either a config or keyword fields, not both (got config and {sorted(kwargs)})")
        if config is None:
            config = FlatLoraConfig(**kwargs)
        elif isinstance(config, str):
            config = FlatLoraConfig.from_json(config)
        elif isinstance(config, dict):
            config = FlatLoraConfig.from_dict(config)
        elif not isinstance(config, FlatLoraConfig):
            raise ValueError(f"config must be a FlatLoraConfig, dict or JSON string, got {type(config).__name__}")
        self.config = config
        self.flat: FlatLora | None = None

    def state(self) -> dict:
        return {"args": {"config": self.config.to_json()}, "attributes": {}}

    def restore(self) -> None:
        """Remove the noise now (e.g. after ``trainer.train()`` raised mid-step)."""
        if self.flat is not None:
            self.flat.restore()

    # --- Trainer events --------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("FlatLoraCallback needs the model in on_train_begin; use it with transformers' Trainer")
        self.restore()
        self.flat = FlatLora(model, self.config, total_steps=max(int(state.max_steps), 1))

    def on_step_begin(self, args, state, control, **kwargs):
        self.flat.perturb(state.global_step + 1)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.restore()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.restore()  # training may stop after any micro-batch

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()
