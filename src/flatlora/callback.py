"""`FlatLoraCallback`: Flat-LoRA inside a transformers ``Trainer``, through its callback events only.

One optimizer step of the Trainer, with gradient accumulation:

    on_step_begin -> micro-batch forward/backward x k -> on_pre_optimizer_step -> optimizer.step -> ...

The noise is applied at ``on_step_begin`` (so all k micro-batches see the same ``E``) and removed at
``on_pre_optimizer_step`` (so the optimizer, evaluation and checkpoints see clean weights), where the exact
mode also checks that the perturbed layers computed with their noise (`FlatLora.restore`: a ``RuntimeError``
when none did, as under a fused LoRA kernel; docs/guard.md). The step index
is ``t = state.global_step + 1`` (1..T, ``sigma_T = rho`` at the last step) and ``T = state.max_steps``: both
come from the Trainer's state, so a run resumed from a checkpoint continues the same schedule with the same
noise. The callback is an ``ExportableState``: its saved args are the config as JSON, so a Trainer with
``restore_callback_states_from_checkpoint=True`` rebuilds it on resume.

What the run leaves behind:

* logs: every log while training carries ``flat_lora_sigma``, the sigma of the last optimizer step, so the
  console, ``state.log_history`` and the reporting integrations show the schedule. The Trainer calls its
  integrations (TensorBoard, W&B, ...) before the callbacks passed in ``callbacks=[...]``, and they read the
  log when called; `FlatLoraCallback.attach` puts the callback ahead of them.
* files: ``flat_lora_config.json`` (the config and ``T``) and a line in the PEFT model card (``README.md``)
  in every checkpoint folder (at ``on_save``, right after the Trainer wrote it) and in ``args.output_dir`` at
  ``on_train_end``. ``trainer.save_model()`` fires no event; it runs after ``on_train_end`` and writes there by
  default, and PEFT *updates* an existing card, so the JSON and the card line written at ``on_train_end``
  survive it. `save_flat_lora_config` writes both anywhere else.

A failed run: if ``trainer.train()`` raises mid-step the model stays at ``W + E``. While the noise is live,
forward pre-hooks on the model and on the parent of every perturbed layer watch for a forward in eval mode (the Trainer
only trains in train mode, and evaluation and ``generate`` run in eval mode): such a forward first removes
the noise, then warns. It does not raise: the forward that tripped it is someone's evaluation or generation,
which then runs correctly at ``W``; raising would only break it without making it more right. Calling
``callback.restore()`` after a failed ``train()`` removes the noise without the warning.

AdaLoRA: the Trainer never calls ``update_and_allocate``, which AdaLoRA needs after every optimizer step
(it reads the gradients to score and prune ranks). For a model holding an ``AdaLoraModel`` the callback calls
``update_and_allocate(state.global_step)`` at ``on_optimizer_step``: after ``optimizer.step()``, before
``zero_grad()``, with the 0-based index of the step just taken, on clean weights (the noise is already gone).
Pass ``adalora_update=False`` if something else already calls it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ._checks import is_int
from ._jsonio import read_json, write_json, write_text_atomic
from .config import FlatLoraConfig
from .core import FlatLora

CONFIG_NAME = "flat_lora_config.json"
SIGMA_LOG_KEY = "flat_lora_sigma"
CARD_HEADING = "### Flat-LoRA"
CARD_PREFIX = "This adapter was trained with [Flat-LoRA](https://arxiv.org/abs/2409.14396)"


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
        self._guarded: list[nn.Module] = []  # modules whose eval-mode forward removes live noise
        self._guards: list[Any] = []  # their hook handles, present only while the noise is live
        self._live_step = 0  # the step whose noise is applied (for the guard's message)
        self._training = False  # between on_train_begin and on_train_end: logs get flat_lora_sigma
        self._attached = False

    def state(self) -> dict:
        return {"args": {"config": self.config.to_json(), "adalora_update": self.adalora_update}, "attributes": {}}

    def restore(self) -> None:
        """Remove the noise now (e.g. after ``trainer.train()`` raised mid-step), without the end-of-step check
        of `FlatLora.restore` (the step did not complete)."""
        self._end_step(check=False)

    def _end_step(self, check: bool) -> None:
        for handle in self._guards:
            handle.remove()
        self._guards.clear()
        if self.flat is not None:
            self.flat.restore(check=check)

    def attach(self, trainer: Any) -> "FlatLoraCallback":
        """Add this callback to ``trainer`` ahead of every other callback, and return it.

        The Trainer puts its reporting integrations (``report_to``: TensorBoard, W&B, ...) before the callbacks
        given in ``callbacks=[...]`` or ``add_callback``, and each records the log dict when its ``on_log`` runs:
        only a callback ahead of them can add ``flat_lora_sigma`` in time. Nothing else depends on the order.
        """
        callbacks = getattr(getattr(trainer, "callback_handler", None), "callbacks", None)
        if not isinstance(callbacks, list):
            raise ValueError(f"attach() needs a transformers Trainer (with callback_handler.callbacks), "
                             f"got {type(trainer).__name__}")
        others = [cb for cb in callbacks if isinstance(cb, FlatLoraCallback) and cb is not self]
        if others:
            raise ValueError("the trainer already holds a FlatLoraCallback; two would perturb every step twice. "
                             "Remove it (trainer.remove_callback(FlatLoraCallback)) before attaching this one")
        callbacks[:] = [cb for cb in callbacks if cb is not self]
        callbacks.insert(0, self)
        self._attached = True
        return self

    # --- Trainer events --------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("FlatLoraCallback needs the model in on_train_begin; use it with transformers' Trainer")
        self.restore()
        self.flat = FlatLora(model, self.config, total_steps=max(int(state.max_steps), 1))
        self._adalora = _find_adalora(model) if self.adalora_update else None
        self._guarded = _guard_modules(model, self.flat)
        self._training = True
        reporters = [r for r in (args.report_to or []) if r != "none"]
        if reporters and not self._attached:
            warnings.warn(
                f"FlatLoraCallback: report_to={reporters} will not record {SIGMA_LOG_KEY}: the Trainer runs its "
                "integrations before the callbacks passed to it. Add the callback with "
                "FlatLoraCallback(...).attach(trainer) instead of callbacks=[...] (the console and "
                "trainer.state.log_history get it either way)", UserWarning, stacklevel=2)

    def on_step_begin(self, args, state, control, **kwargs):
        self.flat.perturb(state.global_step + 1)
        self._live_step = state.global_step + 1
        # prepend: run before the other pre-hooks of these modules (FSDP2's unshard, ...)
        self._guards = [m.register_forward_pre_hook(self._eval_guard, prepend=True) for m in self._guarded]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # the step's micro-batches are done: check that the perturbed layers ran with their noise (RuntimeError
        # when none did: a fused LoRA kernel, docs/guard.md)
        self._end_step(check=True)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._adalora is not None:  # after optimizer.step(), before zero_grad(); global_step is 0-based here
            self._adalora.update_and_allocate(state.global_step)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.restore()  # training may stop after any micro-batch

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add ``flat_lora_sigma`` (sigma of the last optimizer step) to the log and to its history entry."""
        if not self._training or logs is None or self.flat is None or state.global_step < 1:
            return
        sigma = self.flat.sigma(min(int(state.global_step), self.flat.total_steps))
        # Trainer.log appended {**logs, "step": global_step} to log_history just before on_log: keep it equal
        entry = state.log_history[-1] if state.log_history else None
        if (isinstance(entry, dict) and entry.get("step") == state.global_step and SIGMA_LOG_KEY not in entry
                and set(entry) - {"step"} <= set(logs)):
            entry[SIGMA_LOG_KEY] = sigma
        logs[SIGMA_LOG_KEY] = sigma

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir():  # a hyperparameter search saves into output_dir/run-<trial>/
            warnings.warn(f"FlatLoraCallback: checkpoint folder {str(folder)!r} not found; {CONFIG_NAME} is not "
                          "written beside this checkpoint (save_flat_lora_config writes it anywhere)", stacklevel=2)
            return
        save_flat_lora_config(folder, self.config, total_steps=self._total_steps(state), step=state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()
        self._training = False
        if args.should_save:  # where trainer.save_model() writes by default, after this event
            save_flat_lora_config(args.output_dir, self.config, total_steps=self._total_steps(state),
                                  step=state.global_step)

    # --- helpers ---------------------------------------------------------------------------------------
    def _total_steps(self, state: Any) -> int:
        return self.flat.total_steps if self.flat is not None else max(int(state.max_steps), 1)

    def _eval_guard(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook, present only while the noise is live: an eval-mode forward removes it first."""
        if module.training or self.flat is None or not self.flat.is_perturbed:
            return
        self.restore()  # before warning: under warnings-as-errors the model is clean all the same
        self._training = False
        warnings.warn(
            f"FlatLoraCallback: {type(module).__name__} ran a forward in eval mode while the Flat-LoRA noise of "
            f"training step {self._live_step} was still applied, most likely because trainer.train() raised "
            "mid-step. The noise is removed now, so this forward and later ones run at the clean weights W; "
            "call callback.restore() after a failed trainer.train() to remove it without this warning.",
            RuntimeWarning, stacklevel=2)


def _guard_modules(model: nn.Module, flat: FlatLora) -> list[nn.Module]:
    """The model and the parent of each perturbed layer.

    The model's own hook catches ``model(...)`` (``trainer.evaluate``); the parents' hooks catch paths that skip
    the model's forward, such as ``PeftModel.generate`` (it calls the base model). Parents, not the layers: torch
    reads a module's ``forward`` and its list of pre-hooks before running the first of them, so a hook on the
    layer itself would remove the noise too late for that call (the exact mode's swapped ``forward`` of a plain
    target, its ``take_spec`` pre-hook of a DoRA or quantized layer would still run).
    """
    found = {id(model): model}
    for target in flat.target_layers:
        parent = model.get_submodule(target.name.rpartition(".")[0])
        found.setdefault(id(parent), parent)
    return list(found.values())


def _find_adalora(model: Any) -> Any:
    """The ``AdaLoraModel`` inside ``model`` (a ``PeftModel`` or the tuner itself), or None."""
    try:
        from peft.tuners.adalora import AdaLoraModel
    except ImportError:  # a PEFT without AdaLoRA
        return None
    return next((m for m in model.modules() if isinstance(m, AdaLoraModel)), None)


# --- the saved adapter's record ----------------------------------------------------------------------------
def save_flat_lora_config(output_dir: str | Path, config: FlatLoraConfig, *, total_steps: int,
                          step: int | None = None, model_card: bool = True) -> Path:
    """Record beside a saved adapter that Flat-LoRA trained it; return the JSON's path.

    Writes ``output_dir/flat_lora_config.json`` (``{"config": ..., "total_steps": T, "step": ..., "flatlora_version":
    ...}``; read it back with `load_flat_lora_config`) and, with ``model_card``, a Flat-LoRA line in
    ``output_dir/README.md``: added to the card PEFT's ``save_pretrained`` wrote, or a new card from the Hub's
    default template that a later ``save_pretrained`` into the same folder updates and keeps. Call it after
    saving an adapter somewhere the callback does not write (``FlatLoraCallback`` covers checkpoints and
    ``args.output_dir``). ``total_steps`` is the run's ``T`` (``sigma_T = rho``); ``step`` the optimizer steps
    taken when the adapter was saved.
    """
    from ._version import __version__

    if not isinstance(config, FlatLoraConfig):
        raise ValueError(f"config must be a FlatLoraConfig, got {type(config).__name__}; "
                         "build one with FlatLoraConfig(...) or FlatLoraConfig.from_dict(...)")
    if not is_int(total_steps) or total_steps <= 0:
        raise ValueError(f"total_steps={total_steps!r} must be a positive int: the run's number of optimizer steps")
    if step is not None and (not is_int(step) or step < 0):
        raise ValueError(f"step={step!r} must be None or a non-negative int: the optimizer steps taken")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"flatlora_version": __version__, "total_steps": total_steps, "step": step, "config": config.to_dict()}
    path = out / CONFIG_NAME
    write_json(path, record)
    if model_card:
        _add_card_line(out / "README.md", config, total_steps)
    return path


def load_flat_lora_config(path: str | Path) -> FlatLoraConfig:
    """The `FlatLoraConfig` recorded by `save_flat_lora_config` (``path``: the JSON or its folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist; pass a folder holding {CONFIG_NAME} (an adapter saved "
                         "with FlatLoraCallback or save_flat_lora_config) or the file itself")
    record = read_json(path)
    if not isinstance(record, dict) or "config" not in record:
        raise ValueError(f"{str(path)!r} holds no 'config' entry; it was not written by save_flat_lora_config")
    return FlatLoraConfig.from_dict(record["config"])


def _card_line(config: FlatLoraConfig, total_steps: int) -> str:
    from ._version import __version__

    return (f"{CARD_PREFIX} (flatlora {__version__}): rho={config.rho}, schedule={config.schedule}, "
            f"{total_steps} optimizer steps, noise seed {config.seed}; the full config is in `{CONFIG_NAME}`.")


def _add_card_line(card: Path, config: FlatLoraConfig, total_steps: int) -> None:
    """Put the Flat-LoRA line in the card: replace the one there, or append a section (text edit: the card's
    metadata block and PEFT's sections stay as they are)."""
    line = _card_line(config, total_steps)
    if card.exists():
        lines = card.read_text(encoding="utf-8").splitlines()
    else:
        from huggingface_hub import ModelCard, ModelCardData

        lines = str(ModelCard.from_template(ModelCardData())).splitlines()
    at = next((i for i, text in enumerate(lines) if text.startswith(CARD_PREFIX)), None)
    if at is None:
        while lines and not lines[-1].strip():
            lines.pop()
        lines += ["", CARD_HEADING, "", line, ""]  # the blank line keeps a section PEFT appends apart
    else:
        lines[at] = line
    write_text_atomic(card, "\n".join(lines) + "\n")
