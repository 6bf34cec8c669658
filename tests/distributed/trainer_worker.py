"""Trainer + FlatLoraCallback under DDP: ``collect(rank, world)``, or ``torchrun ... trainer_worker.py OUT``.

``run(world, accum, same_noise)`` also runs in-process for world size 1. The Trainer derives the number of
optimizer steps ``T = state.max_steps`` from the data: ``N / (batch * accum * world) * epochs``. Batches are
sequential, so world 2 x accumulation 2 and world 1 x accumulation 4 see the same micro-batches per step.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from _dist_common import example, record_micro_losses, save_rank
from ddp_worker import adapters, base_state, probe_noise
from flatlora import FlatLoraCallback, FlatLoraConfig
from kit.adapters import lora_layers
from kit.models import dist_bert
from kit.references import merged_by_hand

N, BATCH, EPOCHS, RHO, SEED = 16, 2, 2, 0.5, 5


class Recorder(TrainerCallback):
    """Listed before the FlatLoraCallback, so it sees each step before the noise and at its end still with it."""

    def __init__(self, flat_cb: FlatLoraCallback) -> None:
        self.flat_cb = flat_cb
        self.steps, self.clean_begin, self.perturbed_pre_opt, self.clean_pre_opt = [], [], [], []
        self.probe, self.merged_last, self.model_type = {}, {}, None

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.model, self.model_type = model, type(model).__name__
        self.start = base_state(model)

    def _clean(self) -> bool:
        now = base_state(self.model)
        return all(torch.equal(now[k], self.start[k]) for k in now)

    def on_step_begin(self, args, state, control, **kw):
        self.steps.append(state.global_step + 1)
        self.clean_begin.append(self._clean())

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.perturbed_pre_opt.append(self.flat_cb.flat.is_perturbed)
        self.clean_pre_opt.append(self._clean())  # the exact mode never writes the base weights
        if state.global_step + 1 == state.max_steps:  # the last step, its noise still applied
            self.probe = probe_noise(self.model, self.start)
            self.merged_last = {n: merged_by_hand(m) for n, m in lora_layers(self.model).items()}


def run(world: int, accum: int, same_noise: bool) -> dict:
    model = dist_bert(seed=0)
    flat_cb = FlatLoraCallback(FlatLoraConfig(rho=RHO, seed=SEED, same_noise_across_ranks=same_noise))
    rec = Recorder(flat_cb)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=BATCH, gradient_accumulation_steps=accum,
            num_train_epochs=EPOCHS, learning_rate=1e-2, use_cpu=True, ddp_backend="gloo" if world > 1 else None,
            report_to=[], save_strategy="no", logging_strategy="no", remove_unused_columns=False, seed=0,
            train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True)
        data = [example(i) for i in range(N)]
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[rec, flat_cb])
        micro_losses = record_micro_losses(model, trainer)
        trainer.train()
    return dict(world=trainer.args.world_size, max_steps=trainer.state.max_steps, steps=rec.steps,
                clean_begin=rec.clean_begin, perturbed_pre_opt=rec.perturbed_pre_opt, clean_pre_opt=rec.clean_pre_opt,
                probe=rec.probe, merged_last=rec.merged_last, model_type=rec.model_type,
                flat_model_type=type(flat_cb.flat.model).__name__, noise_rank=flat_cb.flat.noise_rank,
                total_steps=flat_cb.flat.total_steps, micro_losses=micro_losses,
                adapters=adapters(model), base_start=rec.start, base_end=base_state(model),
                is_perturbed_after=flat_cb.flat.is_perturbed)


def collect(rank: int, world: int) -> dict:
    return {"default": run(world, 2, same_noise=False), "same": run(world, 2, same_noise=True)}


def main(out: str) -> None:
    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])  # the Trainer (accelerate) sets up the gloo process group itself
    result = collect(-1, world)
    save_rank(out, torch.distributed.get_rank(), result)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
