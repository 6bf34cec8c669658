"""Plain PyTorch loop under DDP: ``collect(rank, world)``, or alone ``torchrun ... ddp_worker.py OUT``.

``run(scenario, rank=0, world=1)`` is the one-process reference (run in the pytest process).

Each optimizer step covers ``GLOBAL_MICRO`` micro-batches: with world size w, rank r takes those with
``j % w == r`` (2 each for w = 2, gradient accumulation 2; all 4 for w = 1), so every world size trains on
the same data with the same effective batch. Results go to ``OUT/rank{r}.pt``.
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F
from torch import nn

from _dist_common import init, micro_batch, save_rank
from flatlora import FlatLora, FlatLoraConfig
from kit.adapters import lora_layers
from kit.models import dist_bert
from kit.references import merged_by_hand

RHO, SEED, STEPS, GLOBAL_MICRO = 0.5, 3, 3, 4
SCENARIOS = {
    "exact-default": dict(mode="exact", same_noise_across_ranks=False),
    "exact-same": dict(mode="exact", same_noise_across_ranks=True),
    "inplace-default": dict(mode="inplace", same_noise_across_ranks=False),
}


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Frozen weights and buffers (everything the optimizer does not train)."""
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in trained}


def adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trained weights: LoRA A/B and PEFT's trainable copy of the classifier head."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def probe_noise(model: nn.Module, clean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The noise each LoRA base layer applies now, measured from outside: ``layer(I) - I W_start^T - b``.

    ``clean`` holds the base weights at the start (the base is frozen), so this also sees in-place noise.
    """
    out = {}
    for name, layer in lora_layers(model).items():
        base = layer.base_layer
        eye = torch.eye(base.in_features)
        w0 = clean[f"{name}.base_layer.weight"]
        out[name] = (base(eye) - F.linear(eye, w0, base.bias)).t().clone()
    return out


def run(scenario: str, rank: int, world: int) -> dict:
    model = dist_bert(seed=0)
    start = base_state(model)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    flat = FlatLora(model, FlatLoraConfig(rho=RHO, seed=SEED, **SCENARIOS[scenario]), total_steps=STEPS)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    local = [j for j in range(GLOBAL_MICRO) if j % world == rank]
    losses, merged_last, probe = {}, {}, {}
    for t in range(1, STEPS + 1):
        if t == STEPS:
            merged_last = {n: merged_by_hand(m) for n, m in lora_layers(model).items()}
        with flat.perturbed(t):
            for k, j in enumerate(local):
                last = k == len(local) - 1
                with contextlib.nullcontext() if world == 1 or last else net.no_sync():
                    loss = net(**micro_batch(t, j)).loss
                    (loss / len(local)).backward()
                losses[(t, j)] = loss.item()
            if t == STEPS:
                probe = probe_noise(model, start)
        opt.step()
        opt.zero_grad()
    return dict(losses=losses, adapters=adapters(model), base_start=start, base_end=base_state(model),
                probe=probe, merged_last=merged_last, noise_rank=flat.noise_rank, world=world,
                sigma_last=flat.sigma(STEPS), targets=flat.targets)


def collect(rank: int, world: int) -> dict:
    return {name: run(name, rank, world) for name in SCENARIOS}


def main(out: str) -> None:
    rank, world = init()
    save_rank(out, rank, collect(rank, world))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
