"""`FlatLora`: put a PEFT model at ``W + E`` for one optimizer step, then back at ``W``.

    flat = FlatLora(peft_model, FlatLoraConfig(rho=0.05), total_steps=T)
    for t, batch in enumerate(loader, start=1):    # t = optimizer step, 1..T
        with flat.perturbed(t):                     # every micro-batch of step t sees the same E
            model(**batch).loss.backward()
        optimizer.step(); optimizer.zero_grad()

Two ways to run at ``W + E`` (both draw the same ``E`` for the same ``(seed, t, rank, layer)``):

* ``exact``: nothing is written. Each base layer computes ``op(x, W_base + E, b)`` through `PerturbedOp`
  (its ``forward`` is swapped for the context's lifetime only), or, for layers whose output does not come
  from one base matmul (DoRA, bitsandbytes), a forward hook adds ``op(x, E)`` to the LoRA layer's output.
  ``E`` is regenerated from its seed in backward. Base weights stay bit-identical in every dtype.
* ``inplace``: the paper's way: ``W_base += E`` on entry and ``W_base -= E`` (regenerated) on exit; fp32
  only, where the restore error is fp32 rounding (~1e-7 relative).

The noise scale is computed once per step from the merged weight (see `flatlora.targets`), before any
noise is applied, and kept as an ``(m,)`` fp32 vector per layer. The exact mode computes it in ``perturb``
(outside any ``torch.compile``'d forward), except under FSDP2, which holds the weights as DTensor row shards
outside forward: there at each layer's first forward of the step, where they are whole, reused for the later
micro-batches (the in-place mode refuses FSDP2).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from ._checks import check_int
from .config import FlatLoraConfig
from .exact import ExactLayer
from .noise import NoiseSpec, layer_seed, row_scale
from .schedule import sigma_at
from .targets import Target, find_targets, lora_layers_with_active_adapters


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _is_dtensor(w: torch.Tensor) -> bool:
    return type(w).__name__ == "DTensor"


def _sharded(target: Target) -> bool:
    """Whether the layer's parameters are DTensor shards now (FSDP2 outside forward): not whole before forward."""
    return any(_is_dtensor(p) for p in target.module.parameters())


def _fsdp_module_type() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return None
    return FSDPModule


def _owns_shards(unit: nn.Module, fsdp: type) -> bool:
    """Whether the FSDP2 unit's own parameters (not those of nested units) are sharded DTensors now."""
    nested = {id(p) for m in unit.modules() if m is not unit and isinstance(m, fsdp) for p in m.parameters()}
    return any(_is_dtensor(p) for p in unit.parameters() if id(p) not in nested)


@contextlib.contextmanager
def _whole_params(model: nn.Module, target: Target) -> Iterator[None]:
    """Make the layer's parameters whole for the body when FSDP2 holds them as DTensor shards.

    Inside a forward FSDP2 has already all-gathered them (nothing to do). Outside one (``noise_specs`` called
    by the user) this unshards the FSDP2 units owning them (the nearest unit at or above the layer and any
    unit inside it) and reshards them afterwards: a collective, so every rank must make the same call.
    """
    fsdp = _fsdp_module_type()
    if fsdp is None or not any(_is_dtensor(p) for p in target.module.parameters()):
        yield
        return
    modules = dict(model.named_modules())
    parts = target.name.split(".") if target.name else []
    owners = [m for m in target.module.modules() if isinstance(m, fsdp)]
    for i in range(len(parts), -1, -1):
        m = modules.get(".".join(parts[:i]))
        if isinstance(m, fsdp):
            owners.append(m)
            break
    sharded = [u for u in {id(u): u for u in owners}.values() if _owns_shards(u, fsdp)]
    if not sharded:
        raise ValueError(f"the parameters of layer {target.name!r} are FSDP2 shards, but no fully_shard unit inside "
                         "the model given to FlatLora owns them; build FlatLora on the model you called fully_shard on")
    for unit in sharded:
        unit.unshard()
    try:
        yield
    finally:
        for unit in sharded:
            unit.reshard()


def _no_autocast(w: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off (norms in fp32 even when the first forward of a step runs under autocast)."""
    dev = w.device.type
    return torch.autocast(dev, enabled=False) if torch.is_autocast_enabled(dev) else contextlib.nullcontext()


def _plain_forward(base: nn.Module) -> bool:
    """Whether the layer's class computes exactly ``op(x, W, b)``: torch's own Linear/ConvNd/Embedding
    forward, or GPT-2's Conv1D; a subclass overriding forward (e.g. an embedding that scales its output) is not."""
    if type(base).__name__ == "Conv1D":
        return True
    return type(base).forward in (nn.Linear.forward, nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward,
                                  nn.Embedding.forward)


@dataclass
class _Applied:
    """What one ``perturb(t)`` changed, so ``restore()`` can undo exactly that."""

    step: int
    specs: list[tuple[Target, NoiseSpec]]  # inplace: all, at perturb(); exact: each layer at its first forward
    undo: list[Callable[[], None]] = field(default_factory=list)
    sigma: float = 0.0
    cache: dict[int, NoiseSpec] = field(default_factory=dict)


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
        self.model = model
        self.config = config
        self.total_steps = total_steps
        self._targets = find_targets(model, config.target_modules, config.exclude_modules)
        self.mode = "exact" if config.mode == "auto" else config.mode
        if self.mode == "inplace":
            self._check_inplace()
        self._applied: _Applied | None = None
        self._coverage_key: tuple | None = None  # active adapters when the coverage was last checked

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
    def rank(self) -> int:
        """The rank that enters the noise seed (0 on every rank with ``same_noise_across_ranks``)."""
        return 0 if self.config.same_noise_across_ranks else _rank()

    def sigma(self, t: int) -> float:
        """``sigma_t`` of the configured schedule at optimizer step ``t`` (``0 <= t <= total_steps``)."""
        return sigma_at(check_int("t", t), self.total_steps, self.config.rho, self.config.schedule)

    def noise_specs(self, t: int) -> list[tuple[Target, NoiseSpec]]:
        """Seed and row std of every layer's noise at step ``t``, from the current merged weights.

        Layers holding only inactive adapters are left out (`Target.in_use`): they are not perturbed now.
        Under FSDP2 this all-gathers each layer's shards in turn: call it on every rank together.
        """
        sigma = self.sigma(t)
        return [(target, self._layer_spec(target, t, sigma)) for target in self._targets if target.in_use()]

    def _layer_spec(self, target: Target, t: int, sigma: float) -> NoiseSpec:
        """One layer's `NoiseSpec` at step ``t``: row norms of its whole merged weight in fp32."""
        with _whole_params(self.model, target), _no_autocast(target.base.weight):
            w = target.merged_weight()
        return NoiseSpec(layer_seed(self.config.seed, t, self.rank, target.index), row_scale(w, sigma), tuple(w.shape))

    def _step_spec(self, applied: _Applied, target: Target) -> NoiseSpec:
        """The layer's spec for the applied step, computed at its first use and then reused.

        `_apply_exact` asks for it in ``perturb``, or, under FSDP2, at the layer's first forward of the step,
        where the weights are whole (all-gathered for the forward); A and B do not change within a step, so
        every micro-batch (and backward) shares it.
        """
        spec = applied.cache.get(target.index)
        if spec is None:
            spec = applied.cache[target.index] = self._layer_spec(target, applied.step, applied.sigma)
            applied.specs.append((target, spec))
        return spec

    def noise(self, t: int) -> dict[str, torch.Tensor]:
        """Materialise ``E`` of every layer at step ``t`` (logical layout, fp32): for checks and analysis."""
        return {target.name: spec.sample() for target, spec in self.noise_specs(t)}

    # --- perturbation ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def perturbed(self, t: int) -> Iterator["FlatLora"]:
        """Run the body at ``W + E_t``; the model is back at ``W`` afterwards, also if the body raises."""
        self.perturb(t)
        try:
            yield self
        finally:
            self.restore()

    def perturb(self, t: int) -> None:
        """Apply the noise of step ``t``. Pair with `restore` (the callback does); prefer `perturbed`."""
        if self._applied is not None:
            raise RuntimeError(
                f"the model is already perturbed for step {self._applied.step}; perturbed() does not nest: "
                "leave the first context (or call restore()) before perturbing again")
        sigma = self.sigma(t)
        if self.mode == "inplace":
            self._check_inplace()
        if sigma > 0:
            self._check_coverage(t, sigma)
        applied = _Applied(step=t, specs=[], sigma=sigma)
        try:
            if sigma > 0 and self.mode == "inplace":
                applied.specs = self.noise_specs(t)  # all norms before any noise is added
                for target, spec in applied.specs:
                    applied.undo.append(self._apply_inplace(target, spec))
            elif sigma > 0:  # exact: each layer's spec at its first forward of the step (whole under FSDP2)
                for target in (tg for tg in self._targets if tg.in_use()):
                    spec = lambda target=target: self._step_spec(applied, target)  # noqa: E731
                    applied.undo.append(self._apply_exact(target, spec))
        except BaseException:
            _undo_all(applied.undo)
            raise
        self._applied = applied

    def restore(self) -> None:
        """Return the model to ``W`` (a no-op when it is not perturbed)."""
        applied, self._applied = self._applied, None
        if applied is not None:
            _undo_all(applied.undo)

    # --- the two modes ---------------------------------------------------------------------------------
    def _apply_exact(self, target: Target, spec: Callable[[], NoiseSpec]) -> Callable[[], None]:
        """Route the layer through the perturbed op (`flatlora.exact.ExactLayer`); ``spec()`` gives its `NoiseSpec`.

        Weights are read at call time, so under FSDP2 the op sees the whole (all-gathered) weight, and
        backward (after FSDP2 has all-gathered again) regenerates the same ``E`` from the spec's seed.
        """
        layers = self.__dict__.setdefault("_exact_layers", {})  # one route per target, reused every step
        layer = layers.get(target)
        if layer is None:
            layer = layers[target] = ExactLayer(target.base, target.op, target.transposed)
        base = target.base
        beside = (target.quantized or target.dora_adapter() is not None or "forward" in base.__dict__
                  or not _plain_forward(base))
        # The spec is taken here, at perturb(), outside any torch.compile'd region: its Python (blake2b seed,
        # merged-weight norms) cannot be traced, and a compiled forward then only reads its tensors. Under FSDP2
        # the weights are DTensor shards until the forward all-gathers them, so there it is taken at the layer's
        # first forward of the step (in a pre-hook when noise is added beside the layer), which a compiled model
        # runs as a graph break (torch.compiler.disable) once per step and layer.
        layer.begin(spec, now=not _sharded(target))
        if beside:
            # The output is not one base matmul (DoRA rescales it, bitsandbytes has its own kernel, another
            # library replaced forward, a subclass such as a scaled embedding computes more than op(x, W, b)):
            # add op(x, E) to the layer's output instead, exact on every path.
            handles = [target.module.register_forward_pre_hook(layer.take_spec),
                       target.module.register_forward_hook(layer.add_noise)]

            def remove() -> None:
                for handle in handles:
                    handle.remove()
                layer.end()

            return remove

        base.forward = layer.forward  # an instance attribute: shadows the class's forward until deleted

        def unswap() -> None:
            base.__dict__.pop("forward", None)
            layer.end()

        return unswap

    def _apply_inplace(self, target: Target, spec: NoiseSpec) -> Callable[[], None]:
        weight = target.base.weight
        with torch.no_grad():  # W += E block by block, never a full E (flatlora.noise.add_filter_noise)
            spec.add_to(target.logical(weight), inplace=True)

        def subtract() -> None:
            with torch.no_grad():
                spec.add_to(target.logical(weight), subtract=True, inplace=True)

        return subtract

    def _check_coverage(self, t: int, sigma: float) -> None:
        """Refuse a step that would perturb nothing, and warn (once per set of active adapters) about LoRA layers
        holding an active adapter that were added after this `FlatLora` was built and so are not perturbed.

        The model is scanned only when the active adapters differ from the last check (a scan walks every
        module): adding an adapter only matters once it is activated, which changes them.
        """
        in_use = [tg for tg in self._targets if tg.in_use()]
        key = tuple(sorted({a for tg in self._targets if tg.is_lora for a in tg.module.active_adapters}))
        if in_use and key == self._coverage_key:
            return
        known = {id(tg.module) for tg in self._targets}
        active = lora_layers_with_active_adapters(self.model)
        try:
            fresh = find_targets(self.model, self.config.target_modules, self.config.exclude_modules)
        except ValueError:  # nothing selectable now
            fresh = []
        missed = [tg.name for tg in fresh if id(tg.module) not in known and tg.in_use()]
        if not in_use:
            why = (f"the LoRA layers holding them ({_names(missed)}) were added after FlatLora was built: build it "
                   "again after adding or activating adapters" if missed else
                   f"the LoRA layers holding them ({_names(active)}) are excluded by target_modules="
                   f"{self.config.target_modules} / exclude_modules={self.config.exclude_modules}" if active else
                   "no LoRA layer of the model holds an active adapter")
            raise ValueError(f"step {t}: sigma={sigma:.3g}, but none of the {len(self._targets)} layers FlatLora "
                             f"targets holds an active adapter (active: {list(key) or 'none'}), so the step would "
                             f"silently be plain LoRA: {why}")
        self._coverage_key = key
        if missed:
            warnings.warn(f"LoRA layers {_names(missed)} hold an active adapter but were added after FlatLora was "
                          "built, so they are not perturbed; build FlatLora again to include them",
                          RuntimeWarning, stacklevel=3)

    def _check_inplace(self) -> None:
        for target in self._targets:
            w = target.base.weight
            why = None
            if target.quantized:
                why = f"is quantized ({type(w).__name__})"
            elif w.dtype != torch.float32:
                why = f"is {w.dtype}, where adding and subtracting the noise does not cancel"
            elif _is_dtensor(w):
                why = "is a sharded DTensor (FSDP), which is only whole inside forward"
            elif target.dora_adapter() is not None:
                why = "is a DoRA layer, whose weight normalisation would see the noise"
            if why:
                raise ValueError(f"mode='inplace' cannot perturb layer {target.name!r}: its base weight {why}; "
                                 "use mode='exact' (or 'auto'), which never writes base weights")

    def __repr__(self) -> str:
        return (f"FlatLora(mode={self.mode!r}, rho={self.config.rho}, schedule={self.config.schedule!r}, "
                f"total_steps={self.total_steps}, layers={len(self._targets)})")


def _names(names: list[str], shown: int = 4) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(repr(n) for n in names[:shown]) + more


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
