"""`FlatLoraCallback`: Flat-LoRA inside a transformers ``Trainer``, through its callback events only.

One optimizer step of the Trainer, with gradient accumulation:

    on_step_begin -> micro-batch forward/backward x k -> on_pre_optimizer_step -> optimizer.step -> ...

The noise is applied at ``on_step_begin`` (so all k micro-batches see the same ``E``) and removed at
``on_pre_optimizer_step`` (so the optimizer, evaluation and checkpoints see clean weights). The step index
is ``t = state.global_step + 1`` (1..T, ``sigma_T = rho`` at the last step) and ``T = state.max_steps``: both
come from the Trainer's state, so a run resumed from a checkpoint continues the same schedule with the same
noise. The callback is an ``ExportableState``: its saved args are the config as JSON, so a Trainer with
``restore_callback_states_from_checkpoint=True`` rebuilds it on resume.

AdaLoRA: the Trainer never calls ``update_and_allocate``, which AdaLoRA needs after every optimizer step
(it reads the gradients to score and prune ranks). For a model holding an ``AdaLoraModel`` the callback calls
``update_and_allocate(state.global_step)`` at ``on_optimizer_step``: after ``optimizer.step()``, before
``zero_grad()``, with the 0-based index of the step just taken, on clean weights (the noise is already gone).
Pass ``adalora_update=False`` if something else already calls it.
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
    ``adalora_update``: call AdaLoRA's ``update_and_allocate`` after each optimizer step (only acts on AdaLoRA
    models; see the module docstring).
    """

    def __init__(self, config: FlatLoraConfig | dict | str | None = None, *, adalora_update: bool = True,
                 **kwargs: Any) -> None:
        if not isinstance(adalora_update, bool):
            raise ValueError(f"adalora_update={adalora_update!r} must be True or False")
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
        self.adalora_update = adalora_update
        self.flat: FlatLora | None = None
        self._adalora: Any = None  # the AdaLoraModel whose update_and_allocate runs after each optimizer step

    def state(self) -> dict:
        return {"args": {"config": self.config.to_json(), "adalora_update": self.adalora_update}, "attributes": {}}

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
        self._adalora = _find_adalora(model) if self.adalora_update else None

    def on_step_begin(self, args, state, control, **kwargs):
        self.flat.perturb(state.global_step + 1)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.restore()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._adalora is not None:  # after optimizer.step(), before zero_grad(); global_step is 0-based here
            self._adalora.update_and_allocate(state.global_step)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.restore()  # training may stop after any micro-batch

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()


def _find_adalora(model: Any) -> Any:
    """The ``AdaLoraModel`` inside ``model`` (a ``PeftModel`` or the tuner itself), or None."""
    try:
        from peft.tuners.adalora import AdaLoraModel
    except ImportError:  # a PEFT without AdaLoRA
        return None
    return next((m for m in model.modules() if isinstance(m, AdaLoraModel)), None)
