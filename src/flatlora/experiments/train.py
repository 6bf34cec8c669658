"""Train and evaluate one run (task x method x rank x seed) with a plain PyTorch loop.

The loop uses only flatlora's public API (`flatlora.FlatLora` and ``perturbed(t)``, inside
`flatlora.experiments.methods.Method`). Pairing across methods: for a given seed every method sees the same
training-example order, the same initial adapter and head, and the same dropout masks (the dropout RNG is
seeded per ``(seed, step)``), so differences between methods are differences of the method alone.

Schedule: AdamW, linear warm-up for ``warmup_ratio`` of the steps, then linear decay to 0; gradient
clipping at ``max_grad_norm``. Measured per run: step times (the first step, which includes one-off
allocations, is left out of the mean), peak memory (CUDA: ``max_memory_allocated``; CPU: the process's
peak resident set size sampled every 20 ms during training; both in `.measure`), and after training, in eval
mode: in-domain test accuracy, every out-of-domain set, and the clean loss on up to ``train_loss_size``
training examples.

`train_run` reads as its steps: `_RunData.load` (data, step count, example order), `build_peft_model` (model
and method's initialisation), `_Training.setup` (optimizer, schedule, gradient rule), `_train_loop`,
`evaluate_all`, and `_save_run` (adapter, curve.json, run.json), timed by a `.measure.Stopwatch`.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .._stats import mean
from .adapters import LORA_GA_BATCHES, build_peft_model, save_adapter, save_initial_adapter
from .config import ExperimentConfig
from .measure import PeakMemory, Stopwatch, timings
from .methods import Method, MethodSpec, get_method, heldout_examples, seeded
from .runs import ADAPTER_DIR, CURVE_FILE, RUN_FILE, atomic_dir, write_json_atomic
from .tasks import Splits, Task, TensorData, get_task, to_device


def resolve_device(cfg: ExperimentConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available; use --device cpu or auto")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def total_steps(cfg: ExperimentConfig, n_train: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * math.ceil(n_train / cfg.batch_size)))


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Example indices of each step: a fresh seeded permutation per epoch, the last partial batch kept."""
    out: list[torch.Tensor] = []
    epoch = 0
    while len(out) < steps:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(1_000_003 * seed + epoch))
        out.extend(perm[i:i + batch_size] for i in range(0, n, batch_size))
        epoch += 1
    return out[:steps]


def _lr_lambda(steps: int, warmup_ratio: float) -> Callable[[int], float]:
    warm = int(round(warmup_ratio * steps))

    def f(i: int) -> float:  # i = number of optimizer steps taken so far
        if i < warm:
            return (i + 1) / (warm + 1)
        return max(0.0, (steps - i) / max(1, steps - warm))

    return f


def evaluate_all(task: Any, model: torch.nn.Module, splits: Any, cfg: ExperimentConfig,
                 device: torch.device) -> dict[str, Any]:
    model.eval()
    test = task.evaluate(model, splits.test, cfg, device)
    ood = {name: task.evaluate(model, data, cfg, device) for name, data in splits.ood.items()}
    train = task.evaluate(model, splits.train.head(cfg.train_loss_size), cfg, device)
    metrics: dict[str, Any] = {
        "test_accuracy": test["accuracy"], "test_loss": test["loss"], "n_test": test["n"],
        "ood_accuracy": mean([v["accuracy"] for v in ood.values()]) if ood else math.nan,
        "ood": {k: v["accuracy"] for k, v in ood.items()},
        "ood_loss": {k: v["loss"] for k, v in ood.items()},
        "n_ood": {k: v["n"] for k, v in ood.items()},
        "train_loss": train["loss"], "train_accuracy": train["accuracy"],
    }
    for group, names in task.ood_groups(cfg).items():
        accs = [metrics["ood"][n] for n in names if n in metrics["ood"]]
        if accs:
            metrics.setdefault("ood_groups", {})[group] = mean(accs)
    if cfg.sharpness_batches:
        metrics["flatness"] = measure_flatness(task, model, splits.train, cfg, device)
    return metrics


SHARPNESS_BATCH = 32  # examples per batch of the flatness measures
HESSIAN_BATCHES = 1  # the first batch of those, for the Hessian-vector products


def measure_flatness(task: Any, model: nn.Module, train: TensorData, cfg: ExperimentConfig,
                     device: torch.device) -> dict[str, Any]:
    """What Flat-LoRA claims to change, on the first ``sharpness_batches`` x 32 training examples (eval mode, clean
    cross-entropy, `flatlora.analysis.sharpness_report`; no weight is written): the expected sharpness
    ``E[L(W + E)] - L(W)`` at ``sharpness_rho`` (Flat-LoRA's noise law, ``sharpness_samples`` draws, with its
    standard error), SAM sharpness at ``sharpness_sam_rho`` in the full (W) and the LoRA (A, B) space, and
    the top Hessian eigenvalue w.r.t. the merged weights (Lanczos, ``hessian_iters`` steps, on the first batch,
    central-difference Hessian-vector products: ~1.5x cheaper than double backward on MiniLM, tested against it).
    The probes' seeds are fixed (0) so every run is measured with the same noise draws."""
    from ..analysis import sharpness_report

    data = train.head(cfg.sharpness_batches * SHARPNESS_BATCH)
    batches = [to_device(task.collate(chunk, cfg), device) for chunk in data.chunks(SHARPNESS_BATCH)]
    rep = sharpness_report(model, task.ce_loss, batches, label="run", rho=cfg.sharpness_rho,
                           n_samples=cfg.sharpness_samples, sam_rho=cfg.sharpness_sam_rho, seed=0,
                           hessian_iters=cfg.hessian_iters, hessian_batches=min(HESSIAN_BATCHES, len(batches)),
                           progress=False, hessian_hvp="central")
    eig = rep.hessian
    return {"n_examples": len(data), "loss": rep.expected.loss,
            "expected_sharpness": rep.expected.sharpness, "expected_sharpness_stderr": rep.expected.stderr,
            "sam_sharpness_full": rep.sam_full.sharpness, "sam_sharpness_lora": rep.sam_lora.sharpness,
            "hessian_top": None if eig is None else eig.value,
            "hessian": None if eig is None else eig.to_dict()}


# --- set-up: the data and the training state ----------------------------------------------------------
@dataclass
class _RunData:
    """The data side of one run: the task's splits, the step count and each step's example indices (a function
    of ``seed`` only, so every method draws the same order)."""

    cfg: ExperimentConfig
    task: Task
    device: torch.device
    splits: Splits
    steps: int
    order: list[torch.Tensor]

    @classmethod
    def load(cls, cfg: ExperimentConfig, seed: int) -> "_RunData":
        task = get_task(cfg.task)
        device = resolve_device(cfg)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        splits = task.run_splits(cfg)
        steps = total_steps(cfg, len(splits.train))
        return cls(cfg, task, device, splits, steps, batch_order(len(splits.train), cfg.batch_size, steps, seed))

    @property
    def n_train(self) -> int:
        return len(self.splits.train)

    def collate(self, data: TensorData) -> dict:
        return to_device(self.task.collate(data, self.cfg), self.device)

    def batch(self, idx: torch.Tensor) -> dict:
        """The training batch of the examples ``idx``, on the device."""
        return self.collate(self.splits.train.take(idx))

    def ga_batches(self) -> list[dict]:
        """The first training batches, whose accumulated gradient initialises LoRA-GA."""
        return [self.batch(idx) for idx in self.order[:LORA_GA_BATCHES]]

    def heldout(self) -> list[dict]:
        """ALoRA's scoring batch: training-pool examples the run never trains on."""
        return [self.collate(heldout_examples(self.task, self.cfg))]


@dataclass
class _Training:
    """What the loop steps: the model's trainable parameters, AdamW with its warm-up/decay schedule, and the
    method's gradient rule."""

    params: list[nn.Parameter]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    runner: Method

    @classmethod
    def setup(cls, model: nn.Module, spec: MethodSpec, data: _RunData, seed: int, rho: float) -> "_Training":
        cfg = data.cfg
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(data.steps, cfg.warmup_ratio))
        runner = Method(spec, model, data.task.loss, total_steps=data.steps, seed=seed, rho=rho,
                        sam_rho=cfg.sam_rho, sam_w_rho=cfg.sam_w_rho, heldout=data.heldout,
                        steps_per_epoch=math.ceil(data.n_train / cfg.batch_size),
                        bi_lora=dict(rho=cfg.bi_lora_rho, norm=cfg.bi_lora_norm),
                        eflat=dict(rho=cfg.eflat_rho, beta=cfg.eflat_beta, schedule=cfg.eflat_schedule,
                                   norm=cfg.eflat_norm))
        return cls(params, opt, sched, runner)

    def step(self, t: int, batch: dict, seed: int, max_grad_norm: float) -> float:
        """One optimizer step ``t``; returns the training loss of its first pass."""
        with seeded(1_000_003 * seed + t):  # dropout masks: a function of (seed, step) only
            loss = self.runner.grads(t, batch)
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.runner.after_step(t, self.opt)
        self.opt.zero_grad(set_to_none=True)
        return loss


# --- the loop ---------------------------------------------------------------------------------------------
def _train_loop(data: _RunData, training: _Training, seed: int, label: str,
                tick: Callable[[float], None]) -> tuple[dict[str, list], list[float]]:
    """Every optimizer step of the run; returns the training curve and the wall time of each step."""
    curve: dict[str, list] = {"step": [], "loss": [], "lr": [], "sigma": []}
    step_times: list[float] = []
    for t, idx in enumerate(data.order, start=1):
        batch = data.batch(idx)
        t0 = time.perf_counter()
        lr = training.sched.get_last_lr()[0]
        loss = training.step(t, batch, seed, data.cfg.max_grad_norm)
        if data.device.type == "cuda":
            torch.cuda.synchronize(data.device)
        step_times.append(time.perf_counter() - t0)
        if not math.isfinite(loss):
            raise ValueError(f"{label}: the training loss is {loss} at step {t}; lower --lr or rho")
        for key, value in zip(curve, (t, loss, lr, training.runner.sigma(t))):
            curve[key].append(value)
        tick(loss)
    return curve, step_times


@contextlib.contextmanager
def _progress(show: bool, steps: int, label: str) -> Iterator[Callable[[float], None]]:
    """A tqdm bar over the steps (``show``), updated by calling the yielded function with each step's loss."""
    if not show:
        yield lambda loss: None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, desc=label, unit="step", leave=False, dynamic_ncols=True)

    def tick(loss: float) -> None:
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        bar.update(1)

    try:
        yield tick
    finally:
        bar.close()


# --- persistence ------------------------------------------------------------------------------------------
def _save_run(tmp: Path, model: nn.Module, method: str, initial_dir: str | None, curve: dict[str, list],
              info: dict[str, Any]) -> None:
    """The run folder's files: the trained adapter, the curve and run.json (LoRA-GA's initial adapter goes)."""
    save_adapter(model, method, str(tmp / ADAPTER_DIR), initial_dir)
    if initial_dir is not None:
        shutil.rmtree(initial_dir, ignore_errors=True)
    write_json_atomic(tmp / CURVE_FILE, curve)
    write_json_atomic(tmp / RUN_FILE, info)


# --- one run ----------------------------------------------------------------------------------------------
def train_run(cfg: ExperimentConfig, method: str, rank: int, seed: int, run_dir: str | Path,
              progress: bool = True, log: Callable[[str], None] = print, rho: float | None = None) -> dict[str, Any]:
    """Train, evaluate and save one run into ``run_dir`` (atomically); returns its run.json dict. ``rho``: the
    Flat-LoRA rho of this run (one of ``cfg.flat_rhos()``; default: the first)."""
    spec = get_method(method)
    rho = cfg.flat_rhos()[0] if rho is None else float(rho)
    data = _RunData.load(cfg, seed)
    label = f"{cfg.method_label(method, rank, rho)}/seed{seed}"
    clock = Stopwatch()
    with atomic_dir(run_dir) as tmp:
        with clock.phase("build"):
            model = build_peft_model(data.task, cfg, method, rank, seed, data.steps, data.ga_batches, data.device)
            initial_dir = save_initial_adapter(model, method, str(tmp / "initial_adapter"))
        training = _Training.setup(model, spec, data, seed, rho)
        with _progress(progress, data.steps, label) as tick:
            with clock.phase("train"), PeakMemory(data.device) as mem:
                curve, step_times = _train_loop(data, training, seed, label, tick)
            training.runner.finish()  # Bi-LoRA: the auxiliary adapter goes before evaluation and saving
        with clock.phase("eval"):
            metrics = evaluate_all(data.task, model, data.splits, cfg, data.device)
        info = {
            "label": label, "task": cfg.task, "method": method, "rank": rank, "seed": seed,
            "description": spec.description, "rho": training.runner.rho,
            "steps": data.steps, "n_train": data.n_train, **training.runner.param_counts(training.params),
            **training.runner.record(), "metrics": metrics, "final_running_loss": mean(curve["loss"][-10:]),
            "timings": timings(clock, step_times, mem, data.device),
            "config": cfg.to_dict(), "versions": _versions(),
        }
        _save_run(tmp, model, method, initial_dir, curve, info)
    times = info["timings"]
    flat = metrics.get("flatness")
    log(f"{label}: test acc {metrics['test_accuracy']:.4f}, ood acc {metrics['ood_accuracy']:.4f}, "
        f"train loss {metrics['train_loss']:.4f}, {times['step_s_mean']:.3f} s/step, "
        f"{times['train_s']:.0f}s train + {times['eval_s']:.0f}s eval"
        + (f" (incl. flatness: expected sharpness {flat['expected_sharpness']:.4f})" if flat else ""))
    return info


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for dist in ("flatlora", "torch", "peft", "transformers"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


__all__ = ["PeakMemory", "batch_order", "evaluate_all", "resolve_device", "total_steps", "train_run"]
