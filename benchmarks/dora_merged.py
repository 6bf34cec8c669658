"""Could a DoRA layer compute Flat-LoRA's step with its merged weight directly? A measurement and two checks.

    .venv/bin/python benchmarks/dora_merged.py                 # 6 DoRA layers 1024x1024, 2048 tokens (CPU: minutes)
    .venv/bin/python benchmarks/dora_merged.py --hidden 128 --tokens 64 --rounds 2   # seconds

The exact mode adds ``x · Eᵀ`` beside a DoRA layer (`flatlora.targets.noise_beside`): two weight-sized matmuls per
layer more than DoRA's own step (``x · Eᵀ`` forward, ``g · E`` backward). Two ways to avoid them, each checked here:

* **swap the base op only** (what bitsandbytes bases do): PEFT's DoRA output is ``mns ⊙ (x·W0ᵀ + s·x·(BA)ᵀ)``
  with ``mns = m / ‖W0 + sBA‖_row`` (norm detached), so a base computing ``x · (W0 + E / mns)ᵀ`` gives the right
  *output*. But PEFT takes the magnitude's gradient through ``mns ⊙ base_output``, which then holds the noise
  term: ``∂L/∂m`` gains ``Σ_t g_t,i · (x_t · E_i) / m_i``. Printed: that gradient's relative error.
* **the merged weight directly** (replacing PEFT's DoRA forward by ``F.linear(x, W_dora + E)``, autograd through
  ``W_dora(m, A, B)``): right numbers without dropout (printed: the gradients against the exact mode's), but
  the gradients of ``m``, ``A``, ``B`` go through the full ``∂L/∂W = gᵀ · x``, a third weight-sized matmul, so it
  saves one of the two, and it cannot express PEFT's DoRA with ``lora_dropout > 0`` (base on ``x``, the
  correction on ``dropout(x)``). Timed here as a prototype that draws ``E`` once per step and lets autograd keep
  ``W_dora + E`` (a lower bound: the exact mode would draw twice and keep nothing).

Steps (forward, backward, AdamW, zero_grad) of DoRA, DoRA + Flat-LoRA exact (noise beside) and the prototype
run interleaved in one process (`_bench.timing`); ratios to DoRA's step are paired per round.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flatlora import FlatLora, FlatLoraConfig  # noqa: E402

from _bench import timing  # noqa: E402
from _bench.qlora import Stack  # noqa: E402


def build(hidden: int, layers: int, rank: int, seed: int):
    from peft import LoraConfig, get_peft_model

    gen = torch.Generator().manual_seed(seed)
    mods = []
    for _ in range(layers):
        lin = torch.nn.Linear(hidden, hidden, bias=False)
        lin.weight = torch.nn.Parameter(torch.randn(hidden, hidden, generator=gen) / hidden**0.5, requires_grad=False)
        mods.append(lin)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(Stack(mods, False), LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                              use_dora=True, target_modules=r"layers\.\d+"))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B = 0 at init would make the two ways agree trivially on A's gradient
                torch.nn.init.normal_(p, std=0.02)
    return model.train()


def _loras(model):
    return [m for m in model.modules() if hasattr(m, "lora_magnitude_vector") and m.lora_magnitude_vector]


def merged_forward(lora, e: torch.Tensor):
    """The prototype: the layer as ``F.linear(x, m / ‖V‖_row.detach() · V + E)``, ``V = W0 + s·B·A``."""
    base, s = lora.base_layer, lora.scaling["default"]
    a, b, m = lora.lora_A["default"].weight, lora.lora_B["default"].weight, lora.lora_magnitude_vector["default"].weight

    def forward(x, *args, **kwargs):
        v = base.weight + s * (b @ a)
        w = (m / v.norm(dim=1).detach()).unsqueeze(1) * v + e
        return F.linear(x, w, base.bias)

    return forward


@contextlib.contextmanager
def swapped(model, forwards):
    loras = _loras(model)
    for lora, fwd in zip(loras, forwards):
        lora.forward = fwd
    try:
        yield
    finally:
        for lora in loras:
            del lora.forward


@contextlib.contextmanager
def base_at_scaled_noise(model, noise):
    """Swap only each base op for ``x · (W0 + E / mns)ᵀ`` (the output is right; see the module docstring)."""
    loras = _loras(model)
    for lora in loras:
        e = next(v for k, v in noise.items() if lora is model.get_submodule(k))
        v = lora.base_layer.weight + lora.scaling["default"] * (lora.lora_B["default"].weight @ lora.lora_A["default"].weight)
        mns = (lora.lora_magnitude_vector["default"].weight / v.norm(dim=1)).detach()
        lora.base_layer.forward = lambda x, w=(lora.base_layer.weight + e / mns.unsqueeze(1)).detach(): F.linear(x, w)
    try:
        yield
    finally:
        for lora in loras:
            del lora.base_layer.forward


def grads(model, x, ctx) -> dict:
    model.zero_grad(set_to_none=True)
    with ctx:
        model(x).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def rel_err(got: dict, want: dict, key: str) -> float:
    return max(((got[k] - want[k]).norm() / want[k].norm()).item() for k in want if key in k)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.hidden, args.layers, args.tokens, args.rank, args.rounds) < 1 or args.warmup < 0:
        print("dora_merged.py: sizes and rounds must be >= 1, warmup >= 0", file=sys.stderr)
        return 2
    model = build(args.hidden, args.layers, args.rank, args.seed)
    total = args.warmup + args.rounds + 2
    flat = FlatLora(model, FlatLoraConfig(rho=args.rho, seed=args.seed), total_steps=total)
    x = torch.randn(args.tokens, args.hidden, generator=torch.Generator().manual_seed(args.seed + 1))

    # the checks, at a large sigma so the noise term is far above rounding
    check = FlatLora(model, FlatLoraConfig(rho=0.5, seed=args.seed), total_steps=1)
    noise = check.noise(1)
    exact = grads(model, x, check.perturbed(1))
    proto = grads(model, x, swapped(model, [merged_forward(lo, noise[n]) for n, lo in
                                           zip(check.targets, _loras(model))]))
    trick = grads(model, x, base_at_scaled_noise(model, noise))
    clean = grads(model, x, contextlib.nullcontext())
    print(f"relative error against the exact mode (noise beside), rho 0.5: merged weight directly: "
          f"A {rel_err(proto, exact, 'lora_A'):.1e}, B {rel_err(proto, exact, 'lora_B'):.1e}, "
          f"m {rel_err(proto, exact, 'magnitude'):.1e}; base op at W0 + E/mns: A {rel_err(trick, exact, 'lora_A'):.1e}, "
          f"B {rel_err(trick, exact, 'lora_B'):.1e}, m {rel_err(trick, exact, 'magnitude'):.1e} "
          f"(the noise itself moves m's gradient by {rel_err(clean, exact, 'magnitude'):.1e})")

    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
    loras = _loras(model)

    def step(kind: str):
        def run(t: int) -> None:
            if kind == "dora":
                ctx = contextlib.nullcontext()
            elif kind == "flat-exact":
                ctx = flat.perturbed(t)
            else:  # one draw per layer and step, outside any autograd
                ctx = swapped(model, [merged_forward(lo, s.sample()) for (_, s), lo in zip(flat.noise_specs(t), loras)])
            with ctx:
                model(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    steps = {k: step(k) for k in ("dora", "flat-exact", "merged-direct")}
    times = timing.run_rounds(steps, timing.StepCounter(list(steps), total), rounds=args.rounds,
                              warmup=args.warmup, device=torch.device("cpu"))
    print(f"\n{args.layers} DoRA layers {args.hidden}x{args.hidden} (r {args.rank}), {args.tokens} tokens, "
          f"{args.rounds} interleaved rounds, {torch.get_num_threads()} threads\n")
    print("| step | ms, median [IQR] | x DoRA | x DoRA, paired [95% CI] | x DoRA (CPU time) |")
    print("|---|---|---|---|---|")
    ref = times["dora"]
    for k, t in times.items():
        w, c = timing.summarize(t["wall"]), timing.summarize(t["cpu"])
        lo, hi = timing.paired_ratio_ci(t["wall"], ref["wall"])
        print(f"| {k} | {w['median_ms']:.0f} [{w['q1_ms']:.0f}-{w['q3_ms']:.0f}] | "
              f"{w['median_ms'] / timing.summarize(ref['wall'])['median_ms']:.3f} | "
              f"{timing.paired_ratio(t['wall'], ref['wall']):.3f} [{lo:.3f}-{hi:.3f}] | "
              f"{c['median_ms'] / timing.summarize(ref['cpu'])['median_ms']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
