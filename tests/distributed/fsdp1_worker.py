"""FSDP1 (``FullyShardedDataParallel``) is refused: ``collect(rank, world)``, or ``torchrun ... fsdp1_worker.py OUT``.

A tiny Llama with LoRA is wrapped with FSDP1 as accelerate wraps a PEFT model (PEFT's
``fsdp_auto_wrap_policy``: the LoRA factors in units of their own), with ``use_orig_params`` True and False,
and with ``use_orig_params=True`` also at the root only. For each, FlatLora is built on the wrapper, on the
model inside it, and before wrapping (then ``perturb`` and ``noise_specs`` meet the wrapped model); each
must raise the one FSDP1 error, and the model must still train (a forward/backward after the refusals).
The Trainer passes the model it was given (here: the one inside the wrapper) to the callback, whose
``FlatLora`` then refuses it; the Trainer's own FSDP1 path (accelerate's plugin) needs a GPU, so it is not
run here.
"""

from __future__ import annotations

import sys

import torch
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from _dist_common import init, micro_batch, save_rank
from flatlora import FlatLora, FlatLoraConfig
from kit.models import dist_llama

T = 2


def error_of(fn) -> str | None:
    try:
        fn()
    except ValueError as exc:
        return str(exc)
    return None


def wrapped_case(use_orig_params: bool, peft_wrap: bool) -> dict:
    from peft.utils.other import fsdp_auto_wrap_policy

    model = dist_llama(seed=0)
    early = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)  # built before FSDP1 wraps the model
    policy = fsdp_auto_wrap_policy(model) if peft_wrap else None
    wrapper = FSDP(model, use_orig_params=use_orig_params, auto_wrap_policy=policy, device_id=torch.device("cpu"))
    out = {"on_wrapper": error_of(lambda: FlatLora(wrapper, FlatLoraConfig(rho=0.5), total_steps=T)),
           "on_inner": error_of(lambda: FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)),
           "perturb_after_wrap": error_of(lambda: early.perturb(T)), "early_perturbed": early.is_perturbed,
           "noise_specs_after_wrap": error_of(lambda: early.noise_specs(T))}
    loss = wrapper(**micro_batch(T, torch.distributed.get_rank(), lm=True)).loss  # still trains, unperturbed
    loss.backward()
    out["loss_finite"] = bool(torch.isfinite(loss))
    return out


def collect(rank: int, world: int) -> dict:
    result = {}
    for orig, peft_wrap in ((True, True), (False, True), (True, False)):
        result[f"orig={orig},wrap={'peft' if peft_wrap else 'root'}"] = wrapped_case(orig, peft_wrap)
    return result


def main(out: str) -> None:
    rank, world = init()
    save_rank(out, rank, collect(rank, world))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
