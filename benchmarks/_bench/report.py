"""The Markdown tables of an overhead run (from its JSON result, nothing recomputed)."""

from __future__ import annotations

MIB = 1024 * 1024


def _f(v, fmt: str = "{:.0f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def _ratio(v) -> str:
    return _f(v, "{:.3f}")


def _paired(v: dict, clock: str) -> str:
    lo, hi = v[f"paired_ci95_{clock}"]
    return f"{v[f'paired_ratio_{clock}']:.3f} [{lo:.3f}-{hi:.3f}]"


def main_table(result: dict) -> list[str]:
    lines = ["| model | variant | step ms, median [IQR] | x LoRA | x LoRA, paired [95% CI] | CPU ms, median | "
             "x LoRA (CPU) | x LoRA (CPU), paired [95% CI] | peak tensor MiB | x LoRA | peak RSS MiB | x LoRA |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in result["models"]:
        for name, v in m["variants"].items():
            w, c = v["wall"], v["cpu"]
            mem = m.get("memory", {}).get(name, {})
            tensor = mem.get("tensor_peak_bytes")
            rss = mem.get("rss_peak_bytes")
            lines.append(
                f"| {m['name']} | {name} | {w['median_ms']:.0f} [{w['q1_ms']:.0f}-{w['q3_ms']:.0f}] | "
                f"{_ratio(v['ratio_wall'])} | {_paired(v, 'wall')} | {c['median_ms']:.0f} | {_ratio(v['ratio_cpu'])} | "
                f"{_paired(v, 'cpu')} | "
                f"{_f(None if tensor is None else tensor / MIB, '{:.1f}')} | {_ratio(mem.get('tensor_ratio'))} | "
                f"{_f(None if rss is None else rss / MIB)} | {_ratio(mem.get('rss_ratio'))} |")
    return lines


def breakdown_table(result: dict) -> list[str]:
    lines = ["| model | mode | norms ms | draw ms | apply ms | sum ms | sum / LoRA step | measured extra ms "
             "(wall / CPU) | matmuls of these layers ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in result["models"]:
        b = m.get("breakdown")
        if not b:
            continue
        lora = m["variants"]["lora"]["wall"]["median_ms"]
        for mode in ("flat-exact", "flat-inplace"):
            if mode not in m["variants"]:
                continue
            p = b["per_step_ms"][mode]
            extra = b["measured_extra_ms"][mode]
            lines.append(
                f"| {m['name']} | {mode} | {p['norms']:.1f} | {p['draw']:.1f} | {p['apply']:.1f} | {p['total']:.1f} | "
                f"{100 * p['total'] / lora:.1f}% | {extra['wall']:+.0f} / {extra['cpu']:+.0f} | "
                f"{b['per_step_ms']['matmuls']['total']:.0f} |")
    return lines


def sweep_table(result: dict) -> list[str]:
    lines = ["| hidden | params (M) | LoRA ms | Flat-LoRA exact ms | x LoRA | x LoRA (CPU), paired | noise per "
             "layer-step ms (2 draws + 2 applies) | matmuls per layer-step ms | noise / matmuls |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in result.get("sweep", []):
        lines.append(
            f"| {s['hidden']} | {s['params'] / 1e6:.1f} | {s['lora_ms']:.0f} | {s['flat_ms']:.0f} | "
            f"{_ratio(s['ratio_wall'])} | {_ratio(s['paired_ratio_cpu'])} | {s['noise_ms']:.2f} | {s['matmul_ms']:.2f} | "
            f"{100 * s['noise_ms'] / s['matmul_ms']:.1f}% |")
    return lines


def render(result: dict) -> str:
    meta, cfg = result["meta"], result["config"]
    out = [f"# Flat-LoRA overhead ({meta['device']}, {meta['threads']} threads, {cfg['dtype']})", "",
           f"`{meta['command']}`", "",
           f"torch {meta['torch']}, transformers {meta['transformers']}, peft {meta['peft']}; {meta['cpu']}; "
           f"{meta['date']}; load average {meta['loadavg_start']} at start, {meta['loadavg_end']} at end; "
           f"{meta['seconds']:.0f} s.", "",
           "Per optimizer step (forward, backward, AdamW step, zero_grad) on one batch of "
           f"{cfg['batch']} x {cfg['seq']} tokens, LoRA r={cfg['rank']} on query/value. Medians over interleaved "
           "rounds; `x LoRA` = median / LoRA's median from the same rounds; `paired` = median over rounds of "
           "(this step / LoRA's step of the same round), robust to the machine's load drifting between rounds, "
           "with a 95% bootstrap interval over rounds. CPU = this process's CPU time.", ""]
    for m in result["models"]:
        out.append(f"- **{m['name']}**: {m['describe']}, {m['params'] / 1e6:.1f}M parameters "
                   f"({m['trainable'] / 1e3:.0f}k trainable), {m['targets']} perturbed layers, "
                   f"{m['rounds']} rounds after {m['warmup']} warm-up.")
    out += ["", *main_table(result), "", f"Memory: {result['memory_method']}", ""]
    if any(m.get("breakdown") for m in result["models"]):
        out += ["## Where the extra time goes", "",
                "Pieces of the noise timed in isolation on the real layer shapes, summed per optimizer step "
                "(draw = generating E from its seed, 2 per step; apply = W + E (exact, 2 per step) or "
                "W += E and W -= E (inplace); norms = merged weight and row norms, once per step), against "
                "the measured difference of medians to LoRA.", "", *breakdown_table(result), ""]
    if result.get("sweep"):
        out += ["## Scaling with the hidden size", "",
                f"{cfg['sweep_layers']}-layer BERTs, same batch; LoRA vs Flat-LoRA exact, "
                f"{cfg['sweep_rounds']} rounds each. Noise per layer-step against the same layer's forward "
                "matmul plus input-gradient matmul at this token count.", "", *sweep_table(result), ""]
    q = result.get("qlora")
    if q:
        from .qlora import describe, table

        out += ["## QLoRA: an NF4 base beside a dense one", ""]
        out += [f"Skipped: {q['skipped']}", ""] if "skipped" in q else [
            f"{describe(q)}. Both bases' steps ran interleaved in the same rounds (Flat-LoRA exact / LoRA of each "
            "base; an NF4 layer computes at deq(W0) + E with one matmul).", "", *table(q), ""]
    rounds = [m for m in result["models"] if m.get("alora_round")]
    if rounds:
        out += ["## ALoRA's reallocation rounds", "",
                "One round scores every open rank by ablation on one batch (the step's batch here; the paper uses "
                "32 validation examples): 2K + 1 forwards for K open ranks, then prunes and reopens ranks. It runs "
                "a few times per training run (the paper: at most 8), not every step; its cost per training step "
                "is (rounds x round) / steps.", "",
                "| model | open ranks K | forwards | round s | = LoRA steps |", "|---|---|---|---|---|"]
        for m in rounds:
            r = m["alora_round"]
            out.append(f"| {m['name']} | {r['open_ranks']} | {r['forwards']} | {r['seconds']:.2f} | "
                       f"{r['lora_steps']:.1f} |")
        out.append("")
    for m in result["models"]:
        for name, note in m.get("notes", {}).items():
            out.append(f"- {m['name']} / {name}: {note}")
    return "\n".join(out) + "\n"
