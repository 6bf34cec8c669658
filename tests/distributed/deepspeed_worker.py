"""Trainer + FlatLoraCallback under DeepSpeed ZeRO-2/ZeRO-3 and, as the reference, DDP (gloo, CPU).

``torchrun --standalone --nproc_per_node=W deepspeed_worker.py OUT ddp plain zero3 ddp-dora zero3-dora ...``
trains once per backend named: a tiny BERT (LoRA on query/value), or with ``-dora`` a tiny Llama with DoRA
(whose noise is added beside the layer by a hook, not through the swapped base forward); ``plain`` is DDP
with rho = 0. Each run takes ``MAX_STEPS`` optimizer steps of ``ACCUM`` micro-batches per rank and writes
``OUT/rank{r}.pt`` with one entry per backend (a backend that raises stores its traceback under ``error``).
Data are sequential, so every backend sees the same micro-batches on each rank, and the noise is per rank
(the default), so the same noise too.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import traceback

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from _dist_common import example, record_micro_losses, save_rank
from flatlora import FlatLora, FlatLoraCallback, FlatLoraConfig
from kit.models import dist_bert, dist_llama

BATCH, ACCUM, MAX_STEPS, RHO, SEED = 2, 2, 3, 0.5, 5


def zero_config(stage: int, persist_below: int = 0) -> dict:
    """A DeepSpeed config as users give it to ``TrainingArguments(deepspeed=...)``; "auto" values come from
    the Trainer. By default DeepSpeed keeps parameters under 1e5 elements whole on every rank, which would be
    all of these tiny models: ``persist_below=0`` partitions every parameter under ZeRO-3; 500 partitions the
    base weights but keeps the LoRA factors and DoRA magnitudes whole, as the default does in a real LLM."""
    zero = {"stage": stage}
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=persist_below)
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto", "zero_optimization": zero}


def gathered(params):
    """``deepspeed.zero.GatheredParameters`` for ZeRO-3 parameters (a collective), else nothing."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)
    return contextlib.nullcontext()


def snapshot(model, trainable: bool) -> dict[str, torch.Tensor]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad == trainable]
    with gathered([p for _, p in params]):
        return {n: p.detach().clone() for n, p in params}


class Recorder(TrainerCallback):
    """Listed before the FlatLoraCallback: sees each step before the noise, and at its end still with it."""

    def __init__(self, flat_cb: FlatLoraCallback) -> None:
        self.flat_cb = flat_cb
        self.stepped_before_restore, self.perturbed_pre_opt = [], []

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.model = model
        self.param_kinds = sorted({"zero3" if hasattr(p, "ds_id") else "whole" for p in model.parameters()})
        self.persistent = sorted(n for n, p in model.named_parameters() if getattr(p, "ds_persist", False))
        try:
            FlatLora(model, FlatLoraConfig(mode="inplace"))
            self.inplace_error = None
        except ValueError as exc:
            self.inplace_error = str(exc)

    def on_step_begin(self, args, state, control, **kw):
        self.before = snapshot(self.model, trainable=True)

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.perturbed_pre_opt.append(self.flat_cb.flat.is_perturbed)
        now = snapshot(self.model, trainable=True)  # under DeepSpeed the optimizer has stepped already
        self.stepped_before_restore.append(any(not torch.equal(now[n], v) for n, v in self.before.items()))


def lm_example(i: int) -> dict[str, torch.Tensor]:
    ids = example(i)["input_ids"]
    return {"input_ids": ids, "labels": ids.clone()}


def run(backend: str, world: int) -> dict:
    engine, _, variant = backend.partition("-")
    dora = variant == "dora"
    model = dist_llama(seed=0, dora=True) if dora else dist_bert(seed=0)
    start = snapshot(model, trainable=False)
    flat_cb = FlatLoraCallback(FlatLoraConfig(rho=0.0 if engine == "plain" else RHO, seed=SEED))
    rec = Recorder(flat_cb)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
            max_steps=MAX_STEPS, learning_rate=1e-2, use_cpu=True, ddp_backend="gloo" if world > 1 else None,
            deepspeed=zero_config(int(engine[-1]), 500 if dora else 0) if engine.startswith("zero") else None,
            report_to=[], save_strategy="no", logging_strategy="no", remove_unused_columns=False, seed=0,
            train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True)
        data = [(lm_example if dora else example)(i) for i in range(BATCH * ACCUM * MAX_STEPS * world)]
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[rec, flat_cb])
        micro_losses = record_micro_losses(model, trainer)
        trainer.train()
        # outside forward, on every rank (ZeRO-3: gathers each layer for its norms)
        specs = {tg.name: (spec.seed, spec.scale.clone(), spec.shape) for tg, spec in
                 flat_cb.flat.noise_specs(MAX_STEPS)}
    end = snapshot(model, trainable=False)
    return dict(world=trainer.args.world_size, param_kinds=rec.param_kinds, persistent=rec.persistent,
                micro_losses=micro_losses,
                adapters=snapshot(model, trainable=True), steps=trainer.state.global_step,
                base_unchanged=all(torch.equal(end[n], w) for n, w in start.items()),
                perturbed_pre_opt=rec.perturbed_pre_opt, stepped_before_restore=rec.stepped_before_restore,
                is_perturbed_after=flat_cb.flat.is_perturbed, inplace_error=rec.inplace_error, specs=specs,
                noise_rank=flat_cb.flat.noise_rank)


def main(out: str, backends: list[str]) -> None:
    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    result = {}
    for backend in backends:
        try:
            result[backend] = run(backend, world)
        except Exception:  # reported by the test of that backend; the others still run
            result[backend] = {"error": traceback.format_exc()}
    save_rank(out, torch.distributed.get_rank(), result)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
