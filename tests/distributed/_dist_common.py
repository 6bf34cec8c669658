"""Shared by the torchrun workers and their pytest wrappers: tiny models, data, launching, references.

Everything here is deterministic (seeded generators) so that every rank, and the single-process
reference in the pytest process, builds the same model and sees the same micro-batches.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
VOCAB, SEQ = 64, 8


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(HERE), env.get("PYTHONPATH", "")])
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


# --- models and data ----------------------------------------------------------------------------------
def bert(seed: int = 0) -> nn.Module:
    """2-layer BERT classifier (hidden 32) with LoRA on query/value, B random so that W != W_base."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=32, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.2)
    model = get_peft_model(BertForSequenceClassification(cfg),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    _randomize_lora(model, seed)
    return model


def llama(seed: int = 0, dora: bool = False) -> nn.Module:
    """2-layer Llama (hidden 32, GQA) with LoRA (or DoRA) on q/v/down projections (out dims 32, 16, 32)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM",
                                                             target_modules=["q_proj", "v_proj", "down_proj"],
                                                             use_dora=dora))
    _randomize_lora(model, seed)
    return model


def _randomize_lora(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


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


# --- independent references ---------------------------------------------------------------------------
def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT LoRA layers by module name, in ``named_modules`` order (= Flat-LoRA's noise index)."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


def merged_by_hand(layer: nn.Module) -> torch.Tensor:
    """``W_base + (alpha / r) B A`` in float64 from the raw tensors (no PEFT or flatlora code)."""
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    delta = b.detach().double() @ a.detach().double()
    return layer.base_layer.weight.detach().double() + layer.scaling["default"] * delta


def row_std_by_hand(w: torch.Tensor, sigma: float) -> torch.Tensor:
    """``sigma ||W[i, :]|| / sqrt(n)`` in float64."""
    return sigma * w.norm(dim=1) / math.sqrt(w.shape[1])


def sigma_cosine(t: int, total: int, rho: float) -> float:
    return rho * (1 - math.cos(math.pi * t / total)) / 2


def fitted_row_std(e: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Least-squares ``s`` with ``E[i, :] = s_i z[i, :]`` and the relative residual of that fit."""
    e, z = e.double(), z.double()
    s = (e * z).sum(1) / (z * z).sum(1)
    resid = (e - s[:, None] * z).norm() / e.norm()
    return s, float(resid)


def with_noise(model: nn.Module, noise: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy whose base weights hold ``W_base + E`` (the paper's in-place way, on a copy)."""
    ref = copy.deepcopy(model)
    layers = lora_layers(ref)
    with torch.no_grad():
        for name, e in noise.items():
            w = layers[name].base_layer.weight
            w.copy_(w + e.to(w.dtype))
    return ref
