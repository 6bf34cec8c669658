"""FSDP2 (``fully_shard``): ``collect(rank, world)``, or alone ``torchrun --nproc_per_node=2 fsdp2_worker.py OUT``.

A tiny Llama is sharded per decoder layer and at the root (outside forward every parameter is a DTensor
row shard). One optimizer step of 2 micro-batches per rank runs inside ``flat.perturbed(T)``, for the default
per-rank noise and for ``same_noise_across_ranks``; the full (all-gathered) LoRA gradients are saved for
comparison with a single-process reference built in the pytest process.
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch.distributed.fsdp import fully_shard

from _dist_common import init, micro_batch, save_rank
from flatlora import FlatLora, FlatLoraConfig
from kit.models import dist_llama

RHO, SEED, T, MICRO = 0.5, 7, 2, 2  # step t = T: sigma = rho


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def dora_step(rank: int, world: int) -> dict[str, torch.Tensor]:
    """DoRA layers take the forward-hook path (noise added beside the layer); same noise on both ranks."""
    model = dist_llama(seed=0, dora=True)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    flat = FlatLora(model, FlatLoraConfig(rho=RHO, seed=SEED, same_noise_across_ranks=True), total_steps=T)
    with flat.perturbed(T):
        for k in range(MICRO):
            (model(**micro_batch(T, world * k + rank, lm=True)).loss / MICRO).backward()
    return {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}


def main(out: str) -> None:
    rank, world = init()
    save_rank(out, rank, collect(rank, world))
    torch.distributed.destroy_process_group()


def collect(rank: int, world: int) -> dict:
    model = dist_llama(seed=0)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    kinds = {n: type(p).__name__ for n, p in model.named_parameters()}
    result = {"param_types": kinds, "world": world}

    try:
        FlatLora(model, FlatLoraConfig(mode="inplace"))
        result["inplace_error"] = None
    except ValueError as exc:
        result["inplace_error"] = str(exc)

    shards = {n: p.to_local().clone() for n, p in model.named_parameters() if not p.requires_grad}
    for name, same in (("default", False), ("same", True)):
        flat = FlatLora(model, FlatLoraConfig(rho=RHO, seed=SEED, same_noise_across_ranks=same), total_steps=T)
        # outside forward: noise_specs all-gathers each layer's shards to take its row norms (all ranks call it)
        specs = {target.name: (spec.seed, spec.scale.clone(), spec.shape) for target, spec in flat.noise_specs(T)}
        with warnings.catch_warnings(record=True) as caught, flat.perturbed(T):
            warnings.simplefilter("always")
            for k in range(MICRO):
                loss = model(**micro_batch(T, world * k + rank, lm=True)).loss
                (loss / MICRO).backward()
        grads = {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        result[name] = dict(specs=specs, grads=grads, noise_rank=flat.noise_rank, targets=flat.targets,
                            swapped=[n for n, m in model.named_modules() if "forward" in m.__dict__],
                            ran=sorted(flat._seen),
                            warnings=[str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)])
    result["shards_unchanged"] = all(torch.equal(p.to_local(), shards[n])
                                     for n, p in model.named_parameters() if not p.requires_grad)
    result["frozen_full"] = {n: full(p) for n, p in model.named_parameters() if not p.requires_grad}
    result["dora"] = dora_step(rank, world)
    return result


if __name__ == "__main__":
    main(sys.argv[1])
