"""Shared by the torchrun workers and their pytest wrappers: launching, process-group set-up, rank results, data.

Models and references come from the test kit (tests/kit/; ``kit.models.dist_bert`` / ``dist_llama``,
``kit.references``). Everything is deterministic (seeded generators) so that every rank, and the
single-process reference in the pytest process, builds the same model and sees the same micro-batches.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
ROOT = HERE.parents[1]
VOCAB, SEQ = 64, 8
if str(TESTS) not in sys.path:  # torchrun starts the workers as scripts: make the kit (tests/kit) importable
    sys.path.append(str(TESTS))


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(HERE), str(TESTS), env.get("PYTHONPATH", "")])
    return env


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=str(ROOT), env=worker_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited with {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}"
                             f"\n--- stderr ---\n{proc.stderr[-8000:]}")
    return proc


def torchrun(script: str, *args: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=nproc tests/distributed/<script> args`` (gloo, CPU)."""
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                 str(HERE / script), *args], timeout)


def accelerate_launch(script: Path, *args: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """``accelerate launch`` with ``nproc`` processes; ``--multi_gpu`` selects accelerate's torch.distributed
    launcher (on a machine without GPUs the processes then run on CPU with gloo)."""
    exe = Path(sys.executable).with_name("accelerate")
    return _run([str(exe), "launch", "--multi_gpu", f"--num_processes={nproc}", "--num_machines=1",
                 "--mixed_precision=no", "--dynamo_backend=no", str(script), *args], timeout)


_SUITE: list[dict] = []


def suite_section(tmp_path_factory, section: str) -> list[dict]:
    """Rank results of one section of ``suite_worker.py``, launched once per pytest process (2 ranks)."""
    if not _SUITE:
        out = tmp_path_factory.mktemp("torchrun")
        torchrun("suite_worker.py", str(out))
        _SUITE.extend(load_ranks(out, 2))
    ranks = [r[section] for r in _SUITE]
    for rank, r in enumerate(ranks):
        if "error" in r:
            raise AssertionError(f"section {section!r} failed on rank {rank}:\n{r['error']}")
    return ranks


# --- distributed helpers (workers) -------------------------------------------------------------------
def init() -> tuple[int, int]:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def save_rank(out: str, rank: int, result: dict) -> None:
    torch.save(result, Path(out) / f"rank{rank}.pt")


def load_ranks(out: Path, world: int) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


# --- data ----------------------------------------------------------------------------------------------------
def example(i: int) -> dict[str, torch.Tensor]:
    """Example ``i`` of an endless synthetic classification set (3 classes, ids in [0, 64))."""
    gen = torch.Generator().manual_seed(10_000 + i)
    ids = torch.randint(0, VOCAB, (SEQ,), generator=gen)
    return {"input_ids": ids, "labels": torch.randint(0, 3, (), generator=gen)}


def micro_batch(step: int, j: int, size: int = 4, lm: bool = False) -> dict[str, torch.Tensor]:
    """Global micro-batch ``j`` of optimizer step ``step`` (``size`` examples)."""
    rows = [example(1000 * step + size * j + i) for i in range(size)]
    ids = torch.stack([r["input_ids"] for r in rows])
    return {"input_ids": ids, "labels": ids.clone() if lm else torch.stack([r["labels"] for r in rows])}


def record_micro_losses(model: torch.nn.Module, trainer) -> dict[tuple, float]:
    """A dict the model's loss of each micro-batch (before the Trainer rescales it) is written into while
    ``trainer`` trains, keyed by (optimizer step, the micro-batch's input ids)."""
    losses: dict[tuple, float] = {}

    def record(module, inputs, kwargs, output):
        losses[(trainer.state.global_step + 1, tuple(kwargs["input_ids"].flatten().tolist()))] = output["loss"].item()

    model.register_forward_hook(record, with_kwargs=True)
    return losses
