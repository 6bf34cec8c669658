"""`BenchConfig`: what `benchmarks/overhead.py` measures; every field is also a command-line flag."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from flatlora import _dataclass_io as dio

from .models import PRESETS
from .variants import VARIANTS

_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class BenchConfig:
    """Sizes, repeats and measurements of the overhead benchmark (see ``overhead.py --help``)."""

    device: str = dio.help_field("cpu", "cpu or cuda (cuda[:i] needs a GPU; timing synchronises the device)")
    threads: int | None = dio.help_field(None, "torch CPU threads (None: torch's default, all cores)")
    dtype: str = dio.help_field("float32", "backbone dtype: float32, bfloat16 or float16 (the in-place mode "
                                           "needs float32 and is skipped otherwise; bf16 is very slow on CPUs)")
    models: list[str] = dio.help_field(["minilm", "wide"], f"models to time ({', '.join(PRESETS)})")
    variants: list[str] = dio.help_field(list(VARIANTS), "steps compared; 'lora' (the reference) is always run")
    batch: int = dio.help_field(32, "sequences per step")
    seq: int = dio.help_field(64, "tokens per sequence")
    rank: int = dio.help_field(8, "LoRA rank (alpha = 2 * rank)")
    rho: float = dio.help_field(0.05, "Flat-LoRA rho (the cost does not depend on it, as long as sigma_t > 0)")
    sam_rho: float = dio.help_field(0.05, "LoRA-SAM rho (the cost does not depend on it)")
    seed: int = dio.help_field(0, "seed of the weights, the batch and the noise")
    rounds: int = dio.help_field(40, "timed interleaved rounds (one step of every variant each) per model")
    wide_rounds: int = dio.help_field(16, "rounds for the 'wide' model (about 5x the compute of minilm)")
    warmup: int = dio.help_field(2, "untimed rounds first")
    memory: bool = dio.help_field(True, "measure the peak tensor memory of one step per variant")
    rss: bool = dio.help_field(True, "CPU: also the RSS high-water mark, one fresh process per variant")
    rss_mmap_threshold: int = dio.help_field(
        131072, "glibc MALLOC_MMAP_THRESHOLD_ (bytes) of the RSS processes: freed tensors go back to the OS, so "
                "the mark follows live memory (0: glibc's dynamic default, whose heap reuse moved the mark "
                "of identical MiniLM runs by +-4%)")
    breakdown: bool = dio.help_field(True, "time the pieces of the noise (norms, draw, apply) per layer shape")
    breakdown_repeats: int = dio.help_field(20, "repeats of each piece in the breakdown (median kept)")
    sweep_hidden: list[int] = dio.help_field([128, 256, 512, 768, 1024], "hidden sizes of the scaling sweep "
                                                                          "(empty: no sweep)")
    sweep_layers: int = dio.help_field(2, "encoder layers of the sweep models")
    sweep_rounds: int = dio.help_field(8, "timed rounds per sweep size (LoRA vs Flat-LoRA exact)")
    sweep_vocab: int = dio.help_field(30522, "vocabulary of the sweep models")
    qlora: bool = dio.help_field(True, "also time QLoRA: an NF4 base beside a dense one, LoRA vs Flat-LoRA "
                                       "exact, interleaved (needs bitsandbytes; skipped with a note without it)")
    qlora_hidden: int = dio.help_field(1024, "QLoRA configuration: width of its square layers")
    qlora_layers: int = dio.help_field(6, "QLoRA configuration: LoRA layers in the stack")
    qlora_tokens: int = dio.help_field(2048, "QLoRA configuration: tokens per step")
    qlora_rounds: int = dio.help_field(8, "QLoRA configuration: timed interleaved rounds")
    out: str = dio.help_field("benchmarks/results", "folder for overhead-<device>.json and .md")
    quick: bool = dio.help_field(False, "smoke-test sizes: tiny models, 2 rounds, no RSS (seconds, for CI)")

    def __post_init__(self) -> None:
        for name in ("batch", "seq", "rank", "rounds", "wide_rounds", "breakdown_repeats", "sweep_layers",
                     "sweep_rounds", "sweep_vocab", "qlora_hidden", "qlora_layers", "qlora_tokens", "qlora_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 1")
        if self.warmup < 0:
            raise ValueError(f"warmup={self.warmup!r} must be >= 0")
        if self.rss_mmap_threshold < 0:
            raise ValueError(f"rss_mmap_threshold={self.rss_mmap_threshold!r} must be >= 0 (0: glibc's default)")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads!r} must be >= 1 (or None for torch's default)")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; choose one of {', '.join(_DTYPES)}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device={self.device!r}; use cpu or cuda[:index]")
        bad = [m for m in self.models if m not in PRESETS]
        if bad:
            raise ValueError(f"unknown model(s) {bad}; choose from {', '.join(PRESETS)}")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise ValueError(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
        if "lora" not in self.variants:
            self.variants = ["lora", *self.variants]
        if any(h < 1 for h in self.sweep_hidden):
            raise ValueError(f"sweep_hidden={self.sweep_hidden!r} must hold positive sizes")
        if self.rho <= 0:
            raise ValueError(f"rho={self.rho!r} must be > 0: at sigma = 0 Flat-LoRA does nothing to time")

    def quick_sizes(self) -> "BenchConfig":
        """The ``--quick`` sizes (flags given beside --quick are applied on top of them)."""
        return dataclasses.replace(
            self, models=["tiny"], batch=4, seq=16, rounds=2, wide_rounds=2, warmup=1, rss=False,
            breakdown_repeats=2, sweep_hidden=[32, 64], sweep_layers=1, sweep_rounds=2, sweep_vocab=1000,
            qlora_hidden=64, qlora_layers=2, qlora_tokens=64, qlora_rounds=2)

    def rounds_for(self, model: str) -> int:
        return self.wide_rounds if model == "wide" else self.rounds

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)
