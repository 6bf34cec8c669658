"""What `flatlora.core` needs to know about the process group and FSDP2, in one place.

* `process_rank`: this process's rank (0 without an initialised process group): it enters the noise seed,
  so each data-parallel rank draws its own ``E`` unless the config asks for the same one everywhere.
* FSDP2 (``fully_shard``) holds each parameter as a DTensor row shard outside forward and all-gathers it for
  forward and backward only. The per-step noise scale needs the *whole* merged weight's row norms, so
  `sharded` tells the engine to take it at the layer's first forward of the step (weights whole there), and
  `whole_params` all-gathers a layer's parameters for a call made outside forward (``FlatLora.noise_specs``).

No import of FSDP2 at module level: torch builds without ``torch.distributed.fsdp`` work unchanged.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

if TYPE_CHECKING:  # annotations only
    from .targets import Target


def process_rank() -> int:
    """``torch.distributed.get_rank()`` in an initialised process group, else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def is_dtensor(w: torch.Tensor) -> bool:
    """Whether ``w`` is a DTensor (by type name: no import of torch.distributed.tensor)."""
    return type(w).__name__ == "DTensor"


def sharded(target: Target) -> bool:
    """Whether the layer's parameters are DTensor shards now (FSDP2 outside forward): not whole before forward."""
    return any(is_dtensor(p) for p in target.module.parameters())


def fsdp_module_type() -> type | None:
    """``torch.distributed.fsdp.FSDPModule``, or None for a torch without FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return None
    return FSDPModule


def owns_shards(unit: nn.Module, fsdp: type) -> bool:
    """Whether the FSDP2 unit's own parameters (not those of nested units) are sharded DTensors now."""
    nested = {id(p) for m in unit.modules() if m is not unit and isinstance(m, fsdp) for p in m.parameters()}
    return any(is_dtensor(p) for p in unit.parameters() if id(p) not in nested)


@contextlib.contextmanager
def whole_params(model: nn.Module, target: Target) -> Iterator[None]:
    """Make the layer's parameters whole for the body when FSDP2 holds them as DTensor shards.

    Inside a forward FSDP2 has already all-gathered them (nothing to do). Outside one (``noise_specs`` called
    by the user) this unshards the FSDP2 units owning them (the nearest unit at or above the layer and any
    unit inside it) and reshards them afterwards: a collective, so every rank must make the same call.
    """
    fsdp = fsdp_module_type()
    if fsdp is None or not any(is_dtensor(p) for p in target.module.parameters()):
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
    units = [u for u in {id(u): u for u in owners}.values() if owns_shards(u, fsdp)]
    if not units:
        raise ValueError(f"the parameters of layer {target.name!r} are FSDP2 shards, but no fully_shard unit inside "
                         "the model given to FlatLora owns them; build FlatLora on the model you called fully_shard on")
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
