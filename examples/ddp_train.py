"""Flat-LoRA on several processes (DDP) through accelerate or torchrun; runs on CPUs too.

    accelerate launch --num_processes 2 examples/ddp_train.py                # 2 GPUs
    accelerate launch --multi_gpu --num_processes 2 examples/ddp_train.py    # no GPU: 2 CPU processes, gloo
    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py
    python examples/ddp_train.py                                             # one process

A tiny BERT is built from a config (no download). Each rank draws its own noise (``--same-noise`` for one
draw on all ranks); ``t`` counts optimizer steps, so ``sigma`` reaches ``rho`` at the last step whatever the
number of processes or the gradient accumulation. Every rank prints one line at the end: the digests of
its adapter and base weights are the same on all ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import math

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertForSequenceClassification

from flatlora import FlatLora, FlatLoraConfig


def digest(tensors) -> str:
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def steps_of(loader, accum: int):
    """Group the loader's micro-batches into optimizer steps of ``accum`` (the last one may be shorter)."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == accum:
            yield group
            group = []
    if group:
        yield group


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4, help="per process")
    ap.add_argument("--accum", type=int, default=2, help="gradient accumulation steps")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--same-noise", action="store_true", help="one noise draw shared by all ranks")
    args = ap.parse_args()

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(0)  # the same initial model on every rank (DDP also broadcasts rank 0's weights)
    bert = BertForSequenceClassification(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                    intermediate_size=128, vocab_size=100, num_labels=2))
    model = get_peft_model(bert, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                            task_type="SEQ_CLS"))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (args.examples, 16), generator=gen)
    labels = (ids[:, 0] % 2).long()  # a learnable rule
    loader = DataLoader(TensorDataset(ids, labels), batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    peft_model = accelerator.unwrap_model(model)
    frozen = [p for p in peft_model.parameters() if not p.requires_grad]
    base_before = digest(frozen)
    total = args.epochs * math.ceil(len(loader) / args.accum)  # optimizer steps (len(loader): this rank's)
    flat = FlatLora(peft_model, FlatLoraConfig(rho=args.rho, same_noise_across_ranks=args.same_noise),
                    total_steps=total)

    t = 0
    for _ in range(args.epochs):
        for micro_batches in steps_of(loader, args.accum):
            t += 1
            with flat.perturbed(t):  # every micro-batch of step t at W + E_t (this rank's E)
                for k, (x, y) in enumerate(micro_batches):
                    last = k == len(micro_batches) - 1
                    with contextlib.nullcontext() if last else accelerator.no_sync(model):
                        loss = model(input_ids=x, labels=y).loss
                        accelerator.backward(loss / len(micro_batches))
            optimizer.step()  # at W again; DDP has averaged the gradients of all ranks
            optimizer.zero_grad()

    mean_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
    trained = [p for p in peft_model.parameters() if p.requires_grad]
    print(f"rank {accelerator.process_index}/{accelerator.num_processes}  steps {t}/{total}  "
          f"sigma_T {flat.sigma(t):.4f} (rho {args.rho})  noise_rank {flat.noise_rank}  last_loss {mean_loss:.4f}  "
          f"adapters {digest(trained)}  base {digest(frozen)}  base_unchanged {digest(frozen) == base_before}",
          flush=True)
    # Free the DDP wrapper while the process group still exists. Its gradient Reducer holds the group; were the
    # Reducer the last holder, gloo's destructor would join its threads with the GIL held while a gloo thread
    # waits for the GIL to free a finished all-reduce: a hang at exit (seen about once in 3 runs on 2 CPUs).
    accelerator.free_memory()
    del model, optimizer, loader, loss
    gc.collect()
    accelerator.end_training()


if __name__ == "__main__":
    main()
