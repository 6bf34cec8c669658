"""`FlatLora`: put a PEFT model at ``W + E`` for one optimizer step, then back at ``W``.

    flat = FlatLora(peft_model, FlatLoraConfig(rho=0.05), total_steps=T)
    for t, batch in enumerate(loader, start=1):    # t = optimizer step, 1..T
        with flat.perturbed(t):                     # every micro-batch of step t sees the same E
            model(**batch).loss.backward()
        optimizer.step(); optimizer.zero_grad()

Two ways to run at ``W + E``; both draw the same ``E`` for the same ``(seed, t, noise_rank, layer)``
(`flatlora.noise.layer_noise_spec`):

* ``exact``: nothing is written. Each base layer computes ``op(x, W_base + E, b)`` through
  `flatlora.exact.PerturbedOp` (its ``forward`` is swapped for the context's lifetime only; a bitsandbytes layer
  computes ``x · (deq(W_base) + E)ᵀ + b``, `flatlora._quantized_op`), or, for layers whose output does not come
  from one base op (DoRA, some bitsandbytes layers: `flatlora.targets.noise_beside`), a forward hook adds
  ``op(x, E)`` to the LoRA layer's output. ``E`` is regenerated from its seed in backward (or, with
  ``keep_noisy_weight``, forward's ``W + E`` is kept for it). Base weights stay bit-identical in every dtype.
* ``inplace``: the paper's way: ``W_base += E`` on entry and ``W_base -= E`` (regenerated) on exit; fp32
  only, where the restore error is fp32 rounding (~1e-7 relative).

The noise scale is computed once per step from the merged weight (see `flatlora.targets`), before any
noise is applied, and kept as an ``(m,)`` fp32 vector per layer. The exact mode computes it in ``perturb``
(outside any ``torch.compile``'d forward), except under FSDP2 and DeepSpeed ZeRO-3, which hold the weights as
shards outside forward: there at each layer's first forward of the step, where they are whole, reused for the
later micro-batches (the in-place mode refuses both; `flatlora._sharding`). FSDP1 is refused.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from . import _sharding
from ._checks import check_int
from ._quantized_op import QuantizedExactLayer
from .config import FlatLoraConfig
from .exact import ExactLayer
from .integrations import check_fused_paths
from .noise import NoiseSpec, layer_noise_spec
from .schedule import sigma_at
from .targets import (Target, adapter_switch, check_coverage, check_ran, find_targets, noise_beside, runs_reference,
                      trained_adapters)


@dataclass
class _Applied:
    """What one ``perturb(t)`` changed, so ``restore()`` can undo exactly that."""

    step: int
    specs: list[tuple[Target, NoiseSpec]]  # inplace: all, at perturb(); exact: each layer at its first forward
    undo: list[Callable[[], None]] = field(default_factory=list)
    sigma: float = 0.0
    cache: dict[int, NoiseSpec] = field(default_factory=dict)
    routes: list[tuple[Target, ExactLayer]] = field(default_factory=list)  # exact mode: the routes installed


class FlatLora:
    """Flat-LoRA's weight perturbation for a PEFT model (see the module docstring for the protocol).

    Args:
        model: the model holding PEFT LoRA layers (a ``PeftModel``, or any module containing them).
        config: a `FlatLoraConfig` (default: ``FlatLoraConfig()``).
        total_steps: ``T``, the number of optimizer steps of the run; ``sigma_T = rho``.
    """

    def __init__(self, model: nn.Module, config: FlatLoraConfig | None = None, total_steps: int = 1) -> None:
        if config is None:
            config = FlatLoraConfig()
        if not isinstance(config, FlatLoraConfig):
            raise ValueError(f"config must be a FlatLoraConfig, got {type(config).__name__}")
        if check_int("total_steps", total_steps) <= 0:
            raise ValueError(f"total_steps={total_steps!r} must be > 0: the number of optimizer steps of the run")
        _sharding.check_not_fsdp1(model.named_modules())
        self.model = model
        self.config = config
        self.total_steps = total_steps
        self._targets = find_targets(model, config.target_modules, config.exclude_modules)
        self.mode = "exact" if config.mode == "auto" else config.mode
        if self.mode == "inplace":
            self._check_inplace()
        else:  # a fused LoRA kernel (Unsloth, Axolotl) that reads a target's weight itself: refused, naming the fix
            check_fused_paths(model, self.targets)
        self._applied: _Applied | None = None
        self._exact_layers: dict[Target, ExactLayer] = {}  # exact mode: each target's route, built at first use
        self._coverage_key: tuple | None = None  # active adapters when the coverage was last checked
        self._seen: set[int] = set()  # targets that ran perturbed in some step, or were already named (check_ran)

    # --- inspection ------------------------------------------------------------------------------------
    @property
    def targets(self) -> list[str]:
        """Module names of the perturbed layers, in noise-index order."""
        return [t.name for t in self._targets]

    @property
    def target_layers(self) -> list[Target]:
        return list(self._targets)

    @property
    def is_perturbed(self) -> bool:
        return self._applied is not None

    @property
    def noise_rank(self) -> int:
        """The process rank that enters the noise seed: this process's data-parallel rank, or 0 on every rank
        with ``same_noise_across_ranks`` (not the LoRA rank ``r``)."""
        return 0 if self.config.same_noise_across_ranks else _sharding.process_rank()

    @property
    def rank(self) -> int:
        """Deprecated alias of `noise_rank` (the process rank in the noise seed, not the LoRA rank)."""
        warnings.warn("FlatLora.rank is deprecated: use FlatLora.noise_rank (the process rank that enters the "
                      "noise seed)", DeprecationWarning, stacklevel=2)
        return self.noise_rank

    def sigma(self, t: int) -> float:
        """``sigma_t`` of the configured schedule at optimizer step ``t`` (``0 <= t <= total_steps``)."""
        return sigma_at(check_int("t", t), self.total_steps, self.config.rho, self.config.schedule)

    def noise_specs(self, t: int) -> list[tuple[Target, NoiseSpec]]:
        """Seed and row std of every layer's noise at step ``t``, from the current merged weights.

        Layers holding only inactive adapters are left out (`Target.in_use`): they are not perturbed now.
        Under FSDP2 or ZeRO-3 this all-gathers each layer's shards in turn: call it on every rank together.
        """
        sigma = self.sigma(t)
        self._check_not_fsdp1()
        return [(target, self._layer_spec(target, t, sigma)) for target in self._targets if target.in_use()]

    def _layer_spec(self, target: Target, t: int, sigma: float, in_forward: bool = False) -> NoiseSpec:
        """One layer's `NoiseSpec` at step ``t`` (`flatlora.noise.layer_noise_spec`): row norms of its whole
        merged weight in fp32, seed from ``(config.seed, t, noise_rank, target.index)``. ``in_forward``: called
        from the layer's forward, where sharded parameters are gathered already (`flatlora._sharding.whole_params`)."""
        with _sharding.whole_params(self.model, target, in_forward), _no_autocast(target.base.weight):
            w = target.merged_weight()
        return layer_noise_spec(w, sigma, seed=self.config.seed, step=t, rank=self.noise_rank, layer=target.index,
                                keep=self.config.keep_noisy_weight)

    def _step_spec(self, applied: _Applied, target: Target, in_forward: bool) -> NoiseSpec:
        """The layer's spec for the applied step, computed at its first use and then reused.

        `_apply_exact` asks for it in ``perturb``, or, under FSDP2 and ZeRO-3, at the layer's first forward of the
        step, where the weights are whole (gathered for the forward); A and B do not change within a step, so
        every micro-batch (and backward) shares it. (Under DeepSpeed the optimizer steps inside the last
        micro-batch's backward, after every forward of the step: the spec is taken by then.)
        """
        spec = applied.cache.get(target.index)
        if spec is None:
            spec = applied.cache[target.index] = self._layer_spec(target, applied.step, applied.sigma, in_forward)
            applied.specs.append((target, spec))
        return spec

    def noise(self, t: int) -> dict[str, torch.Tensor]:
        """Materialise ``E`` of every layer at step ``t`` (logical layout, fp32): for checks and analysis."""
        return {target.name: spec.sample() for target, spec in self.noise_specs(t)}

    # --- perturbation ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def perturbed(self, t: int) -> Iterator["FlatLora"]:
        """Run the body at ``W + E_t``; the model is back at ``W`` afterwards, also if the body raises.

        On a normal exit, `restore` checks that the perturbed layers computed with their noise (exact mode):
        it raises ``RuntimeError`` when none did. A body that raised is never masked by that check.
        """
        self.perturb(t)
        completed = False
        try:
            yield self
            completed = True
        finally:
            self.restore(check=completed)

    def perturb(self, t: int) -> None:
        """Apply the noise of step ``t``. Pair with `restore` (the callback does); prefer `perturbed`."""
        if self._applied is not None:
            raise RuntimeError(
                f"the model is already perturbed for step {self._applied.step}; perturbed() does not nest: "
                "leave the first context (or call restore()) before perturbing again")
        sigma = self.sigma(t)
        self._check_not_fsdp1()
        if self.mode == "inplace":
            self._check_inplace()
        if sigma > 0:
            self._check_coverage(t, sigma)
        applied = _Applied(step=t, specs=[], sigma=sigma)
        try:
            if sigma > 0 and self.mode == "inplace":
                applied.specs = self.noise_specs(t)  # all norms before any noise is added
                for target, spec in applied.specs:
                    applied.undo.append(self._apply_inplace(target, spec, t))
            elif sigma > 0:  # exact: specs taken now, or at each layer's first forward when sharded (_apply_exact)
                for target in (tg for tg in self._targets if tg.in_use()):
                    in_forward = _sharding.sharded(target)  # whole only once forward gathers them
                    spec = functools.partial(self._step_spec, applied, target, in_forward)
                    applied.undo.append(self._apply_exact(target, spec, now=not in_forward))
                    applied.routes.append((target, self._exact_layers[target]))
        except BaseException:
            _undo_all(applied.undo)
            raise
        self._applied = applied

    def restore(self, check: bool | None = None) -> None:
        """Return the model to ``W`` (a no-op when it is not perturbed).

        Exact mode, ``sigma_t > 0``: then check which perturbed layers computed with their noise during the step
        (`flatlora.targets.check_ran`): ``RuntimeError`` when none did (a fused kernel reading
        ``base_layer.weight``, a model copied or re-wrapped after this `FlatLora` was built, no forward in the
        step); a warning naming the layers that never have, in this step or any before, unless
        ``config.allow_unperturbed`` matches them. ``check``: run that check; default (``None``): unless an
        exception is being handled, so a ``restore()`` in the ``finally`` of a failed step does not mask it.
        """
        applied, self._applied = self._applied, None
        if applied is None:
            return
        if check is None:
            check = sys.exc_info()[1] is None
        ran = {target.index for target, layer in applied.routes if layer.ran()}  # before undo: end() forgets it
        _undo_all(applied.undo)
        if check and applied.routes:
            check_ran([target for target, _ in applied.routes], ran, self._seen, self.config.allow_unperturbed,
                      f"step {applied.step} (sigma={applied.sigma:.3g})")

    # --- the two modes ---------------------------------------------------------------------------------
    def _apply_exact(self, target: Target, spec: Callable[[], NoiseSpec], now: bool) -> Callable[[], None]:
        """Route the layer through the perturbed op (`flatlora.exact.ExactLayer`); ``spec()`` gives its `NoiseSpec`,
        taken ``now`` or at the layer's first forward.

        Weights are read at call time, so under FSDP2 or ZeRO-3 the op sees the whole (gathered) weight, and
        backward (after they have gathered it again) regenerates the same ``E`` from the spec's seed.
        """
        layer = self._exact_layers.get(target)  # one route per target, reused every step
        if layer is None:  # bitsandbytes: deq(W) + E with one matmul (or the noise beside), `_quantized_op`
            route = QuantizedExactLayer if target.quantized else ExactLayer
            layer = self._exact_layers[target] = route(target.base, target.op, target.transposed,
                                                       adapter_switch(self.model, target))
        # The spec is taken now, outside any torch.compile'd region (its Python cannot be traced); under FSDP2 or
        # ZeRO-3 the weights are shards until forward gathers them, so at the layer's first forward (a graph break).
        layer.begin(spec, now=now)
        if noise_beside(target):  # the layer's output is not one base op(x, W, b): add op(x, E) to it
            handles = [target.module.register_forward_pre_hook(layer.take_spec),
                       target.module.register_forward_hook(layer.add_noise)]

            def remove() -> None:
                for handle in handles:
                    handle.remove()
                layer.end()

            return remove

        base = target.base
        base.forward = layer.forward  # an instance attribute: shadows the class's forward until deleted

        def unswap() -> None:
            base.__dict__.pop("forward", None)
            layer.end()

        return unswap

    def _apply_inplace(self, target: Target, spec: NoiseSpec, t: int) -> Callable[[], None]:
        """``W_base += E``; a reference-model forward (`runs_reference`) is refused while the noise is in the weight."""
        weight = target.base.weight
        with torch.no_grad():  # W += E block by block, never a full E (flatlora.noise.add_filter_noise)
            spec.add_to(target.logical(weight), inplace=True)
        switch = adapter_switch(self.model, target)
        handle = None if switch is None else target.module.register_forward_pre_hook(
            functools.partial(_refuse_reference, switch, trained_adapters(switch), target.name, t))

        def subtract() -> None:
            if handle is not None:
                handle.remove()
            with torch.no_grad():
                spec.add_to(target.logical(weight), subtract=True, inplace=True)

        return subtract

    def _check_coverage(self, t: int, sigma: float) -> None:
        """Refuse a step that would perturb nothing; warn about LoRA layers added after this `FlatLora` was built
        (`flatlora.targets.check_coverage`). Scans the model only when the active adapters changed since the
        last check (a scan walks every module; a new adapter only matters once activated, which changes them)."""
        key = tuple(sorted({a for tg in self._targets if tg.is_lora for a in tg.module.active_adapters}))
        if key == self._coverage_key and any(tg.in_use() for tg in self._targets):
            return
        check_coverage(self.model, self._targets, self.config.target_modules, self.config.exclude_modules,
                       f"step {t}: sigma={sigma:.3g}", key)
        self._coverage_key = key

    def _check_not_fsdp1(self) -> None:
        """FSDP1 may have wrapped the model after FlatLora was built (the model given here being the one inside)."""
        _sharding.check_not_fsdp1((f"{tg.name}.{n}".rstrip("."), m) for tg in self._targets
                                  for n, m in tg.module.named_modules())

    def _check_inplace(self) -> None:
        for target in self._targets:
            w = target.base.weight
            why = None
            if target.quantized:
                why = f"is quantized ({type(w).__name__})"
            elif w.dtype != torch.float32:
                why = f"is {w.dtype}, where adding and subtracting the noise does not cancel"
            elif _sharding.is_dtensor(w):
                why = "is a sharded DTensor (FSDP), which is only whole inside forward"
            elif _sharding.is_zero3(w):
                why = "is a DeepSpeed ZeRO-3 partition (ds_id), which is only whole inside forward"
            elif target.dora_adapter() is not None:
                why = "is a DoRA layer, whose weight normalisation would see the noise"
            if why:
                raise ValueError(f"mode='inplace' cannot perturb layer {target.name!r}: its base weight {why}; "
                                 "use mode='exact' (or 'auto'), which never writes base weights")

    def __repr__(self) -> str:
        return (f"FlatLora(mode={self.mode!r}, rho={self.config.rho}, schedule={self.config.schedule!r}, "
                f"total_steps={self.total_steps}, layers={len(self._targets)})")


def _refuse_reference(switch: nn.Module, trained: tuple[str, ...], name: str, t: int, module: nn.Module,
                      args: tuple) -> None:
    """Forward pre-hook of the in-place mode: a reference model would compute at ``W0 + E`` (`runs_reference`)."""
    if runs_reference(switch, trained):
        how = ("its adapters disabled (model.disable_adapter())" if switch.disable_adapters else
               f"adapters {list(switch.active_adapters)} active instead of {list(trained)} (set_adapter())")
        raise ValueError(
            f"layer {name!r} ran a forward with {how} inside perturbed({t}) with mode='inplace': a reference model "
            "(as TRL's DPO, KTO and GRPO's KL term compute inside the training step), but its base weight holds "
            "the noise, so that reference would be noisy. Use mode='exact' (or 'auto'), whose reference forwards "
            "compute with the clean weight")


def _undo_all(undo: list[Callable[[], None]]) -> None:
    """Run every undo step (newest first) even if one fails; re-raise the first failure."""
    error: BaseException | None = None
    for fn in reversed(undo):
        try:
            fn()
        except BaseException as exc:  # keep restoring the rest
            error = error or exc
    undo.clear()
    if error is not None:
        raise error


def _no_autocast(w: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off (norms in fp32 even when the first forward of a step runs under autocast)."""
    dev = w.device.type
    return torch.autocast(dev, enabled=False) if torch.is_autocast_enabled(dev) else contextlib.nullcontext()
