"""What each speed lever of the noise path is worth: interleaved micro-benchmarks on real layer shapes.

    .venv/bin/python benchmarks/levers.py --threads 1        # writes benchmarks/results/levers-cpu.{json,md}

Candidates run interleaved (a seeded random order per repeat) in one process; medians of ``--repeats`` calls.
Per-call time uses the process's CPU clock with one torch thread (robust on a shared machine) and the wall
clock otherwise (with several threads the CPU clock would count the parallel streams' work twice). Levers:

* ``blocked draw``: ``W + E`` drawn, scaled and added in cache-sized row blocks continuing one generator
  (`flatlora.noise.add_filter_noise`), against flatlora's first one-piece ``randn -> mul_ -> W + E`` (three
  passes and a full ``E`` buffer). Adopted.
* ``parallel streams``: the rows cut into independent ranges with their own seeds, drawn by
  ``torch.get_num_threads()`` threads (torch's CPU generator is sequential), timed alone and, with
  ``--in-step-rounds``, inside real Flat-LoRA steps (the noise time of a step with either draw, steps
  alternating). Adopted for one commit, then dropped: faster alone, not inside a step.
* ``fused add``: ``torch.addcmul(W, z, s)`` (one pass, but FMA rounding: ``W + E`` no longer equals adding
  the materialised ``E``, which the in-place mode subtracts). Measured only.
* ``draw in the weight's dtype``: bf16 ``randn`` against fp32 ``randn`` + cast (the former changes the
  stream per dtype, breaking "same E in every dtype"). Measured only.
* ``row norms``: merged weight + norms (once per step per layer) through PEFT's delta (``(B @ A) * s``,
  then added) against one ``addmm`` (now, `flatlora.targets.Target.merged_weight`), and norms of the base
  weight alone (a lower bound for any cheaper formula).
* ``micro-batches``: a step of 4 micro-batches of 8 sequences: exact regenerates ``E`` per micro-batch
  (2 draws each), in-place draws twice per step; plus Flat-LoRA at ``t = 0`` (``sigma = 0``: no work).
* issue 15, ``--hash-draw``: a counter-based draw fused and vectorised by ``torch.compile``
  (``_bench/hash_draw.py``). Measured only: slower than torch's generator here.
* issue 15, ``--one-draw-rounds``: inside real steps of BERT 6x384 with LoRA on all linear layers and of
  EfficientNet-Lite0 with LoRA on its 1x1 convs (``_bench/one_draw.py``): the default two draws per layer
  and micro-batch against ``NoiseSpec(keep=True)`` (forward's ``W + E`` kept for backward). An opt-in.
* issue 22, ``--inductor-draw``: the GPU kernel's Philox draw compiled for CPU by inductor (noise backend
  ``"inductor"``, `flatlora._cpu_philox`): ``W + E`` alone (micro) and, with ``--one-draw-rounds``, inside the
  same real steps as a fourth variant, paired against torch's generator.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from flatlora import FlatLora, FlatLoraConfig, _cpu_philox  # noqa: E402
import flatlora.noise as noise  # noqa: E402
from flatlora.noise import add_filter_noise, row_scale  # noqa: E402

from _bench import hash_draw as hash_draw_mod  # noqa: E402
from _bench import one_draw, timing  # noqa: E402
from _bench.models import PRESETS, build_model, make_batch  # noqa: E402


def _interleaved(cands: dict, repeats: int, clock) -> dict[str, float]:
    names = list(cands)
    for fn in cands.values():
        fn()
    res = {n: [] for n in names}
    for order in timing.round_orders(names, repeats):
        for n in order:
            t0 = clock()
            cands[n]()
            res[n].append(clock() - t0)
    return {n: 1e3 * statistics.median(v) for n, v in res.items()}


def _one_piece(w: torch.Tensor, scale: torch.Tensor, seed: int) -> torch.Tensor:
    """flatlora 0.1.0: the whole E in one buffer, then a third pass for W + E."""
    z = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed))
    z.mul_(scale.view(-1, 1))
    return w + z


@functools.lru_cache(maxsize=None)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers)


def _parallel_streams(w: torch.Tensor, scale: torch.Tensor, seed: int, *, subtract: bool = False,
                      inplace: bool = False) -> torch.Tensor:
    """`flatlora.noise.add_filter_noise` with the rows cut into ``torch.get_num_threads()`` ranges, range
    ``k`` drawn in blocks from its own generator (seed ``seed + k``); range 0 on this thread, the others on a
    thread pool."""
    threads = torch.get_num_threads()
    out = w if inplace else torch.empty_like(w)
    m = w.shape[0]
    cuts = [m * k // threads for k in range(threads + 1)]
    ranges = [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]

    def part(k: int) -> None:
        a, b = ranges[k]
        noise._cpu_draw(tuple(w[a:b].shape), scale[a:b], seed + k, w[a:b], out[a:b], subtract)

    futures = [_pool(threads - 1).submit(part, k) for k in range(1, len(ranges))]
    part(0)
    for f in futures:
        f.result()
    return out


def micro(shapes: list[int], repeats: int, clock, hash_draw: bool = False, inductor: bool = False) -> list[dict]:
    rows = []
    for n in shapes:
        gen = torch.Generator().manual_seed(0)
        w, a, b = torch.randn(n, n, generator=gen), torch.randn(8, n, generator=gen), torch.randn(n, 8, generator=gen)
        scale = row_scale(w, 0.05)
        peft_merged = lambda: row_scale(w.float().clone().add_((b @ a) * 2.0), 0.05)  # noqa: E731
        z = torch.randn(n, n, generator=gen)
        wb = w.bfloat16()
        cands = {
            "one-piece W+E (0.1.0)": lambda: _one_piece(w, scale, 1),
            "W+E blocks (now)": lambda: add_filter_noise(w, scale, 1),
            "W+E, parallel streams": lambda: _parallel_streams(w, scale, 1),
            "randn alone": lambda: torch.randn(n, n, generator=torch.Generator().manual_seed(1)),
            "addcmul(W, z, s)": lambda: torch.addcmul(w, z, scale.view(-1, 1)),
            "z * s + W": lambda: z * scale.view(-1, 1) + w,
            "randn bf16": lambda: torch.randn(n, n, generator=torch.Generator().manual_seed(1), dtype=torch.bfloat16),
            "randn fp32 -> bf16": lambda: torch.randn(n, n, generator=torch.Generator().manual_seed(1)).bfloat16(),
            "W+E bf16 now": lambda: add_filter_noise(wb, scale, 1),
            "merged weight + norms, PEFT delta": peft_merged,
            "merged weight + norms, addmm (now)": lambda: row_scale(torch.addmm(w, b, a, alpha=2.0), 0.05),
            "base norms only": lambda: row_scale(w, 0.05),
        }
        if hash_draw:  # issue 15: a counter-based draw fused and vectorised by inductor (_bench/hash_draw.py)
            cands["W+E counter hash, compiled"] = lambda: hash_draw_mod.compiled()(w, scale, 12345)
        if inductor:  # issue 22: the Triton kernel's Philox draw compiled for CPU (flatlora._cpu_philox)
            cands["W+E Philox, inductor"] = lambda: _cpu_philox.add_noise(w, scale, 1)
            cands["W+E bf16 Philox, inductor"] = lambda: _cpu_philox.add_noise(wb, scale, 1)
        rows.append({"shape": [n, n], "ms": _interleaved(cands, repeats, clock)})
    return rows


def micro_batches(model_name: str, rounds: int, micro: int, batch: int, seq: int) -> dict:
    spec = PRESETS[model_name]
    device = torch.device("cpu")
    model = build_model(spec, rank=8, seed=0, device=device)
    parts = [make_batch(spec, batch // micro, seq, 100 + k, device) for k in range(micro)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    total = rounds + 2
    flats = {m: FlatLora(model, FlatLoraConfig(rho=0.05, mode=m), total_steps=total) for m in ("exact", "inplace")}

    def grads() -> None:
        for p in parts:
            (model(**p).loss / micro).backward()

    def plain(t: int) -> None:
        grads()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def flat(mode: str, at_zero: bool = False):
        def step(t: int) -> None:
            with flats[mode].perturbed(0 if at_zero else t):
                grads()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    steps = {"lora": plain, "flat-exact": flat("exact"), "flat-inplace": flat("inplace"),
             "flat-exact at t=0": flat("exact", at_zero=True)}
    counter = timing.StepCounter(list(steps), total)
    times = timing.run_rounds(steps, counter, rounds=rounds, warmup=1, device=device)
    ref = times["lora"]
    return {"model": model_name, "micro_batches": micro, "batch": batch, "seq": seq, "rounds": rounds,
            "variants": {n: {"wall_ms": 1e3 * statistics.median(t["wall"]), "cpu_ms": 1e3 * statistics.median(t["cpu"]),
                             "paired_ratio_wall": timing.paired_ratio(t["wall"], ref["wall"]),
                             "paired_ratio_cpu": timing.paired_ratio(t["cpu"], ref["cpu"]),
                             "paired_ci95_cpu": timing.paired_ratio_ci(t["cpu"], ref["cpu"])}
                         for n, t in times.items()}}


def in_step(model_name: str, rounds: int, batch: int, seq: int) -> dict:
    """Milliseconds of noise (all ``W + E`` of one Flat-LoRA exact step) with flatlora's draw and with
    `_parallel_streams`, the two alternating step by step on one model, plus the step times."""
    spec = PRESETS[model_name]
    device = torch.device("cpu")
    model = build_model(spec, rank=8, seed=0, device=device)
    data = make_batch(spec, batch, seq, 0, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    flat = FlatLora(model, FlatLoraConfig(rho=0.05), total_steps=2 * rounds + 2)
    draws = {"blocks (now)": noise.add_filter_noise, "parallel streams": _parallel_streams}
    timer = timing.TimedCalls()

    res = {n: {"noise": [], "step": []} for n in draws}
    original = noise.add_filter_noise
    try:
        for t in range(1, 2 * rounds + 3):
            name = list(draws)[t % 2]
            noise.add_filter_noise = timer.wrap(draws[name])  # NoiseSpec.add_to looks the name up at call time
            timer.seconds = 0.0
            t0 = time.perf_counter()
            with flat.perturbed(t):
                model(**data).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if t > 2:  # one warm-up step each
                res[name]["step"].append(time.perf_counter() - t0)
                res[name]["noise"].append(timer.seconds)
    finally:
        noise.add_filter_noise = original
    return {"model": model_name, "rounds": rounds, "batch": batch, "seq": seq,
            "draws": {n: {"noise_ms": 1e3 * statistics.median(v["noise"]), "step_ms": 1e3 * statistics.median(v["step"])}
                      for n, v in res.items()}}


def render(result: dict) -> str:
    meta = result["meta"]
    out = [f"# Noise-path levers ({meta['threads']} threads, {meta['clock']})", "", f"`{meta['command']}`", "",
           f"torch {meta['torch']}; load average {meta['loadavg_start']} at start, {meta['loadavg_end']} at end.",
           "", "Milliseconds per call, median of interleaved repeats:", ""]
    shapes = [r["shape"] for r in result["micro"]]
    out += ["| candidate | " + " | ".join(f"{s[0]}x{s[1]}" for s in shapes) + " |",
            "|---|" + "---|" * len(shapes)]
    for name in result["micro"][0]["ms"]:
        out.append(f"| {name} | " + " | ".join(f"{r['ms'][name]:.3f}" for r in result["micro"]) + " |")
    mb = result.get("micro_batches")
    if mb:
        out += ["", f"{mb['model']}: one step = {mb['micro_batches']} micro-batches of {mb['batch'] // mb['micro_batches']}"
                f" x {mb['seq']} tokens, {mb['rounds']} interleaved rounds:", "",
                "| variant | step ms | x LoRA, paired | CPU ms | x LoRA (CPU), paired [95% CI] |", "|---|---|---|---|---|"]
        for n, v in mb["variants"].items():
            lo, hi = v["paired_ci95_cpu"]
            out.append(f"| {n} | {v['wall_ms']:.0f} | {v['paired_ratio_wall']:.3f} | {v['cpu_ms']:.0f} | "
                       f"{v['paired_ratio_cpu']:.3f} [{lo:.3f}-{hi:.3f}] |")
    st = result.get("in_step")
    if st:
        out += ["", f"{st['model']}: noise inside Flat-LoRA exact steps ({st['batch']} x {st['seq']} tokens), "
                f"{st['rounds']} steps each, alternating:", "", "| draw | noise ms per step | step ms |", "|---|---|---|"]
        out += [f"| {n} | {v['noise_ms']:.1f} | {v['step_ms']:.0f} |" for n, v in st["draws"].items()]
    if result.get("one_draw"):
        out += ["", "One draw per layer and micro-batch (forward's W + E kept for backward) inside real steps, "
                "interleaved rounds:", "", *one_draw.render(result["one_draw"])]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--shapes", type=int, nargs="*", default=[384, 1024], help="square layer sizes")
    p.add_argument("--repeats", type=int, default=40, help="interleaved repeats per candidate")
    p.add_argument("--micro-batch-rounds", type=int, default=10, help="rounds of the micro-batch test (0: skip)")
    p.add_argument("--in-step-rounds", type=int, default=10, help="steps per draw of the in-step test (0: skip)")
    p.add_argument("--model", default="minilm", choices=sorted(PRESETS), help="model of the step tests")
    p.add_argument("--hash-draw", action="store_true", help="also time the compiled counter-based draw")
    p.add_argument("--inductor-draw", action="store_true",
                   help="also time the noise backend 'inductor' (the GPU's Philox draw compiled for CPU)")
    p.add_argument("--one-draw-rounds", type=int, default=0,
                   help="rounds of the one-draw-per-step comparison inside real steps (0: skip)")
    p.add_argument("--one-draw-models", nargs="+", default=["bert-all", "effnet"], choices=["bert-all", "effnet"])
    p.add_argument("--out", default="benchmarks/results", help="output folder")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    one = torch.get_num_threads() == 1
    clock = time.process_time if one else time.perf_counter
    result = {"meta": {"command": " ".join([".venv/bin/python benchmarks/levers.py",
                                            *(sys.argv[1:] if argv is None else argv)]),
                       "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "clock": "process CPU time" if one else "wall time",
                       "loadavg_start": "/".join(f"{x:.1f}" for x in os.getloadavg())}}
    result["micro"] = micro(args.shapes, args.repeats, clock, args.hash_draw, args.inductor_draw)
    if args.micro_batch_rounds:
        result["micro_batches"] = micro_batches(args.model, args.micro_batch_rounds, 4, 32, 64)
    if args.in_step_rounds:
        result["in_step"] = in_step(args.model, args.in_step_rounds, 32, 64)
    if args.one_draw_rounds:
        result["one_draw"] = [one_draw.compare(m, args.one_draw_rounds, inductor=args.inductor_draw)
                              for m in args.one_draw_models]
    result["meta"]["loadavg_end"] = "/".join(f"{x:.1f}" for x in os.getloadavg())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "levers-cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "levers-cpu.md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
