"""Train and evaluate one run (task x method x rank x seed) with a plain PyTorch loop.

The loop uses only flatlora's public API (`flatlora.FlatLora` and ``perturbed(t)``, inside
`flatlora.experiments.methods.Method`). Pairing across methods: for a given seed every method sees the same
training-example order, the same initial adapter and head, and the same dropout masks (the dropout RNG is
seeded per ``(seed, step)``), so differences between methods are differences of the method alone.

Schedule: AdamW, linear warm-up for ``warmup_ratio`` of the steps, then linear decay to 0; gradient
clipping at ``max_grad_norm``. Measured per run: step times (the first step, which includes one-off
allocations, is left out of the mean), peak memory (CUDA: ``max_memory_allocated``; CPU: the process's
peak resident set size sampled every 20 ms during training), and after training, in eval mode: in-domain
test accuracy, every out-of-domain set, and the clean loss on up to ``train_loss_size`` training examples.
"""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .config import ExperimentConfig
from .methods import (Method, build_peft_model, get_method, heldout_examples, save_adapter, save_initial_adapter,
                      seeded)
from .runs import ADAPTER_DIR, CURVE_FILE, RUN_FILE, atomic_dir, write_json_atomic
from .tasks import TensorData, get_task, to_device


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


class PeakMemory:
    """Peak memory during a block: CUDA allocator peak, or sampled peak RSS of this process (MiB)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mib = math.nan
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def rss_mib() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
        except (OSError, ValueError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_mib = self.rss_mib()

            def sample() -> None:
                while not self._stop.wait(0.02):
                    self.peak_mib = max(self.peak_mib, self.rss_mib())

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mib = max(self.peak_mib, self.rss_mib())


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
        "ood_accuracy": (sum(v["accuracy"] for v in ood.values()) / len(ood)) if ood else math.nan,
        "ood": {k: v["accuracy"] for k, v in ood.items()},
        "ood_loss": {k: v["loss"] for k, v in ood.items()},
        "n_ood": {k: v["n"] for k, v in ood.items()},
        "train_loss": train["loss"], "train_accuracy": train["accuracy"],
    }
    for group, names in task.ood_groups(cfg).items():
        accs = [metrics["ood"][n] for n in names if n in metrics["ood"]]
        if accs:
            metrics.setdefault("ood_groups", {})[group] = sum(accs) / len(accs)
    return metrics


def train_run(cfg: ExperimentConfig, method: str, rank: int, seed: int, run_dir: str | Path,
              progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, evaluate and save one run into ``run_dir`` (atomically); returns its run.json dict."""
    spec = get_method(method)
    task = get_task(cfg.task)
    device = resolve_device(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    splits = task.splits(cfg)
    n_train = len(splits.train)
    steps = total_steps(cfg, n_train)
    order = batch_order(n_train, cfg.batch_size, steps, seed)

    def collate(data: TensorData) -> dict:
        return to_device(task.collate(data, cfg), device)

    def ga_batches() -> list[dict]:
        from .methods import LORA_GA_BATCHES

        return [collate(splits.train.take(idx)) for idx in order[:LORA_GA_BATCHES]]

    label = f"{cfg.method_label(method, rank)}/seed{seed}"
    with atomic_dir(run_dir) as tmp:
        t_build = time.perf_counter()
        model = build_peft_model(task, cfg, method, rank, seed, steps, ga_batches, device)
        initial_dir = save_initial_adapter(model, method, str(tmp / "initial_adapter"))
        build_s = time.perf_counter() - t_build
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        n_trainable = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, cfg.warmup_ratio))
        runner = Method(spec, model, task.loss, total_steps=steps, seed=seed, rho=cfg.flat_rho(),
                        sam_rho=cfg.sam_rho, sam_w_rho=cfg.sam_w_rho, heldout=lambda: [collate(heldout_examples(
                            task, cfg))], steps_per_epoch=math.ceil(n_train / cfg.batch_size))
        curve: dict[str, list] = {"step": [], "loss": [], "lr": [], "sigma": []}
        step_times: list[float] = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc=label, unit="step", leave=False, dynamic_ncols=True)
        t_train = time.perf_counter()
        with PeakMemory(device) as mem:
            for t, idx in enumerate(order, start=1):
                batch = collate(splits.train.take(idx))
                t0 = time.perf_counter()
                lr = sched.get_last_lr()[0]
                with seeded(1_000_003 * seed + t):  # dropout masks: a function of (seed, step) only
                    loss = runner.grads(t, batch)
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                sched.step()
                runner.after_step(t, opt)
                opt.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                step_times.append(time.perf_counter() - t0)
                if not math.isfinite(loss):
                    raise ValueError(f"{label}: the training loss is {loss} at step {t}; lower --lr or rho")
                curve["step"].append(t)
                curve["loss"].append(loss)
                curve["lr"].append(lr)
                curve["sigma"].append(runner.sigma(t))
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                    bar.update(1)
        train_s = time.perf_counter() - t_train
        runner.finish()  # Bi-LoRA: the auxiliary adapter goes before evaluation and saving
        if bar is not None:
            bar.close()
        t_eval = time.perf_counter()
        metrics = evaluate_all(task, model, splits, cfg, device)
        eval_s = time.perf_counter() - t_eval
        save_adapter(model, method, str(tmp / ADAPTER_DIR), initial_dir)
        if initial_dir is not None:
            import shutil

            shutil.rmtree(initial_dir, ignore_errors=True)
        timed = step_times[1:] or step_times
        info = {
            "label": label, "task": cfg.task, "method": method, "rank": rank, "seed": seed,
            "description": spec.description,
            "rho": runner.rho,
            "steps": steps, "n_train": n_train, "trainable_params": n_trainable,
            "metrics": metrics,
            "final_running_loss": sum(curve["loss"][-10:]) / len(curve["loss"][-10:]),
            "timings": {"build_s": build_s, "train_s": train_s, "eval_s": eval_s,
                        "step_s_mean": sum(timed) / len(timed), "step_s_first": step_times[0],
                        "peak_memory_mib": mem.peak_mib, "memory_kind": "cuda_allocated" if device.type == "cuda"
                        else "process_rss", "device": str(device), "threads": torch.get_num_threads()},
            "config": cfg.to_dict(),
            "versions": _versions(),
        }
        write_json_atomic(tmp / CURVE_FILE, curve)
        write_json_atomic(tmp / RUN_FILE, info)
    log(f"{label}: test acc {metrics['test_accuracy']:.4f}, ood acc {metrics['ood_accuracy']:.4f}, "
        f"train loss {metrics['train_loss']:.4f}, {info['timings']['step_s_mean']:.3f} s/step, "
        f"{train_s:.0f}s train + {eval_s:.0f}s eval")
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
