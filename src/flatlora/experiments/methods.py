"""The compared methods (`METHODS`) and how one optimizer step computes their gradients (`Method`).

A method is an initialisation (``lora``: PEFT's default, ``lora-ga``: PEFT's LoRA-GA from gradient SVD,
``adalora``: PEFT's AdaLoRA, ``alora``: PEFT LoRA at rank ``2r`` gated to ``r`` open ranks per module and
reallocated by `flatlora.alora.ALoRA`; built and saved by `flatlora.experiments.adapters`) combined with a
gradient rule:

* ``plain``: ``g = grad L(W)``.
* ``flat`` (Flat-LoRA, through the public `flatlora.FlatLora` API): ``g = grad L(W + E_t)`` with the
  filter-wise random noise of step ``t``; the model is back at ``W`` before the optimizer step.
* ``sam-ab`` (LoRA-SAM, the baseline of the paper): two passes. ``g1 = grad_{A,B} L``, then
  ``g = grad L`` at ``(A, B) + rho g1 / ||g1||`` (the norm over all LoRA parameters), as in davda54/sam.
* ``sam-w`` (SAM on the merged weight): ``G = dL/dW`` for every LoRA layer's merged weight ``W`` (equal to
  the gradient of its base weight, since ``W = W_base + delta`` additively), then ``g = grad L`` at
  ``W + rho G / ||G||``. Costs two passes and ``O(mn)`` memory per layer (``G`` and a copy of ``W_base``).
* ``bi-lora`` (Bi-LoRA, `flatlora.experiments.peers`): one pass at ``W0 + s1 B1 A1 + s2 B2 A2``; the auxiliary
  adapter's gradients are negated (ascent through the same optimizer) and it is clipped into a global
  ``rho``-ball after each step; deleted by `Method.finish` before evaluation and saving.
* ``eflat`` (EFlat-LoRA, `flatlora.experiments.peers`): one pass at ``B + Ê_{t-1}``, the EMA of SAM's
  full-weight perturbation moved onto ``B``; the weights are back at ``W`` afterwards.

The SAM rules and the peers are baselines implemented here as step wrappers; they are not part of the flatlora
API. Every rule leaves ``.grad`` set and the weights exactly at ``W``; the training loop then clips, steps the
optimizer and the schedule, calls `Method.after_step`, and zeroes the gradients; after the last step it calls
`Method.finish`.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

LossFn = Callable[[nn.Module, dict], torch.Tensor]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    init: str  # lora | lora-ga | adalora | alora
    rule: str  # plain | flat | sam-ab | sam-w | bi-lora | eflat
    description: str


_SPECS = [
    MethodSpec("lora", "lora", "plain", "LoRA (PEFT defaults: A Kaiming-uniform, B = 0)"),
    MethodSpec("flat-lora", "lora", "flat", "Flat-LoRA: gradients at W + E_t (filter-wise noise, cosine rho)"),
    MethodSpec("lora-sam", "lora", "sam-ab", "SAM on the LoRA factors A, B (two passes)"),
    MethodSpec("sam-w", "lora", "sam-w", "SAM on the merged weight W of every LoRA layer (two passes, O(mn))"),
    MethodSpec("lora-ga", "lora-ga", "plain", "LoRA-GA initialisation (PEFT), plain steps"),
    MethodSpec("lora-ga+flat", "lora-ga", "flat", "LoRA-GA initialisation with Flat-LoRA steps"),
    MethodSpec("adalora", "adalora", "plain", "AdaLoRA (PEFT), plain steps"),
    MethodSpec("adalora+flat", "adalora", "flat", "AdaLoRA with Flat-LoRA steps"),
    MethodSpec("alora", "alora", "plain", "ALoRA: AB-LoRA rank reallocation (r open of 2r slots per module)"),
    MethodSpec("alora+flat", "alora", "flat", "ALoRA with Flat-LoRA steps"),
    MethodSpec("bi-lora", "lora", "bi-lora", "Bi-LoRA: an auxiliary LoRA ascends inside a rho-ball in the same pass"),
    MethodSpec("eflat-lora", "lora", "eflat", "EFlat-LoRA: SAM's full-weight perturbation on B, EMA-reused (one pass)"),
]
METHODS: dict[str, MethodSpec] = {s.name: s for s in _SPECS}
ALORA_HELDOUT = 32  # held-out examples of ALoRA's scores (the paper: one validation batch of 32)


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def uses_flat_rho(name: str) -> bool:
    """Whether method ``name`` takes Flat-LoRA steps, so that its runs depend on the config's ``rho``."""
    return get_method(name).rule == "flat"


def paired_baseline(name: str) -> str | None:
    """The method a method is compared with in the paired-difference table (same data, seeds, init)."""
    if name.endswith("+flat"):
        return name[: -len("+flat")]
    return None if name == "lora" else ("lora" if get_method(name).init == "lora" else None)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run library code that draws from torch's global RNG (PEFT's init, dropout) from a fixed seed,
    leaving the caller's global RNG state exactly as it was (``fork_rng`` saves and restores it)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# --- ALoRA: held-out scoring examples and the schedule --------------------------------------------
def heldout_examples(task: Any, cfg: Any, n: int | None = None) -> Any:
    """``n`` examples of the training pool that the run never trains on, for ALoRA's scores.

    The tasks draw their training subset as the first ``train_size`` examples of a seeded permutation of the
    pool, so the subset of ``train_size + n`` examples holds the training set followed by ``n`` unseen ones; this
    is checked (the first ``train_size`` must equal the training set), not assumed. The paper scores on a
    validation batch; the tasks have no validation split, and taking examples out of the training set would
    change the data of the ALoRA rows only.
    """
    n = ALORA_HELDOUT if n is None else n
    if cfg.train_size is None:
        raise ValueError("ALoRA scores ranks on held-out examples of the training pool: set train_size (the whole "
                         "training split leaves none held out)")
    train = task.splits(cfg).train
    bigger = task.splits(cfg.replace(train_size=cfg.train_size + n)).train
    head = bigger.take(slice(0, len(train)))
    if len(bigger) != len(train) + n or any(not torch.equal(head.tensors[k], v) for k, v in train.tensors.items()):
        raise ValueError(f"task {cfg.task!r} does not draw its training subset as a prefix of one permutation, so "
                         "ALoRA's held-out examples cannot be taken from its pool")
    return bigger.take(slice(len(train), len(train) + n))


def alora_config(rank: int, total_steps: int, steps_per_epoch: int, seed: int) -> Any:
    """The paper's schedule in steps: warm-up 1 epoch (K1), a round every 0.25 epoch (K2), at most 8 rounds
    (N_A), only rounds that leave training steps after them; ``ranks_per_round`` = one per module kind.

    A run of one epoch or less leaves no round: a ``RuntimeWarning`` says so (the run is plain LoRA on the gated
    ``2r`` network, its gates never move), and run.json records ``alora.rounds == []``."""
    from ..alora import ALoRAConfig

    warm, every = max(1, steps_per_epoch), max(1, round(0.25 * steps_per_epoch))
    rounds = sum(1 for k in range(8) if warm + k * every < total_steps)
    if rounds == 0:
        warnings.warn(f"ALoRA: {total_steps} training steps leave no reallocation round (its warm-up K1 is one epoch "
                      f"= {warm} steps, and a round needs steps after it), so this run is plain LoRA on the gated "
                      f"network with its initial ranks; train for more than one epoch (epochs > 1 or max_steps > "
                      f"{warm})", RuntimeWarning, stacklevel=2)
    return ALoRAConfig(init_rank=rank, warmup_steps=warm, interval_steps=every, rounds=rounds, seed=seed)


# --- gradient rules ------------------------------------------------------------------------------------
class Method:
    """Computes the gradients of one optimizer step for ``spec.rule``; see the module docstring."""

    def __init__(self, spec: MethodSpec, model: nn.Module, loss_fn: LossFn, *, total_steps: int, seed: int,
                 rho: float, sam_rho: float, sam_w_rho: float, heldout: Callable[[], list[dict]] | None = None,
                 steps_per_epoch: int | None = None, bi_lora: dict[str, Any] | None = None,
                 eflat: dict[str, Any] | None = None) -> None:
        self.spec = spec
        self.model = model
        self.loss_fn = loss_fn
        self.total_steps = total_steps
        self.flat = None
        if spec.rule == "flat":
            from flatlora import FlatLora, FlatLoraConfig

            self.flat = FlatLora(model, FlatLoraConfig(rho=rho, seed=seed), total_steps=total_steps)
        self.sam_rho = sam_rho
        self.sam_w_rho = sam_w_rho
        self.lora_params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self._bases = _lora_base_layers(model) if spec.rule == "sam-w" else []
        self.bilora = self.eflat = self.alora = None
        self._radius = 0.0
        self._aux_params = 0
        if spec.rule == "bi-lora":
            from .peers import BI_LORA_AUX, BiLoRA

            self.bilora = BiLoRA(model, **(bi_lora or {}))  # rho, norm
            self._aux_params = sum(p.numel() for n, p in model.named_parameters()
                                   if p.requires_grad and f".{BI_LORA_AUX}." in n)
        elif spec.rule == "eflat":
            from .peers import EFlatLoRA

            self.eflat = EFlatLoRA(model, **(eflat or {}))  # rho, beta, schedule, norm
        if self.bilora is not None or self.eflat is not None:
            self._radius = (self.bilora or self.eflat).rho  # kept: Bi-LoRA's rule is gone after `finish`
        if spec.init == "alora":
            from ..alora import ALoRA

            if heldout is None or steps_per_epoch is None:
                raise ValueError("ALoRA methods need heldout (a function returning the scoring batches) and "
                                 "steps_per_epoch (its schedule is in epochs)")
            self.alora = ALoRA(model, alora_config(_open_ranks(model), total_steps, steps_per_epoch, seed),
                               heldout(), loss_fn)

    @property
    def rho(self) -> float:
        """The rule's radius or noise level (0 for plain steps), as recorded in run.json."""
        radius = {"flat": self.flat.config.rho if self.flat is not None else 0.0, "sam-ab": self.sam_rho,
                  "sam-w": self.sam_w_rho, "bi-lora": self._radius, "eflat": self._radius}
        return radius.get(self.spec.rule, 0.0)

    def sigma(self, t: int) -> float:
        """Flat-LoRA's noise level at step t (0 for the other rules)."""
        return self.flat.sigma(t) if self.flat is not None else 0.0

    def grads(self, t: int, batch: dict) -> float:
        """Set ``.grad`` of the trainable parameters for step ``t``; returns the loss of the first pass."""
        rule = self.spec.rule
        if rule == "plain":
            return self._backward(batch)
        if rule == "flat":
            with self.flat.perturbed(t):
                return self._backward(batch)
        if rule == "sam-ab":
            return self._sam_ab(batch)
        if rule == "bi-lora":
            loss = self._backward(batch)
            self.bilora.ascend()
            return loss
        if rule == "eflat":
            return self.eflat.step(t, lambda: self._backward(batch))
        return self._sam_w(batch)

    def after_step(self, t: int, optimizer: Any = None) -> None:
        """Called after ``optimizer.step()``, before ``zero_grad``: AdaLoRA's and ALoRA's rank allocation
        (ALoRA resets the optimizer state of reopened ranks when given ``optimizer``), Bi-LoRA's clipping."""
        if self.spec.init == "adalora":
            self.model.base_model.update_and_allocate(t)
        if self.alora is not None:
            self.alora.update(t, optimizer)
        if self.bilora is not None:
            self.bilora.clip()

    def param_counts(self, params: list[nn.Parameter]) -> dict[str, Any]:
        """``trainable_params`` as the papers count them, and the optimizer's other parameters beside it.

        ``params``: what the optimizer updates. ALoRA counts its open ranks (a rank of a module ``m x n`` is a row
        of ``A`` and a column of ``B``: ``n + m`` parameters; the final pattern), its closed slots are
        ``reserve_params``; Bi-LoRA counts the primary adapter, its auxiliary adapter is ``auxiliary_params``
        (counted before `finish` deletes it). Other trainable parameters (a classifier head) count for all.
        ``optimized_params`` is everything the optimizer held."""
        total = sum(p.numel() for p in params)
        out: dict[str, Any] = {"trainable_params": total, "optimized_params": total}
        if self.spec.rule == "bi-lora":
            out.update(trainable_params=total - self._aux_params, auxiliary_params=self._aux_params)
        if self.alora is not None:
            from ..alora.gates import gate_of

            reserve = 0
            for _, layer in self.alora.layers:
                a = layer.lora_A[self.alora.config.adapter].weight
                b = layer.lora_B[self.alora.config.adapter].weight
                per_rank = a[0].numel() + b[:, 0].numel()
                reserve += int((gate_of(layer) == 0).sum()) * per_rank
            out.update(trainable_params=total - reserve, reserve_params=reserve)
        return out

    def record(self) -> dict[str, Any]:
        """What run.json records of the rule beyond its radius: ALoRA's schedule, the rounds it ran (their steps
        and moves) and the final open ranks per module (``{}`` for the other rules)."""
        if self.alora is None:
            return {}
        c = self.alora.config
        rounds = [{"round": r.round, "step": r.step, "score_full": r.score_full, "pruned": [list(x) for x in r.pruned],
                   "opened": [list(x) for x in r.opened]} for r in self.alora.history]
        return {"alora": {"warmup_steps": c.warmup_steps, "interval_steps": c.interval_steps,
                          "scheduled_steps": c.round_steps(), "rounds": rounds, "ranks": self.alora.ranks()}}

    def finish(self) -> None:
        """Called once after the last step, before evaluation and saving: Bi-LoRA discards its auxiliary adapter."""
        if self.bilora is not None:
            self.bilora.discard()
            self.bilora = None

    def _backward(self, batch: dict) -> float:
        loss = self.loss_fn(self.model, batch)
        loss.backward()
        return float(loss.detach())

    def _zero(self) -> None:
        for p in self.trainable:
            p.grad = None

    def _sam_ab(self, batch: dict) -> float:
        loss = self._backward(batch)
        grads = [p.grad for p in self.lora_params]
        norm = _global_norm([g for g in grads if g is not None])
        eps = [None if g is None else g * (self.sam_rho / (norm + 1e-12)) for g in grads]
        self._zero()
        saved = [p.detach().clone() for p in self.lora_params]  # exact restore (p + e - e is not p in floats)
        try:
            with torch.no_grad():
                for p, e in zip(self.lora_params, eps):
                    if e is not None:
                        p.add_(e)
            self._backward(batch)
        finally:
            with torch.no_grad():
                for p, s in zip(self.lora_params, saved):
                    p.copy_(s)
        return loss

    def _sam_w(self, batch: dict) -> float:
        weights = [b.weight for b in self._bases]
        for w in weights:
            w.requires_grad_(True)
        try:
            loss = self._backward(batch)  # w.grad = dL/dW_base = dL/dW (W = W_base + delta)
            g_w = [w.grad for w in weights]
        finally:
            for w in weights:
                w.requires_grad_(False)
                w.grad = None
        norm = _global_norm([g for g in g_w if g is not None])
        self._zero()
        saved = [w.detach().clone() for w in weights]
        try:
            with torch.no_grad():
                for w, g in zip(weights, g_w):
                    if g is not None:
                        w.add_(g, alpha=self.sam_w_rho / (norm + 1e-12))
            del g_w
            self._backward(batch)
        finally:
            with torch.no_grad():
                for w, s in zip(weights, saved):
                    w.copy_(s)
        return loss


def _global_norm(tensors: list[torch.Tensor]) -> float:
    if not tensors:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in tensors])))


def _open_ranks(model: nn.Module) -> int:
    from ..alora import active_ranks

    counts = set(active_ranks(model).values())
    if len(counts) != 1:
        raise ValueError(f"the ALoRA model's modules start with different open ranks {sorted(counts)}")
    return counts.pop()


def _lora_base_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m.get_base_layer() for m in model.modules() if isinstance(m, LoraLayer)]


__all__ = ["METHODS", "Method", "MethodSpec", "alora_config", "get_method", "heldout_examples", "paired_baseline",
           "seeded", "uses_flat_rho"]
