"""All torchrun checks in one launch (starting Python with torch, transformers and PEFT is most of the cost):
``torchrun --standalone --nproc_per_node=2 suite_worker.py OUT`` writes ``OUT/rank{r}.pt`` with one entry per
section (``ddp``, ``fsdp2``, ``fsdp1``, ``trainer``); a section that raises stores its traceback under ``error``.
Each section's module also runs alone (``torchrun ... ddp_worker.py OUT``) for debugging.
"""

from __future__ import annotations

import sys
import traceback

import torch

import ddp_worker
import fsdp1_worker
import fsdp2_worker
import trainer_worker
from _dist_common import init, save_rank

SECTIONS = {"ddp": ddp_worker.collect, "fsdp2": fsdp2_worker.collect, "fsdp1": fsdp1_worker.collect,
            "trainer": trainer_worker.collect}


def main(out: str) -> None:
    rank, world = init()  # gloo; the Trainer's accelerate state reuses this process group
    results = {}
    for name, collect in SECTIONS.items():
        try:
            results[name] = collect(rank, world)
        except Exception:  # report it with the section's tests; the other sections still run
            results[name] = {"error": traceback.format_exc()}
        torch.distributed.barrier()
    save_rank(out, rank, results)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
