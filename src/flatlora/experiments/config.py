"""`ExperimentConfig`: one validated, serialisable description of a `flatlora compare` run, and its presets.

A compare trains every ``method`` x ``rank`` x ``seed`` on one task with the same data order, initialisation
and dropout masks per seed, so that method differences are paired. Presets are named starting points; every
field can be overridden by a flag or a YAML/JSON file (``--config``), and the resolved config is written to
the run folder as ``config.yaml``, which loads back to the same config.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from .. import _dataclass_io as dio
from .._checks import check_choice, check_count, check_counts, check_number

CORE_METHODS = ["lora", "flat-lora", "lora-sam", "sam-w"]


@dataclass
class ExperimentConfig(dio.DataclassIO):
    """What to train and how; see ``flatlora compare --help`` for every field."""

    name: str = dio.help_field("default", "run-folder name under ./runs/ (when --out is not given)")
    preset: str = dataclasses.field(default="default", metadata={
        "help": "the preset these values started from (informational; choose one with --preset)", "cli": False})
    task: str = dio.help_field("text", "task: text (Rotten Tomatoes, MiniLM) or vision (Fashion-MNIST, EffNet-Lite0)")
    methods: list[str] = dio.help_field(list(CORE_METHODS), "methods to compare (see `flatlora compare --list`)")
    seeds: list[int] = dio.help_field([0, 1, 2], "seeds: each fixes data order, LoRA init, dropout and noise")
    ranks: list[int] = dio.help_field([8], "LoRA ranks (more than one = a rank sweep)")
    alpha_over_rank: float = dio.help_field(2.0, "lora_alpha = alpha_over_rank * rank (paper: r 8, alpha 16)")
    lora_dropout: float = dio.help_field(0.0, "dropout on the LoRA input")
    model_dropout: float | None = dio.help_field(None, "dropout inside the backbone (None: the model's own)")
    train_size: int | None = dio.help_field(None, "training examples (None: the whole training split)")
    test_size: int | None = dio.help_field(None, "in-domain test examples (None: the whole test split)")
    ood_size: int | None = dio.help_field(None, "out-of-domain examples per set (None: all)")
    epochs: float = dio.help_field(1.0, "passes over the training set")
    max_steps: int | None = dio.help_field(None, "stop after this many optimizer steps (overrides epochs)")
    batch_size: int = dio.help_field(32, "examples per optimizer step")
    lr: float = dio.help_field(
        2e-3, "peak AdamW learning rate (paper: 5e-4 over 10 epochs; the presets' short runs need a larger one, "
              "see docs/experiments.md)")
    weight_decay: float = dio.help_field(0.0, "AdamW weight decay")
    warmup_ratio: float = dio.help_field(0.06, "fraction of steps with linear warm-up; then linear decay to 0")
    max_grad_norm: float = dio.help_field(1.0, "gradient clipping (0 = off)")
    rho: list[float] | None = dio.help_field(
        None, "Flat-LoRA rho (None: the task's default, 0.05 text / 0.15 vision); several values = a rho sweep, "
              "each Flat-LoRA method then runs at each (labelled e.g. flat-lora-rho0.1) against one baseline run")
    sam_rho: float = dio.help_field(0.003, "rho of lora-sam, SAM on A and B (paper's best: 0.003)")
    sam_w_rho: float = dio.help_field(0.05, "rho of sam-w, SAM on the merged weight W (paper's best: 0.05)")
    bi_lora_rho: float = dio.help_field(0.05, "bi-lora: radius of the auxiliary adapter's perturbation (the paper's "
                                              "GLUE/T5 and Llama setting, Appendix R)")
    bi_lora_norm: str = dio.help_field(
        "scaled", "bi-lora: which norm the radius bounds: scaled (||s2 B2 A2||, the merged weight's perturbation; "
                  "the paper omits s \"as it can be incorporated into B and A\") or unscaled (||B2 A2||, its "
                  "formula taken literally)")
    eflat_rho: float = dio.help_field(
        0.05, "eflat-lora: rho_0 of EFlat-LoRA's full-weight perturbation (our choice: its text shows 0.05 and 0.2 "
              "for Qwen-VL, its per-task tables were unreadable; docs/peers.md)")
    eflat_schedule: str = dio.help_field(
        "inv-sqrt", "eflat-lora: inv-sqrt (rho_t = rho_0 / sqrt(t), the only schedule the paper writes down: \"we "
                    "reduce rho progressively\", Theorem 2) or constant (rho_t = rho_0, as SAM)")
    eflat_norm: str = dio.help_field(
        "layer", "eflat-lora: layer (each layer's perturbation has norm rho_t: eq. 9 is per weight matrix and "
                 "Theorem 1's proof normalises by the layer's ||G_t||_F) or global (one norm over all layers, SAM)")
    eflat_beta: float = dio.help_field(
        0.5, "eflat-lora: EMA weight of the newest perturbation, in (0, 1] (our choice: not in the paper's text "
             "available here; 1 = reuse the previous step's perturbation only)")
    max_length: int = dio.help_field(64, "text: tokens per example (longer ones are cut)")
    image_size: int = dio.help_field(64, "vision: input resolution in pixels")
    severities: list[int] = dio.help_field([1, 2, 3, 4, 5], "vision: corruption severities evaluated (1..5)")
    corruptions: list[str] = dio.help_field(["gaussian_noise", "contrast", "blur"],
                                            "vision: corruption types of the out-of-domain sets")
    eval_batch_size: int = dio.help_field(128, "batch size of evaluation")
    train_loss_size: int = dio.help_field(1024, "training examples on which the final (clean) train loss is measured")
    data_seed: int = dio.help_field(0, "seed of the data split and subsets (fixed across seeds and methods)")
    label_noise: float = dio.help_field(0.0, "fraction of training labels replaced by another class, drawn once "
                                             "from data_seed (the same for every seed and method); test and "
                                             "out-of-domain sets stay clean")
    sharpness_batches: int = dio.help_field(0, "after training, measure flatness on this many training batches of "
                                               "32 (flatlora.analysis: expected and SAM sharpness, top Hessian "
                                               "eigenvalue of the merged weights); 0 = not measured")
    sharpness_rho: float = dio.help_field(0.5, "noise strength of the expected-sharpness probe (one value for every "
                                               "method, so runs compare; at a converged MiniLM run 0.2 left the "
                                               "signal below its Monte-Carlo error, 0.5 gave ~4 standard errors)")
    sharpness_samples: int = dio.help_field(16, "noise samples of the expected sharpness")
    sharpness_sam_rho: float = dio.help_field(0.05, "radius of the SAM-sharpness probe (full and LoRA space)")
    hessian_iters: int = dio.help_field(8, "Lanczos steps of the top Hessian eigenvalue (on the first sharpness "
                                           "batch; 0 = skip)")
    also_against: list[str] = dio.help_field(
        [], "report only: every other method is also paired against each of these methods (e.g. flat-lora), "
            "seed by seed; a pair whose initial adapters differ (ALoRA's gated 2r network against LoRA) is marked "
            "'different init'")
    device: str = dio.help_field("auto", "auto (cuda if available), cpu or cuda")
    threads: int | None = dio.help_field(None, "torch CPU threads (None: torch's default)")

    def __post_init__(self) -> None:
        from .methods import METHODS
        from .tasks import validate_config

        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            elem, is_list = dio.base_type(hints[f.name])
            v = getattr(self, f.name)
            if not is_list or v is None:  # None: an optional list left unset (rho: the task's default)
                continue
            if isinstance(v, (str, int)) or (elem is float and isinstance(v, float)):
                v = [v]  # every list field (a task's own too) also takes one value
            setattr(self, f.name, list(v))
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"name={self.name!r} must be a plain folder name such as 'default'")
        if not self.methods:
            raise ValueError("methods is empty; give at least one, e.g. --methods lora flat-lora")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods {self.methods} lists a method twice")
        check_counts("seeds", self.seeds, 0)
        check_counts("ranks", self.ranks, 1)
        if not self.seeds or not self.ranks:
            raise ValueError("seeds and ranks need at least one value each")
        if len(set(self.seeds)) != len(self.seeds) or len(set(self.ranks)) != len(self.ranks):
            raise ValueError(f"seeds {self.seeds} / ranks {self.ranks} must not repeat values")
        for name in ("train_size", "test_size", "ood_size", "max_steps", "threads"):
            check_count(name, getattr(self, name), optional=True)
        for name in ("batch_size", "eval_batch_size", "train_loss_size"):
            check_count(name, getattr(self, name))
        for name in ("epochs", "lr"):
            check_number(name, getattr(self, name), 0, above=True)
        for name in ("weight_decay", "max_grad_norm", "sam_rho", "sam_w_rho", "alpha_over_rank"):
            check_number(name, getattr(self, name), 0)
        if self.rho is not None:
            if not self.rho:
                raise ValueError("rho is an empty list; give one value or more, or leave it unset for the task's "
                                 "default")
            for v in self.rho:
                check_number("rho", v, 0)
            if len(set(self.rho)) != len(self.rho):
                raise ValueError(f"rho {self.rho} must not repeat values")
        from .peers import BI_LORA_NORMS, EFLAT_NORMS, EFLAT_SCHEDULES

        check_number("bi_lora_rho", self.bi_lora_rho, 0, above=True)
        check_choice("bi_lora_norm", self.bi_lora_norm, BI_LORA_NORMS)
        check_number("eflat_rho", self.eflat_rho, 0)
        check_number("eflat_beta", self.eflat_beta, 0, above=True)
        if self.eflat_beta > 1:
            raise ValueError(f"eflat_beta={self.eflat_beta!r} must be in (0, 1]: the EMA weight of the newest "
                             "perturbation (1 = no averaging)")
        check_choice("eflat_schedule", self.eflat_schedule, EFLAT_SCHEDULES)
        check_choice("eflat_norm", self.eflat_norm, EFLAT_NORMS)
        check_number("label_noise", self.label_noise, 0, 1)
        check_count("sharpness_batches", self.sharpness_batches, 0)
        check_count("sharpness_samples", self.sharpness_samples)
        check_count("hessian_iters", self.hessian_iters, 0)
        for name in ("sharpness_rho", "sharpness_sam_rho"):
            check_number(name, getattr(self, name), 0, above=True)
        check_number("model_dropout", self.model_dropout, 0, 1, optional=True)
        check_number("warmup_ratio", self.warmup_ratio, 0, 1)
        check_number("lora_dropout", self.lora_dropout, 0, 1)
        missing = [m for m in self.also_against if m not in self.methods]
        if missing:
            raise ValueError(f"also_against={missing} names method(s) not in methods {self.methods}; add them to "
                             "--methods or drop them from --also-against")
        check_choice("device", self.device, {"auto": "cuda when available, else cpu", "cpu": "CPU only",
                                             "cuda": "a GPU"})
        validate_config(self)  # the task's name and the task-specific fields (max_length, image_size, ...)

    # --- derived values ----------------------------------------------------------------------------------
    def flat_rhos(self) -> list[float]:
        """The Flat-LoRA rho values of this compare (the task's default when ``rho`` is unset)."""
        from .tasks import get_task

        return [float(v) for v in self.rho] if self.rho is not None else [get_task(self.task).default_rho]

    def run_labels(self) -> list[tuple[str, int, int, str, float]]:
        """``(method, rank, seed, relative run dir, flat rho)`` of every run, in execution order (seed-major);
        a method without Flat-LoRA steps runs once per rank and seed (its rho entry is the first rho)."""
        from .methods import uses_flat_rho

        out = []
        for seed in self.seeds:
            for rank in self.ranks:
                for method in self.methods:
                    for rho in (self.flat_rhos() if uses_flat_rho(method) else self.flat_rhos()[:1]):
                        out.append((method, rank, seed, f"{self.method_label(method, rank, rho)}/seed{seed}", rho))
        return out

    def method_label(self, method: str, rank: int, rho: float | None = None) -> str:
        """``method``, with ``-r<rank>`` in a rank sweep and ``-rho<rho>`` (Flat-LoRA methods) in a rho sweep."""
        from .methods import uses_flat_rho

        label = method if len(self.ranks) == 1 else f"{method}-r{rank}"
        if rho is not None and len(self.flat_rhos()) > 1 and uses_flat_rho(method):
            label += f"-rho{rho:g}"
        return label


_MAP_TEXT: dict[str, Any] = dict(train_size=256, epochs=20.0, batch_size=16, test_size=None, ood_size=2000,
                                 max_length=32, train_loss_size=256, seeds=[0, 1, 2, 3, 4], rho=[0.05, 0.1, 0.2],
                                 sharpness_batches=4)

_MAP_VISION: dict[str, Any] = dict(task="vision", train_size=512, epochs=15.0, test_size=2000, ood_size=400,
                                   image_size=48, train_loss_size=512, seeds=[0, 1, 2, 3, 4], sharpness_batches=4)

# Presets: named starting points. Sizes were chosen from step times measured on the 2-core machine
# (docs/experiments.md); `flatlora compare --preset NAME --dry-run` prints the resolved config and run count.
PRESETS: dict[str, dict[str, Any]] = {
    # The main job (`make demo`), where the regime map found Flat-LoRA to help: vision under corruption, R2's
    # setting (`map-vision`) at half its training set, so that 10 runs fit in a few minutes on 2 cores. Sizes
    # chosen for cost only, before any Flat-LoRA run in this setting (docs/experiments.md, "The main job"): a
    # LoRA pilot on seed 99 (not a study seed) reached a clean train loss of 0.0014 in these 120 steps.
    "default": dict(name="default", task="vision", methods=["lora", "flat-lora"], train_size=256, epochs=15.0,
                    batch_size=32, image_size=48, test_size=1000, ood_size=200, train_loss_size=256,
                    seeds=[0, 1, 2, 3, 4], sharpness_batches=2, hessian_iters=0),
    # The text regime, trained to convergence (the main job until 2026-12-03): 128 snippets x 20 epochs at batch 16
    # = 160 steps (a LoRA pilot, seed 99, reached a clean train loss of 0.003 in 200 such steps), 4 methods x 5
    # seeds, flatness (expected and SAM sharpness) measured on every run. ~17 min on 2 idle cores (0.16 s per LoRA
    # step, SAM steps 2x, ~12 s of evaluation and flatness per run). Flat-LoRA does not differ from LoRA here.
    "text": dict(name="text", train_size=128, epochs=20.0, batch_size=16, test_size=1000, ood_size=1000,
                 max_length=32, train_loss_size=128, seeds=[0, 1, 2, 3, 4], sharpness_batches=4, hessian_iters=0),
    # the former default: 960 snippets x 2 epochs = 60 steps, far from convergence (train loss ~0.46)
    "short": dict(name="short", train_size=960, epochs=2.0, test_size=500, ood_size=500, max_length=32,
                  train_loss_size=256),
    # few data, several epochs: where LoRA overfits and flatness should matter most (~9 min idle)
    "small-data": dict(name="small-data", train_size=1000, epochs=3.0, test_size=500, ood_size=500,
                       max_length=32, train_loss_size=256, methods=["lora", "flat-lora"], seeds=[0, 1, 2, 3]),
    # more seeds and the full training split (hours on a CPU)
    "full": dict(name="full", epochs=3.0, seeds=[0, 1, 2, 3, 4], max_length=64),
    # gains are said to grow with rank
    "rank-sweep": dict(name="rank-sweep", ranks=[4, 16, 64], methods=["lora", "flat-lora"], train_size=1600,
                       epochs=3.0, test_size=1000, ood_size=1000, max_length=48),
    # Flat-LoRA composed with other LoRA variants
    "variants": dict(name="variants", methods=["lora", "flat-lora", "lora-ga", "lora-ga+flat", "adalora",
                                               "adalora+flat"],
                     train_size=1600, epochs=2.0, test_size=1000, ood_size=1000, max_length=48),
    # vision default: Fashion-MNIST with corrupted test sets
    "vision": dict(name="vision", task="vision", train_size=2000, epochs=2.0, test_size=1000, ood_size=500,
                   image_size=48),
    # --- the regime map (docs/experiments.md; pre-registered before any of its runs) -----------------------
    # Text trained to convergence on few data: 256 snippets x 20 epochs at batch 16 = 320 steps. Chosen from LoRA
    # pilots on seed 99 (not a study seed) by their clean train loss and cost only: batch 32 x 30 epochs reached
    # 0.027, batch 16 reached 0.003 on 128 snippets in 200 steps at half the step time. Every run measures its
    # flatness.
    **{f"map-text-r{r}": dict(name=f"map-text-r{r}", ranks=[r], methods=methods, **_MAP_TEXT)
       for r, methods in ((8, ["lora", "flat-lora", "lora-sam", "sam-w"]), (64, ["lora", "flat-lora"]))},
    # the same text regime with 20% of the training labels flipped: where flat minima should matter most
    "map-label-noise": dict(name="map-label-noise", **{**_MAP_TEXT, "rho": [0.05, 0.2]}, methods=["lora", "flat-lora"],
                            label_noise=0.2),
    # vision trained to convergence: 512 Fashion-MNIST images x 15 epochs = 240 steps (a LoRA pilot, seed 99:
    # clean train loss 0.0002 after 20 epochs), every corruption type at every severity
    "map-vision": dict(name="map-vision", **_MAP_VISION, rho=[0.15, 0.3], methods=["lora", "flat-lora"]),
    # the peer map (docs/experiments.md, pre-registered before any of its runs): every flat-minimum LoRA method in
    # the map's vision regime, Flat-LoRA at rho 0.15; the peers at their defaults (their papers' settings)
    "peer-map-vision": dict(name="peer-map-vision", **_MAP_VISION, rho=[0.15],
                            methods=["lora", "flat-lora", "lora-sam", "sam-w", "bi-lora", "eflat-lora", "alora",
                                     "alora+flat"], also_against=["lora", "flat-lora"]),
    # CI: every method on a tiny subset, a few steps
    "smoke": dict(name="smoke", methods=["lora", "flat-lora", "lora-sam", "sam-w"], seeds=[0, 1], train_size=48,
                  max_steps=3, batch_size=16, test_size=32, ood_size=32, max_length=24, eval_batch_size=32,
                  train_loss_size=32, image_size=32, severities=[1, 5], corruptions=["gaussian_noise", "contrast"]),
}


def preset(name: str, /, **overrides: Any) -> ExperimentConfig:
    """The preset ``name`` with ``overrides`` applied (validated)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[name])
    values["preset"] = name
    values.update(overrides)
    return ExperimentConfig(**values)
