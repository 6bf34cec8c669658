"""Flat-LoRA's cost against LoRA, LoRA-SAM and the peers (Bi-LoRA, EFlat-LoRA, ALoRA's gated super-network and
its reallocation rounds): per-step time, peak memory, where the time goes, scaling; and a QLoRA configuration (an
NF4 base beside a dense one, ``_bench/qlora.py``).

    .venv/bin/python benchmarks/overhead.py              # full run (CPU: tens of minutes on 2 cores)
    .venv/bin/python benchmarks/overhead.py --quick      # seconds: tiny models, for smoke tests
    .venv/bin/python benchmarks/overhead.py --device cuda --models minilm wide

Writes ``overhead-<device>[-quick].json`` (every sample's summary, the configuration, versions, machine
load) and the same tables as Markdown to ``--out`` (default ``benchmarks/results``). All variants of one
model share the model, batch, seed and optimizer and run interleaved in this one process (see
``_bench/timing.py``); peak memory is explained in ``_bench/memory.py``, the breakdown in
``_bench/breakdown.py``. Every field of ``_bench/config.py:BenchConfig`` is a flag (``--help``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from flatlora import FlatLora, FlatLoraConfig  # noqa: E402
from flatlora import _dataclass_io as dio  # noqa: E402

from _bench import breakdown, memory, qlora, report, timing  # noqa: E402
from _bench.config import BenchConfig  # noqa: E402
from _bench.models import PRESETS, ModelSpec, build_model, count_params, make_batch, sweep_spec  # noqa: E402
from _bench.variants import build_steps, time_alora_round  # noqa: E402

MEMORY_STEPS = 1  # extra steps per variant measured for memory
RSS_STEPS = (2, 2)  # RSS worker: warm-up steps, then measured steps


def _variants(cfg: BenchConfig) -> tuple[list[str], dict[str, str]]:
    if cfg.dtype != "float32" and "flat-inplace" in cfg.variants:
        return ([v for v in cfg.variants if v != "flat-inplace"],
                {"flat-inplace": f"skipped: mode='inplace' needs float32 base weights, not {cfg.dtype}"})
    return list(cfg.variants), {}


def _setup(cfg: BenchConfig, spec: ModelSpec, variants: list[str], total_steps: int):
    device = torch.device(cfg.device)
    model = build_model(spec, rank=cfg.rank, seed=cfg.seed, device=device, dtype=cfg.torch_dtype())
    batch = make_batch(spec, cfg.batch, cfg.seq, cfg.seed + 1, device)

    def make(rank: int):  # the variants with their own model (bi-lora, alora)
        return build_model(spec, rank=rank, seed=cfg.seed, device=device, dtype=cfg.torch_dtype())

    steps, notes, opt = build_steps(model, batch, variants=variants, total_steps=total_steps, rho=cfg.rho,
                                    sam_rho=cfg.sam_rho, seed=cfg.seed, rank=cfg.rank, make_model=make)
    return device, model, steps, notes, opt


def _timed(times: dict[str, dict]) -> dict[str, dict]:
    ref = times["lora"]
    out = {}
    for name, t in times.items():
        wall, cpu = timing.summarize(t["wall"]), timing.summarize(t["cpu"])
        rw, rc = timing.summarize(ref["wall"]), timing.summarize(ref["cpu"])
        out[name] = {"wall": wall, "cpu": cpu, "ratio_wall": wall["median_ms"] / rw["median_ms"],
                     "ratio_cpu": cpu["median_ms"] / rc["median_ms"],
                     "paired_ratio_wall": timing.paired_ratio(t["wall"], ref["wall"]),
                     "paired_ratio_cpu": timing.paired_ratio(t["cpu"], ref["cpu"]),
                     "paired_ci95_wall": timing.paired_ratio_ci(t["wall"], ref["wall"]),
                     "paired_ci95_cpu": timing.paired_ratio_ci(t["cpu"], ref["cpu"])}
    return out


def _progress(desc: str, total: int, quiet: bool):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, disable=quiet, leave=False, file=sys.stderr)
    return bar, (lambda _msg: bar.update(1))


def run_model(cfg: BenchConfig, name: str, *, quiet: bool) -> dict:
    spec = PRESETS[name]
    rounds = cfg.rounds_for(name)
    variants, skipped = _variants(cfg)
    total = cfg.warmup + rounds + MEMORY_STEPS + 1
    device, model, steps, notes, opt = _setup(cfg, spec, variants, total)
    notes.update(skipped)
    counter = timing.StepCounter(variants, total)
    bar, progress = _progress(name, cfg.warmup + rounds, quiet)
    times = timing.run_rounds(steps, counter, rounds=rounds, warmup=cfg.warmup, device=device, progress=progress)
    bar.close()
    params, trainable = count_params(model)
    flat = FlatLora(model, FlatLoraConfig(rho=cfg.rho, seed=cfg.seed), total_steps=total)
    result = {"name": name, "describe": spec.describe(), "params": params, "trainable": trainable,
              "targets": len(flat.targets), "rounds": rounds, "warmup": cfg.warmup,
              "variants": _timed(times), "notes": notes}
    if cfg.memory:
        result["memory"] = _memory(cfg, name, steps, counter, model, opt, device, variants)
    if "alora" in steps:  # after the memory step: a round changes the gates of the alora model
        batch = make_batch(spec, cfg.batch, cfg.seq, cfg.seed + 1, device)
        rnd = time_alora_round(steps["alora"], batch, repeats=1 if cfg.quick else 2)
        rnd["lora_steps"] = 1e3 * rnd["seconds"] / result["variants"]["lora"]["wall"]["median_ms"]
        result["alora_round"] = rnd
    if cfg.breakdown:
        costs = breakdown.layer_costs(flat, total, cfg.batch * cfg.seq, repeats=cfg.breakdown_repeats,
                                      device=device)
        lora = result["variants"]["lora"]
        extra = {v: {k: result["variants"][v][k]["median_ms"] - lora[k]["median_ms"] for k in ("wall", "cpu")}
                 for v in ("flat-exact", "flat-inplace") if v in result["variants"]}
        result["breakdown"] = {"layers": costs, "per_step_ms": breakdown.per_step(costs),
                               "measured_extra_ms": extra}
    del model, steps, opt, flat
    gc.collect()
    return result


def _memory(cfg: BenchConfig, name: str, steps, counter, model, opt, device, variants) -> dict:
    out: dict[str, dict] = {}
    for v in variants:
        step = lambda v=v: steps[v](counter.next(v))  # noqa: E731
        if device.type == "cuda":
            out[v] = {"tensor_peak_bytes": memory.cuda_peak(step, device)}
        else:
            own_model, own_opt = getattr(steps[v], "held_by", (model, opt))
            held = memory.held_bytes(own_model, [own_opt])
            peak = memory.cpu_step_peak(step)
            out[v] = {"tensor_peak_bytes": None if peak is None else held + peak, "held_bytes": held}
    if device.type == "cpu" and cfg.rss:
        args = ["--rss-model", name, "--rss-config", json.dumps(dio.to_dict(cfg))]
        for v in variants:
            got = memory.rss_in_fresh_process(str(Path(__file__).resolve()), args, v, timeout=3600,
                                              mmap_threshold=cfg.rss_mmap_threshold)
            out[v]["rss_peak_bytes"] = got.get("hwm_bytes")
            if "error" in got:
                out[v]["rss_error"] = got["error"]
    for key in ("tensor", "rss"):
        ref = out["lora"].get(f"{key}_peak_bytes")
        for v in variants:
            val = out[v].get(f"{key}_peak_bytes")
            out[v][f"{key}_ratio"] = None if (val is None or not ref) else val / ref
    return out


def run_sweep(cfg: BenchConfig, *, quiet: bool) -> list[dict]:
    rows = []
    for hidden in cfg.sweep_hidden:
        spec = sweep_spec(hidden, cfg.sweep_layers, cfg.sweep_vocab)
        variants = ["lora", "flat-exact"]
        total = cfg.warmup + cfg.sweep_rounds + 1
        device, model, steps, _, opt = _setup(cfg, spec, variants, total)
        counter = timing.StepCounter(variants, total)
        bar, progress = _progress(spec.name, cfg.warmup + cfg.sweep_rounds, quiet)
        times = timing.run_rounds(steps, counter, rounds=cfg.sweep_rounds, warmup=cfg.warmup, device=device,
                                  progress=progress)
        bar.close()
        flat = FlatLora(model, FlatLoraConfig(rho=cfg.rho, seed=cfg.seed), total_steps=total)
        costs = breakdown.layer_costs(flat, total, cfg.batch * cfg.seq, repeats=cfg.breakdown_repeats,
                                      device=device)
        q = next(c for c in costs if c["shape"] == [hidden, hidden])["seconds"]
        t = _timed(times)
        rows.append({"hidden": hidden, "layers": cfg.sweep_layers, "params": count_params(model)[0],
                     "tokens": cfg.batch * cfg.seq, "lora_ms": t["lora"]["wall"]["median_ms"],
                     "flat_ms": t["flat-exact"]["wall"]["median_ms"], "ratio_wall": t["flat-exact"]["ratio_wall"],
                     "ratio_cpu": t["flat-exact"]["ratio_cpu"], "paired_ratio_cpu": t["flat-exact"]["paired_ratio_cpu"],
                     "noise_ms": 2e3 * q["exact_w_plus_e"],
                     "draw_ms": 2e3 * q["draw"], "matmul_ms": 1e3 * q["matmuls"], "timing": t})
        del model, steps, opt, flat
        gc.collect()
    return rows


def run_qlora(cfg: BenchConfig, *, quiet: bool) -> dict:
    """The QLoRA configuration (`_bench.qlora`): both bases' Flat-LoRA / LoRA ratios from the same rounds."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return {"skipped": "bitsandbytes is not installed (pip install bitsandbytes)"}
    bar, progress = _progress("qlora", cfg.warmup + cfg.qlora_rounds, quiet)
    res = qlora.time_bases(hidden=cfg.qlora_hidden, layers=cfg.qlora_layers, tokens=cfg.qlora_tokens, rank=cfg.rank,
                           rounds=cfg.qlora_rounds, warmup=cfg.warmup, seed=cfg.seed, device=torch.device(cfg.device),
                           dtype=cfg.torch_dtype(), rho=cfg.rho, progress=progress)
    bar.close()
    gc.collect()
    return res


def rss_worker(variant: str, model_name: str, cfg: BenchConfig) -> dict:
    """Fresh-process RSS high-water mark of ``variant``'s steps (see `_bench.memory`)."""
    warm, measured = RSS_STEPS
    _, _, steps, _, _ = _setup(cfg, PRESETS[model_name], [variant], warm + measured)
    for t in range(1, warm + 1):
        steps[variant](t)
    reset = memory.reset_hwm()
    for t in range(warm + 1, warm + measured + 1):
        steps[variant](t)
    return {"variant": variant, "hwm_bytes": memory.read_hwm_bytes(), "reset": reset}


def _meta(cfg: BenchConfig, command: str) -> dict:
    import peft
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    device = torch.device(cfg.device)
    if device.type == "cuda":
        cpu = f"{torch.cuda.get_device_name(device)} (host: {cpu})"
    return {"command": command, "device": cfg.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "python": platform.python_version(),
            "cpu": f"{cpu}, {os.cpu_count()} logical CPUs", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "loadavg_start": _loadavg()}


def _loadavg() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def parse_config(argv: list[str] | None) -> tuple[BenchConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    dio.add_arguments(parser, BenchConfig)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--rss-worker", metavar="VARIANT", help=argparse.SUPPRESS)
    parser.add_argument("--rss-model", help=argparse.SUPPRESS)
    parser.add_argument("--rss-config", help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.rss_config:
        return dio.from_dict(BenchConfig, json.loads(ns.rss_config)), ns
    over = dio.overrides(ns, BenchConfig)
    base = BenchConfig(quick=True).quick_sizes() if over.get("quick") else BenchConfig()
    return dataclasses.replace(base, **over), ns


def main(argv: list[str] | None = None) -> int:
    cfg, ns = parse_config(argv)
    from transformers.utils import logging as hf_logging

    threads, verbosity = torch.get_num_threads(), hf_logging.get_verbosity()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():  # PEFT 0.21 + transformers 5 deprecation chatter at get_peft_model
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return _run(cfg, ns, argv)
    finally:  # leave a calling process (a test) as it was
        torch.set_num_threads(threads)
        hf_logging.set_verbosity(verbosity)


def _run(cfg: BenchConfig, ns: argparse.Namespace, argv: list[str] | None) -> int:
    if ns.rss_worker:
        print(json.dumps(rss_worker(ns.rss_worker, ns.rss_model, cfg)))
        return 0
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device!r} but torch.cuda.is_available() is False; use --device cpu")
    args = sys.argv[1:] if argv is None else list(argv)
    command = " ".join([".venv/bin/python benchmarks/overhead.py", *args]).strip()
    start = time.perf_counter()
    result = {"meta": _meta(cfg, command), "config": dio.to_dict(cfg)}
    result["models"] = [run_model(cfg, name, quiet=ns.quiet) for name in cfg.models]
    result["sweep"] = run_sweep(cfg, quiet=ns.quiet) if cfg.sweep_hidden else []
    if cfg.qlora:
        result["qlora"] = run_qlora(cfg, quiet=ns.quiet)
    result["memory_method"] = (
        "torch.cuda.max_memory_allocated over one step (reset before it)." if cfg.device.startswith("cuda") else
        "peak tensor = bytes held before the step (parameters, buffers, optimizer state) + peak of the bytes "
        "allocated during one step (torch profiler memory timeline); peak RSS = VmHWM of a fresh process per "
        "variant, reset after 2 warm-up steps, over 2 steps (includes ~0.5 GB of interpreter and libraries; "
        f"MALLOC_MMAP_THRESHOLD_={cfg.rss_mmap_threshold})"
        + ("" if cfg.rss else " - not measured in this run (--no-rss)") + ".")
    result["meta"]["loadavg_end"] = _loadavg()
    result["meta"]["seconds"] = time.perf_counter() - start
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"overhead-{torch.device(cfg.device).type}" + ("-quick" if cfg.quick else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(report.render(result))
    print(report.render(result))
    print(f"wrote {out / stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
