"""Flat-LoRA's step time and peak memory against LoRA and LoRA-SAM on a GPU, with the Triton noise kernel.

    .venv/bin/python benchmarks/gpu_overhead.py                      # the issue-15 run (~3-5 min on an H100)
    .venv/bin/python benchmarks/gpu_overhead.py --device cpu --quick # smoke run on CPU (tiny Llama, seconds)

For each configuration (micro-batch tokens x micro-batches per step) the variants of ``_bench/llama.py``
(LoRA, Flat-LoRA exact with the default noise backend, the same with torch's generator, LoRA-SAM) share one
model, one set of micro-batches and one AdamW, and run in interleaved rounds (``_bench/timing.py``: a seeded
random order per round, device synchronised around each step); step-time ratios to LoRA are paired per round
with 95% bootstrap intervals. Rounds per configuration are capped by ``--budget-s`` (the warm-up round's time
sets how many fit). Peak memory: ``torch.cuda.max_memory_allocated`` over one step per variant, reset before it.
The breakdown times the noise alone on the model's own layer shapes with each backend (`_bench/breakdown.py`)
and converts it to milliseconds per micro-batch. Writes ``gpu-overhead-<device>.json`` and ``.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from flatlora import FlatLora, FlatLoraConfig, noise  # noqa: E402

from _bench import breakdown, memory, timing  # noqa: E402
from _bench.llama import GPU_VARIANTS, LLAMA_PRESETS, build_gpu_steps, build_llama, token_batches  # noqa: E402

MIB = 1024 * 1024


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda[:i] (the benchmark) or cpu (smoke runs)")
    p.add_argument("--model", default="llama-1b", choices=sorted(LLAMA_PRESETS))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192], help="tokens per micro-batch")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--accum", type=int, nargs="+", default=[1, 4], help="micro-batches per optimizer step")
    p.add_argument("--variants", nargs="+", default=list(GPU_VARIANTS), choices=list(GPU_VARIANTS))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--rounds", type=int, default=12, help="most timed rounds per configuration")
    p.add_argument("--min-rounds", type=int, default=4, help="fewest timed rounds, whatever the budget")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (Triton compiles in the first)")
    p.add_argument("--budget-s", type=float, default=45.0, help="timing seconds per configuration (caps rounds)")
    p.add_argument("--breakdown-repeats", type=int, default=10, help="repeats per piece in the noise breakdown")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--quick", action="store_true", help="tiny Llama, 64-token micro-batches, 2 rounds (CPU smoke)")
    add_qlora_args(p)  # issue 25: the QLoRA configuration (block below)
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.seq, args.rounds, args.min_rounds, args.warmup = "llama-tiny", 32, 2, 2, 1
        args.tokens = [t for t in args.tokens if t <= 128] or [64]
        args.breakdown_repeats = 2
    if "lora" not in args.variants:
        args.variants = ["lora", *args.variants]
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        raise ValueError(f"device={args.device!r}; use cuda[:i] or cpu")
    bad = [t for t in args.tokens if t < 1 or t % args.seq]
    if bad or min(args.accum) < 1 or args.min_rounds < 1 or args.rounds < args.min_rounds:
        raise ValueError(f"tokens {args.tokens} must be positive multiples of seq={args.seq}; accum >= 1; "
                         f"1 <= min_rounds <= rounds")
    return args


def _summary(times: dict[str, dict]) -> dict[str, dict]:
    ref = times["lora"]["wall"]
    return {n: {"wall": timing.summarize(t["wall"]), "paired_ratio": timing.paired_ratio(t["wall"], ref),
                "paired_ci95": timing.paired_ratio_ci(t["wall"], ref)} for n, t in times.items()}


def run_config(args, model, spec, device, tokens: int, accum: int) -> dict:
    """Time and measure every variant at one (micro-batch tokens, micro-batches) configuration."""
    parts = token_batches(spec, tokens, args.seq, accum, args.seed + tokens + accum, device)
    total = args.warmup + args.rounds + 2
    steps, notes = build_gpu_steps(model, parts, variants=args.variants, total_steps=total, rho=args.rho,
                                   sam_rho=args.rho, seed=args.seed)
    counter = timing.StepCounter(list(steps), total)
    t0 = time.perf_counter()
    timing.run_rounds(steps, counter, rounds=0, warmup=1, device=device)  # compiles, allocator warm-up
    t1 = time.perf_counter()
    timing.run_rounds(steps, counter, rounds=0, warmup=max(0, args.warmup - 1), device=device)
    per_round = (time.perf_counter() - t1) / max(1, args.warmup - 1) if args.warmup > 1 else (t1 - t0)
    rounds = max(args.min_rounds, min(args.rounds, math.floor(args.budget_s / max(per_round, 1e-9))))
    times = timing.run_rounds(steps, counter, rounds=rounds, warmup=0, device=device)
    result = {"tokens": tokens, "accum": accum, "rounds": rounds, "round_s": per_round,
              "variants": _summary(times), "notes": notes}
    if device.type == "cuda":
        peaks = {v: memory.cuda_peak(lambda v=v: steps[v](counter.next(v)), device) for v in steps}
        for v, peak in peaks.items():
            result["variants"][v]["peak_bytes"] = peak
            result["variants"][v]["peak_ratio"] = peak / peaks["lora"]
    del steps, parts
    gc.collect()
    return result


def noise_breakdown(args, model, device) -> dict:
    """The noise of one micro-batch (2 ``W + E`` per layer: forward and backward) and the per-step row norms,
    timed alone per distinct layer shape, with each backend; bytes moved per weight element for reference."""
    flat = FlatLora(model, FlatLoraConfig(rho=args.rho, seed=args.seed), total_steps=10)
    out = {}
    for backend in ("auto", "torch"):
        with noise.use_backend(backend):
            w = flat.target_layers[0].base_weight()
            name = noise.backend_for(w.device, w.dtype)
            costs = breakdown.layer_costs(flat, 1, min(args.tokens), repeats=args.breakdown_repeats, device=device)
        if name in out:  # auto = torch here (CPU, or no triton)
            continue
        per = breakdown.per_step(costs)
        elements = sum(c["count"] * math.prod(c["shape"]) for c in costs)
        w_plus_e_ms = 1e3 * sum(c["count"] * c["seconds"]["exact_w_plus_e"] for c in costs)
        out[name] = {"layers": costs, "elements": elements, "w_plus_e_ms_per_pass": w_plus_e_ms,
                     "noise_ms_per_micro_batch": 2 * w_plus_e_ms, "norms_ms_per_step": per["flat-exact"]["norms"],
                     "matmuls_ms_per_micro_batch": per["matmuls"]["total"],
                     "ns_per_element": 1e6 * w_plus_e_ms / elements}
    return out


def bytes_per_element(dtype: torch.dtype) -> dict[str, int]:
    """Memory traffic of one ``W + E`` per weight element (exact mode, one draw).

    torch path (`flatlora.noise.filter_noise` then ``weight + e``): ``normal_`` writes fp32 (4), ``mul_`` by the
    row std reads and writes it (8), the cast to W's dtype reads fp32 and writes ``b`` (4 + b; skipped for fp32),
    ``W + e`` reads two and writes one (3b). Triton: reads W, writes W + E (2b).
    """
    b = torch.empty((), dtype=dtype).element_size()
    cast = 0 if dtype == torch.float32 else 4 + b
    return {"torch": 4 + 8 + cast + 3 * b, "triton": 2 * b}


# --- QLoRA configuration (issue 25): an NF4 base beside a dense one, LoRA vs Flat-LoRA exact -----------------
def add_qlora_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--qlora-hidden", type=int, default=4096, help="QLoRA config: width of its square layers "
                                                                  "(0: skip the QLoRA config)")
    p.add_argument("--qlora-layers", type=int, default=6, help="QLoRA config: LoRA layers in the stack")
    p.add_argument("--qlora-tokens", type=int, default=8192, help="QLoRA config: tokens per step")


def run_qlora(args, device: torch.device) -> dict | None:
    """`_bench.qlora.time_bases` on the GPU, compute in ``--dtype`` (``--quick``: 64-wide, 64 tokens); None
    when skipped (``--qlora-hidden 0``), a note when bitsandbytes is missing."""
    import importlib.util

    from _bench import qlora

    if args.qlora_hidden <= 0:
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        return {"skipped": "bitsandbytes is not installed (pip install bitsandbytes)"}
    hidden, tokens, layers = (64, 64, 2) if args.quick else (args.qlora_hidden, args.qlora_tokens, args.qlora_layers)
    return qlora.time_bases(hidden=hidden, layers=layers, tokens=tokens, rank=args.rank, rounds=args.rounds,
                            warmup=args.warmup, seed=args.seed, device=device, dtype=getattr(torch, args.dtype),
                            rho=args.rho)


def render_qlora(res: dict | None) -> list[str]:
    if not res:
        return []
    from _bench import qlora

    if "skipped" in res:
        return ["", f"QLoRA configuration skipped: {res['skipped']}"]
    return ["", f"QLoRA: {qlora.describe(res)}.", "", *qlora.table(res)]
# --- end of the QLoRA configuration block --------------------------------------------------------------------


def _meta(args, argv: list[str] | None, device: torch.device) -> dict:
    import peft
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"command": " ".join([".venv/bin/python benchmarks/gpu_overhead.py",
                                 *(sys.argv[1:] if argv is None else argv)]),
            "device": name, "torch": torch.__version__, "triton": triton_version,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def render(result: dict) -> str:
    m = result["meta"]
    lines = [f"# Flat-LoRA on {m['device']}: {result['model']['describe']}", "", f"`{m['command']}`", "",
             f"torch {m['torch']}, triton {m['triton']}, transformers {m['transformers']}, peft {m['peft']}; "
             f"{m['date']}; "
             f"{result['seconds']:.0f} s. {result['model']['params'] / 1e9:.2f}B parameters "
             f"({result['model']['trainable'] / 1e6:.1f}M trainable), {result['model']['targets']} perturbed layers, "
             f"base in {result['config']['dtype']}.", "",
             "Per optimizer step; `x LoRA` = median over rounds of (step / LoRA's step of the same round), 95% "
             "bootstrap interval; peak = torch.cuda.max_memory_allocated over one step.", "",
             "| micro-batch tokens | micro-batches | rounds | variant | step ms, median [IQR] | x LoRA [95% CI] | "
             "peak MiB | x LoRA |", "|---|---|---|---|---|---|---|---|"]
    for c in result["configs"]:
        for name, v in c["variants"].items():
            w, (lo, hi) = v["wall"], v["paired_ci95"]
            peak = v.get("peak_bytes")
            lines.append(f"| {c['tokens']} | {c['accum']} | {c['rounds']} | {name} | {w['median_ms']:.1f} "
                         f"[{w['q1_ms']:.1f}-{w['q3_ms']:.1f}] | {v['paired_ratio']:.3f} [{lo:.3f}-{hi:.3f}] | "
                         f"{'n/a' if peak is None else f'{peak / MIB:.0f}'} | "
                         f"{'n/a' if peak is None else format(v['peak_ratio'], '.3f')} |")
    lines += ["", "Noise alone (all perturbed layers, timed per shape; one micro-batch draws twice per layer):", "",
              "| backend | bytes / element / draw | W + E, all layers, ms | ns / element | noise ms / micro-batch | "
              "row norms ms / step | base matmuls ms / micro-batch |", "|---|---|---|---|---|---|---|"]
    for name, b in result["breakdown"].items():
        lines.append(f"| {name} | {result['bytes_per_element'][name]} | {b['w_plus_e_ms_per_pass']:.2f} | "
                     f"{b['ns_per_element']:.4f} | {b['noise_ms_per_micro_batch']:.2f} | "
                     f"{b['norms_ms_per_step']:.2f} | "
                     f"{b['matmuls_ms_per_micro_batch']:.2f} |")
    lines += ["", *[f"- {k}: {v}" for k, v in result["configs"][0]["notes"].items()]]
    lines += render_qlora(result.get("qlora"))  # issue 25
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={args.device!r} but torch.cuda.is_available() is False; use --device cpu")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    start = time.perf_counter()
    spec = LLAMA_PRESETS[args.model]
    dtype = getattr(torch, args.dtype)
    model = build_llama(spec, rank=args.rank, seed=args.seed, device=device, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    targets = len(FlatLora(model, FlatLoraConfig(rho=args.rho), total_steps=1).targets)
    result = {"meta": _meta(args, argv, device), "config": vars(args),
              "model": {"name": spec.name, "describe": spec.describe(), "params": params, "trainable": trainable,
                        "targets": targets},
              "bytes_per_element": bytes_per_element(dtype), "configs": []}
    for tokens in args.tokens:
        for accum in args.accum:
            result["configs"].append(run_config(args, model, spec, device, tokens, accum))
            print(f"done: {tokens} tokens x {accum}", file=sys.stderr, flush=True)
    result["breakdown"] = noise_breakdown(args, model, device)
    result["qlora"] = run_qlora(args, device)  # issue 25
    result["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu-overhead-{device.type}" + ("-quick" if args.quick else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
