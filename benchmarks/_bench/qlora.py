"""QLoRA beside the float base: Flat-LoRA exact / LoRA step time with an NF4 base and with a dense one.

A stack of ``layers`` square ``hidden x hidden`` linear layers (GELU between them) with PEFT LoRA (r, alpha 2r,
no dropout) on every layer, built twice from the same seeded weights: once on ``nn.Linear`` (in ``dtype``), once
on bitsandbytes ``Linear4bit`` NF4 (quantized from those weights, compute dtype ``dtype``, no nested scales).
One step: ``loss = mean(model(x)^2)`` on ``tokens`` rows, backward (inside ``flat.perturbed(t)`` for Flat-LoRA),
AdamW step, zero_grad. The four steps (two bases x LoRA / Flat-LoRA exact) run interleaved in one process
(`_bench.timing.run_rounds`), so both ratios come from the same rounds and the same machine load. The input
does not require a gradient (as an embedding output would not), so the first layer needs no input gradient.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from flatlora import FlatLora, FlatLoraConfig

from . import timing

BASES = ("dense", "nf4")


class Stack(nn.Module):
    """``layers`` linear layers with GELU between them; ``is_loaded_in_4bit`` tells PEFT to wrap 4-bit bases."""

    def __init__(self, layers: list[nn.Module], four_bit: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.is_loaded_in_4bit = four_bit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else nn.functional.gelu(layer(x))
        return x


def build_stack(base: str, *, hidden: int, layers: int, rank: int, seed: int, device: torch.device,
                dtype: torch.dtype) -> nn.Module:
    """The PEFT LoRA stack on ``base`` (``"dense"`` or ``"nf4"``), in train mode."""
    from peft import LoraConfig, get_peft_model

    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(hidden, hidden, generator=gen) / hidden**0.5 for _ in range(layers)]
    mods: list[nn.Module] = []
    for w in weights:
        if base == "dense":
            layer = nn.Linear(hidden, hidden, bias=False)
            layer.weight = nn.Parameter(w.to(dtype), requires_grad=False)
            mods.append(layer.to(device))
            continue
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(hidden, hidden, bias=False, quant_type="nf4", compress_statistics=False,
                                  compute_dtype=dtype)
        layer.weight = bnb.nn.Params4bit(w.to(dtype), requires_grad=False, quant_type="nf4",
                                         compress_statistics=False, module=layer)
        mods.append(layer.to(device))  # quantizes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # PEFT initialises A from the global RNG
        model = get_peft_model(Stack(mods, base == "nf4"),
                               LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=r"layers\.\d+"))
    return model.train()


def time_bases(*, hidden: int, layers: int, tokens: int, rank: int, rounds: int, warmup: int, seed: int,
               device: torch.device, dtype: torch.dtype, rho: float = 0.05,
               progress=lambda s: None) -> dict:
    """Interleaved rounds of the four steps; per base the LoRA and Flat-LoRA medians, their ratio and the paired
    ratio with its 95% interval (`_bench.timing`), and the difference of the two bases' ratios."""
    total = warmup + rounds + 1
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed + 1)).to(device=device, dtype=dtype)
    steps = {}
    for base in BASES:
        model = build_stack(base, hidden=hidden, layers=layers, rank=rank, seed=seed, device=device, dtype=dtype)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        flat = FlatLora(model, FlatLoraConfig(rho=rho, seed=seed), total_steps=total)
        for variant in ("lora", "flat-exact"):
            def step(t: int, model=model, opt=opt, flat=flat, perturb=variant == "flat-exact") -> None:
                with flat.perturbed(t) if perturb else contextlib.nullcontext():
                    model(x).float().square().mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            steps[f"{base}/{variant}"] = step
    counter = timing.StepCounter(list(steps), total)
    times = timing.run_rounds(steps, counter, rounds=rounds, warmup=warmup, device=device, progress=progress)
    out: dict = {"hidden": hidden, "layers": layers, "tokens": tokens, "rank": rank, "rounds": rounds,
                 "dtype": str(dtype).removeprefix("torch."), "bases": {}}
    for base in BASES:
        lora, flat = times[f"{base}/lora"]["wall"], times[f"{base}/flat-exact"]["wall"]
        lw, fw = timing.summarize(lora), timing.summarize(flat)
        out["bases"][base] = {"lora": lw, "flat": fw, "ratio": fw["median_ms"] / lw["median_ms"],
                              "paired_ratio": timing.paired_ratio(flat, lora),
                              "paired_ci95": timing.paired_ratio_ci(flat, lora),
                              "cpu_ratio": (timing.summarize(times[f"{base}/flat-exact"]["cpu"])["median_ms"]
                                            / timing.summarize(times[f"{base}/lora"]["cpu"])["median_ms"])}
    out["ratio_gap"] = out["bases"]["nf4"]["ratio"] - out["bases"]["dense"]["ratio"]
    return out


def table(res: dict) -> list[str]:
    """Markdown rows of one `time_bases` result."""
    lines = ["| base | LoRA ms, median [IQR] | Flat-LoRA exact ms, median [IQR] | x LoRA | x LoRA, paired [95% CI] | "
             "x LoRA (CPU time) |", "|---|---|---|---|---|---|"]
    names = {"dense": f"{res['dtype']} `nn.Linear`", "nf4": "bitsandbytes NF4 `Linear4bit`"}
    for base, b in res["bases"].items():
        lo, hi = b["paired_ci95"]
        lines.append(f"| {names[base]} | {b['lora']['median_ms']:.1f} [{b['lora']['q1_ms']:.1f}-{b['lora']['q3_ms']:.1f}] "
                     f"| {b['flat']['median_ms']:.1f} [{b['flat']['q1_ms']:.1f}-{b['flat']['q3_ms']:.1f}] | "
                     f"{b['ratio']:.3f} | {b['paired_ratio']:.3f} [{lo:.3f}-{hi:.3f}] | {b['cpu_ratio']:.3f} |")
    return lines


def describe(res: dict) -> str:
    return (f"{res['layers']} LoRA layers {res['hidden']}x{res['hidden']} (r {res['rank']}), {res['tokens']} tokens "
            f"per step, compute in {res['dtype']}, {res['rounds']} interleaved rounds; NF4 ratio - dense ratio = "
            f"{res['ratio_gap']:+.3f}")
