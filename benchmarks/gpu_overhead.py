"""Flat-LoRA's step time and peak memory against LoRA and LoRA-SAM on a GPU, with the Triton noise kernel.

    python benchmarks/gpu_overhead.py                      # the GPU run (benchmarks/gpu_check.sh runs it)
    python benchmarks/gpu_overhead.py --device cpu --quick # smoke run on CPU (tiny Llama, seconds)

Configurations (``--configs``, run in the order given, the most important first): ``TOKENSxACCUM[+ckpt]`` =
micro-batch tokens x micro-batches per optimizer step, ``+ckpt`` with gradient checkpointing (non-reentrant).
The first default, ``2048x8+ckpt``, is the Llama recipe's own setting. For each, the variants of
``_bench/llama.py`` (LoRA, Flat-LoRA exact with the default noise backend, the same with torch's generator,
LoRA-SAM) share one model, one set of micro-batches and one AdamW, and run in interleaved rounds
(``_bench/timing.py``: a seeded random order per round, device synchronised around each step); step-time ratios
to LoRA are paired per round with 95% bootstrap intervals. The first (untimed) round counts each variant's
draws of ``E`` and the generator that made them (``_bench/draws.py``): exact mode draws per layer once in
forward and once in backward per micro-batch, plus once in checkpointing's recomputed forward. Rounds are
capped by ``--budget-s`` per configuration and by ``--deadline-s`` for the whole run (a configuration that
would not fit is skipped and listed). Peak memory: ``torch.cuda.max_memory_allocated`` over one step per
variant. The breakdown, after the first configuration, times the noise alone on the model's own layer shapes
with each backend (`_bench/breakdown.py`).

On CUDA the run refuses (exit 1, before timing anything) unless the default noise backend is the Triton kernel
(``--kernel optional`` allows torch's generator). ``gpu-overhead-<device>[-quick].json`` and ``.md`` are
written to ``--out`` after every configuration, so an interrupted run leaves what it measured (``status``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from flatlora import FlatLora, FlatLoraConfig, noise  # noqa: E402

from _bench import breakdown, memory, timing  # noqa: E402
from _bench.draws import count_draws  # noqa: E402
from _bench.llama import GPU_VARIANTS, LLAMA_PRESETS, build_gpu_steps, build_llama, token_batches  # noqa: E402

MIB = 1024 * 1024
DEFAULT_CONFIGS = ["2048x8+ckpt", "2048x1", "8192x1", "8192x4"]
_CONFIG = re.compile(r"(\d+)x(\d+)(\+ckpt)?")


def parse_config(text: str) -> tuple[int, int, bool]:
    """``"2048x8+ckpt"`` -> (2048 tokens per micro-batch, 8 micro-batches per step, gradient checkpointing)."""
    match = _CONFIG.fullmatch(text)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise ValueError(f"configuration {text!r}; write TOKENSxACCUM[+ckpt], e.g. 2048x8+ckpt")
    return int(match[1]), int(match[2]), bool(match[3])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda[:i] (the benchmark) or cpu (smoke runs)")
    p.add_argument("--model", default="llama-1b", choices=sorted(LLAMA_PRESETS))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                   help="TOKENSxACCUM[+ckpt]: tokens per micro-batch x micro-batches per step, +ckpt = gradient "
                        "checkpointing; run in this order")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--variants", nargs="+", default=list(GPU_VARIANTS), choices=list(GPU_VARIANTS))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--rounds", type=int, default=12, help="most timed rounds per configuration")
    p.add_argument("--min-rounds", type=int, default=4, help="fewest timed rounds, whatever the budget")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (Triton compiles in the first)")
    p.add_argument("--budget-s", type=float, default=45.0, help="timing seconds per configuration (caps rounds)")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="seconds for the whole run from its start: no configuration is started that would not fit")
    p.add_argument("--kernel", default="auto", choices=["auto", "required", "optional"],
                   help="whether the Triton kernel must draw the noise (auto: required on CUDA); optional allows "
                        "torch's generator as the default backend")
    p.add_argument("--breakdown-repeats", type=int, default=10, help="repeats per piece in the noise breakdown")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--quick", action="store_true", help="tiny Llama, 64-token micro-batches, 2 rounds (CPU smoke)")
    add_qlora_args(p)  # issue 25: the QLoRA configuration (block below)
    args = p.parse_args(argv)
    configs = [parse_config(c) for c in args.configs]
    if args.quick:
        args.model, args.seq, args.rounds, args.min_rounds, args.warmup = "llama-tiny", 32, 2, 2, 1
        configs = list(dict.fromkeys((64, accum, ckpt) for _, accum, ckpt in configs))
        args.breakdown_repeats = 2
    args.configs = configs
    if "lora" not in args.variants:
        args.variants = ["lora", *args.variants]
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        raise ValueError(f"device={args.device!r}; use cuda[:i] or cpu")
    bad = [t for t, _, _ in configs if t % args.seq]
    if bad or args.min_rounds < 1 or args.rounds < args.min_rounds:
        raise ValueError(f"micro-batch tokens {bad} must be multiples of seq={args.seq}; 1 <= min_rounds <= rounds")
    if args.kernel == "auto":
        args.kernel = "required" if args.device.startswith("cuda") else "optional"
    return args


def _summary(times: dict[str, dict]) -> dict[str, dict]:
    ref = times["lora"]["wall"]
    return {n: {"wall": timing.summarize(t["wall"]), "paired_ratio": timing.paired_ratio(t["wall"], ref),
                "paired_ci95": timing.paired_ratio_ci(t["wall"], ref)} for n, t in times.items()}


def set_checkpointing(model, on: bool) -> None:
    """Gradient checkpointing of the Llama's decoder layers (non-reentrant: frozen inputs need no grad);
    transformers 5 names it activation checkpointing, older versions gradient checkpointing."""
    base = model.get_base_model()
    name = "activation" if hasattr(base, "activation_checkpointing_enable") else "gradient"
    if on:
        getattr(base, f"{name}_checkpointing_enable")({"use_reentrant": False})
    else:
        getattr(base, f"{name}_checkpointing_disable")()


def run_config(args, model, spec, device, config: tuple[int, int, bool], layers: int,
               seconds_left: float = math.inf) -> dict:
    """Time and measure every variant at one (micro-batch tokens, micro-batches, checkpointing) configuration.

    The first round (untimed) counts each variant's draws (``per_layer``: draws / ``layers`` perturbed layers);
    ``seconds_left`` caps the timed rounds (never below ``--min-rounds``)."""
    tokens, accum, ckpt = config
    set_checkpointing(model, ckpt)
    parts = token_batches(spec, tokens, args.seq, accum, args.seed + tokens + accum, device)
    total = args.warmup + args.rounds + 2
    steps, notes = build_gpu_steps(model, parts, variants=args.variants, total_steps=total, rho=args.rho,
                                   sam_rho=args.rho, seed=args.seed)
    counter = timing.StepCounter(list(steps), total)
    t0 = time.perf_counter()
    draws = {}
    for v in steps:  # the first round: compiles, allocator warm-up, and the draws of one step
        with count_draws() as count:
            steps[v](counter.next(v))
        draws[v] = {"total": count.total, "per_layer": count.total / layers, "backends": dict(count.backends)}
    timing.synchronize(device)
    t1 = time.perf_counter()
    timing.run_rounds(steps, counter, rounds=0, warmup=max(0, args.warmup - 1), device=device)
    per_round = (time.perf_counter() - t1) / max(1, args.warmup - 1) if args.warmup > 1 else (t1 - t0)
    fit = min(args.budget_s, 0.8 * seconds_left) / max(per_round, 1e-9)
    rounds = max(args.min_rounds, min(args.rounds, math.floor(fit)))
    times = timing.run_rounds(steps, counter, rounds=rounds, warmup=0, device=device)
    result = {"tokens": tokens, "accum": accum, "checkpointing": ckpt, "rounds": rounds, "round_s": per_round,
              "layers": layers, "variants": _summary(times), "notes": notes}
    for v, d in draws.items():
        result["variants"][v]["draws"] = d
    if device.type == "cuda":
        peaks = {v: memory.cuda_peak(lambda v=v: steps[v](counter.next(v)), device) for v in steps}
        for v, peak in peaks.items():
            result["variants"][v]["peak_bytes"] = peak
            result["variants"][v]["peak_ratio"] = peak / peaks["lora"]
    del steps, parts
    gc.collect()
    return result


def noise_breakdown(args, model, device) -> dict:
    """One ``W + E`` of every perturbed layer (a step draws it `draws / step` times) and the per-step row norms,
    timed alone per distinct layer shape, with each backend; the base matmuls of the smallest micro-batch."""
    flat = FlatLora(model, FlatLoraConfig(rho=args.rho, seed=args.seed), total_steps=10)
    out, tokens = {}, min(t for t, _, _ in args.configs)
    for backend in ("auto", "torch"):
        with noise.use_backend(backend):
            w = flat.target_layers[0].base_weight()
            name = noise.backend_for(w.device, w.dtype)
            costs = breakdown.layer_costs(flat, 1, tokens, repeats=args.breakdown_repeats, device=device)
        if name in out:  # auto = torch here (CPU, or no triton)
            continue
        per = breakdown.per_step(costs)
        elements = sum(c["count"] * math.prod(c["shape"]) for c in costs)
        w_plus_e_ms = 1e3 * sum(c["count"] * c["seconds"]["exact_w_plus_e"] for c in costs)
        out[name] = {"layers": costs, "elements": elements, "w_plus_e_ms_per_pass": w_plus_e_ms,
                     "norms_ms_per_step": per["flat-exact"]["norms"],
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
    """What ran: the interpreter, the command, the package versions and the device."""
    import peft
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine() or "cpu"
    return {"command": " ".join([sys.executable, "benchmarks/gpu_overhead.py",
                                 *(sys.argv[1:] if argv is None else argv)]),
            "python": sys.executable, "python_version": platform.python_version(),
            "device": name, "cuda": torch.version.cuda if device.type == "cuda" else None,
            "torch": torch.__version__, "triton": triton_version,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def check_kernel(device: torch.device, dtype: torch.dtype, required: bool) -> tuple[str, str | None]:
    """The default noise backend for the model's weights (probing the kernel on CUDA) and, when the kernel is
    ``required`` but torch's generator would draw, why: the probe's warning, or that this device has none."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend = noise.backend_for(device, dtype)
    if backend == "triton" or not required:
        return backend, None
    why = "; ".join(str(w.message) for w in caught) or f"noise backend {backend!r} on {device.type}"
    return backend, (f"the Triton noise kernel does not draw on {device} ({why}): flat-exact would time torch's "
                     f"generator; fix the kernel, or pass --kernel optional to measure the fallback")


def render(result: dict) -> str:
    m = result["meta"]
    model = result.get("model")
    lines = [f"# Flat-LoRA on {m['device']}" + (f": {model['describe']}" if model else ""), "",
             f"`{m['command']}`", "",
             f"status: **{result['status']}**" + (f": {result['error']}" if result.get("error") else ""), "",
             f"python {m['python_version']} ({m['python']}); torch {m['torch']} (CUDA {m['cuda']}), triton "
             f"{m['triton']}, transformers {m['transformers']}, peft {m['peft']}; {m['date']}; "
             f"{result['seconds']:.0f} s; default noise backend {result['backend']!r}."]
    if model:
        lines += ["", f"{model['params'] / 1e9:.2f}B parameters ({model['trainable'] / 1e6:.1f}M trainable), "
                      f"{model['targets']} perturbed layers, base in {result['config']['dtype']}."]
    if result["configs"]:
        lines += ["", "Per optimizer step; `x LoRA` = median over rounds of (step / LoRA's step of the same round), "
                      "95% bootstrap interval; draws = draws of `E` per perturbed layer in one step (counted) and the "
                      "generator that made them; peak = torch.cuda.max_memory_allocated over one step.", "",
                  "| micro-batch tokens | micro-batches | checkpointing | rounds | variant | draws / step | backend | "
                  "step ms, median [IQR] | x LoRA [95% CI] | peak MiB | x LoRA |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["configs"]:
        for name, v in c["variants"].items():
            w, (lo, hi) = v["wall"], v["paired_ci95"]
            peak, d = v.get("peak_bytes"), v["draws"]
            mixed = len(d["backends"]) > 1  # one generator should draw them all: else say how many each
            backend = ", ".join(f"{k} {n}" if mixed else k for k, n in d["backends"].items()) or "-"
            lines.append(f"| {c['tokens']} | {c['accum']} | {'on' if c['checkpointing'] else 'off'} | {c['rounds']} "
                         f"| {name} | {d['per_layer']:.2f} | {backend} | {w['median_ms']:.1f} "
                         f"[{w['q1_ms']:.1f}-{w['q3_ms']:.1f}] | {v['paired_ratio']:.3f} [{lo:.3f}-{hi:.3f}] | "
                         f"{'n/a' if peak is None else f'{peak / MIB:.0f}'} | "
                         f"{'n/a' if peak is None else format(v['peak_ratio'], '.3f')} |")
    if result.get("skipped"):
        lines += ["", "Not run (deadline): " + ", ".join(result["skipped"])]
    if result.get("breakdown"):
        lines += ["", "Noise alone (all perturbed layers, timed per shape; `W + E, all layers` = one draw of every "
                      "layer):", "",
                  "| backend | bytes / element / draw | W + E, all layers, ms | ns / element | row norms ms / step | "
                  "base matmuls ms / micro-batch |", "|---|---|---|---|---|---|"]
        for name, b in result["breakdown"].items():
            lines.append(f"| {name} | {result['bytes_per_element'][name]} | {b['w_plus_e_ms_per_pass']:.2f} | "
                         f"{b['ns_per_element']:.4f} | {b['norms_ms_per_step']:.2f} | "
                         f"{b['matmuls_ms_per_micro_batch']:.2f} |")
        lines += ["", "The noise of a step, from these: draws / step x `W + E, all layers` (its backend), against "
                      "LoRA's step:", ""]
        for c in result["configs"]:
            lora = c["variants"]["lora"]["wall"]["median_ms"]
            for name, v in c["variants"].items():
                d = v["draws"]
                if not d["total"] or len(d["backends"]) != 1 or next(iter(d["backends"])) not in result["breakdown"]:
                    continue
                ms = d["per_layer"] * result["breakdown"][next(iter(d["backends"]))]["w_plus_e_ms_per_pass"]
                lines.append(f"- {c['tokens']} x {c['accum']}{' +ckpt' if c['checkpointing'] else ''}, {name}: "
                             f"{d['per_layer']:.2f} x = {ms:.1f} ms of LoRA's {lora:.1f} ms step "
                             f"({100 * ms / lora:.1f}%)")
    if result["configs"]:
        lines += ["", *[f"- {k}: {v}" for k, v in result["configs"][0]["notes"].items()]]
    lines += render_qlora(result.get("qlora"))  # issue 25
    return "\n".join(lines) + "\n"


def _write(result: dict, out: Path, stem: str, start: float) -> None:
    """Write the JSON and Markdown as they stand (after every configuration: a killed run keeps them)."""
    result["seconds"] = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=1) + "\n"), (".md", render(result))):
        tmp = out / f"{stem}{suffix}.tmp"
        tmp.write_text(text)
        tmp.replace(out / f"{stem}{suffix}")  # whole files only, even if killed while writing


def _log(msg: str) -> None:
    print(f"gpu_overhead: {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    try:
        args = parse_args(argv)
    except ValueError as exc:
        print(f"gpu_overhead: {exc}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_overhead: device={args.device!r} but torch.cuda.is_available() is False; use --device cpu",
              file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    dtype = getattr(torch, args.dtype)
    out, stem = Path(args.out), f"gpu-overhead-{device.type}" + ("-quick" if args.quick else "")
    backend, refusal = check_kernel(device, dtype, args.kernel == "required")
    result = {"meta": _meta(args, argv, device), "config": {**vars(args), "configs": [list(c) for c in args.configs]},
              "status": "running", "backend": backend, "bytes_per_element": bytes_per_element(dtype), "configs": []}
    if refusal:
        result.update(status="refused", error=refusal)
        _write(result, out, stem, start)
        _log(refusal)
        return 1
    _log(f"noise backend {backend!r}; {result['meta']['device']}, torch {torch.__version__}, {sys.executable}")
    spec = LLAMA_PRESETS[args.model]
    model = build_llama(spec, rank=args.rank, seed=args.seed, device=device, dtype=dtype)
    targets = len(FlatLora(model, FlatLoraConfig(rho=args.rho), total_steps=1).targets)
    result["model"] = {"name": spec.name, "describe": spec.describe(), "targets": targets,
                       "params": sum(p.numel() for p in model.parameters()),
                       "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    deadline = math.inf if args.deadline_s is None else start + args.deadline_s
    result["skipped"], last = [], None
    for i, config in enumerate(args.configs):
        tokens, accum, ckpt = config
        label = f"{tokens}x{accum}{'+ckpt' if ckpt else ''}"
        left = deadline - time.perf_counter()
        if last is not None:  # the last configuration's round, scaled by tokens per step, for warm-up + min rounds
            scale = tokens * accum / (last["tokens"] * last["accum"])
            need = (args.warmup + args.min_rounds) * last["round_s"] * scale
            if need > left:
                result["skipped"].append(label)
                _log(f"skipped {label}: ~{need:.0f} s needed, {left:.0f} s left")
                continue
        last = run_config(args, model, spec, device, config, targets, left)
        result["configs"].append(last)
        _log(f"done {label}: {last['rounds']} rounds; " + ", ".join(
            f"{v} x{r['paired_ratio']:.3f} LoRA ({r['draws']['per_layer']:.2f} draws/step)"
            for v, r in last["variants"].items() if v != "lora"))
        _write(result, out, stem, start)
        if i == 0 and time.perf_counter() < deadline:
            result["breakdown"] = noise_breakdown(args, model, device)
            _write(result, out, stem, start)
    if time.perf_counter() < deadline:  # issue 25's QLoRA configuration last: a cap cuts it before the rest
        result["qlora"] = run_qlora(args, device)
        _write(result, out, stem, start)
    else:
        result["skipped"].append("qlora")
    result["status"] = "complete" if not result["skipped"] else "deadline"
    _write(result, out, stem, start)
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
