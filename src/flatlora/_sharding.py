"""What `flatlora.core` needs to know about the process group and about sharded parameters, in one place.

* `process_rank`: this process's rank (0 without an initialised process group): it enters the noise seed,
  so each data-parallel rank draws its own ``E`` unless the config asks for the same one everywhere.
* FSDP2 (``fully_shard``) holds each parameter as a DTensor row shard outside forward and all-gathers it for
  forward and backward only. DeepSpeed ZeRO-3 holds each partitioned parameter (it carries ``ds_id``) as an
  empty placeholder outside forward; its engine gathers a module's parameters for that module's forward
  and backward, and gathers any other partitioned parameter read during the engine's forward (registering
  it with the running module, so later forwards fetch it with that module). The per-step noise scale needs
  the *whole* merged weight's row norms, so `sharded` tells the engine to take it at the layer's first
  forward of the step, where `whole_params(..., in_forward=True)` makes sure every parameter of the layer
  is whole; outside forward (``FlatLora.noise_specs``) `whole_params` gathers them for the call.
* FSDP1 (``FullyShardedDataParallel``) flattens parameters into 1-D shards, or with ``use_orig_params=False``
  frees their storage outside forward, and even inside a unit's forward the LoRA factors of another unit are
  shards. Flat-LoRA does not support it: `check_not_fsdp1` refuses it with one error naming FSDP2.

No import of FSDP2 or DeepSpeed at module level: torch builds without ``torch.distributed.fsdp`` and
installs without DeepSpeed work unchanged (DeepSpeed is imported only once a ZeRO-3 parameter is seen).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterable, Iterator

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


def is_zero3(w: torch.Tensor) -> bool:
    """Whether ``w`` is a DeepSpeed ZeRO-3 partitioned parameter (by its ``ds_id``: no import of deepspeed)."""
    return hasattr(w, "ds_id")


def _zero3_whole(p: torch.Tensor) -> bool:
    return p.ds_status.name == "AVAILABLE"


def sharded(target: Target) -> bool:
    """Whether the layer's parameters are FSDP2 or ZeRO-3 shards, whole only inside forward."""
    return any(is_dtensor(p) or is_zero3(p) for p in target.module.parameters())


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
def whole_params(model: nn.Module, target: Target, in_forward: bool = False) -> Iterator[None]:
    """Make the layer's parameters whole for the body, when FSDP2 or ZeRO-3 holds them as shards.

    ``in_forward``: the call comes from the layer's forward (its first of the step). FSDP2 has all-gathered
    the layer there; ZeRO-3 has gathered the base layer (or the LoRA layer, on the hook route), and reading
    the layer's other parameters through their modules gathers them (`_zero3_read`).
    Outside forward (``noise_specs`` called by the user) this all-gathers the layer's shards and shards them
    again afterwards: a collective, so every rank must make the same call.
    """
    params = list(target.module.parameters())
    if any(is_zero3(p) for p in params):
        if in_forward:
            _zero3_read(target)
            yield
            return
        import deepspeed  # present: a ZeRO-3 parameter exists

        with deepspeed.zero.GatheredParameters([p for p in params if is_zero3(p) and not _zero3_whole(p)]):
            yield
        return
    fsdp = fsdp_module_type()
    if fsdp is None or not any(is_dtensor(p) for p in params):
        yield
        return
    with _fsdp2_unsharded(model, target, fsdp):
        yield


def _zero3_read(target: Target) -> None:
    """Read every parameter of the layer through its module, as the layer's own code does, and check it is whole.

    In the DeepSpeed engine's forward, ZeRO-3's parameter dict gathers a partitioned parameter on such a read
    and registers it with the module running now, so later forwards and backwards fetch it with that module.
    Outside the engine's forward (the model called directly, not through the engine) nothing gathers it.
    """
    for module in target.module.modules():
        for name in list(module._parameters):
            p = getattr(module, name)
            if p is not None and is_zero3(p) and not _zero3_whole(p):
                raise RuntimeError(
                    f"the DeepSpeed ZeRO-3 parameter {name!r} of layer {target.name!r} is not gathered in its forward "
                    f"({p.ds_status.name}); run the model through the DeepSpeed engine (deepspeed.initialize, "
                    "accelerate or the Trainer do), whose forward gathers the parameters it reads")


@contextlib.contextmanager
def _fsdp2_unsharded(model: nn.Module, target: Target, fsdp: type) -> Iterator[None]:
    """Unshard the FSDP2 units owning the layer's shards (the nearest unit at or above the layer and any unit
    inside it) for the body, and reshard them afterwards."""
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


def check_not_fsdp1(modules: Iterable[tuple[str, nn.Module]]) -> None:
    """Raise ``ValueError`` if one of the named modules is, wraps or holds parameters of an FSDP1 unit.

    FSDP1 shows as a ``FullyShardedDataParallel`` wrapper (a module with ``_fsdp_wrapped_module``), a
    ``FlatParameter``, or, with ``use_orig_params=True``, original parameters marked ``_fsdp_flattened``
    (also when only the root is wrapped and the model given to FlatLora is the module inside it).
    """
    for name, module in modules:
        why = None
        if hasattr(module, "_fsdp_wrapped_module") or type(module).__name__ == "FullyShardedDataParallel":
            why = f"module {name or '(the model)'!r} is a FullyShardedDataParallel unit"
        else:
            flat = next((n for n, p in module.named_parameters(recurse=False)
                         if getattr(p, "_fsdp_flattened", False) or type(p).__name__ == "FlatParameter"), None)
            if flat is not None:
                why = f"parameter {f'{name}.{flat}' if name else flat!r} is flattened by FSDP1"
        if why:
            raise ValueError(
                f"Flat-LoRA does not support FSDP1 (torch FullyShardedDataParallel): {why}. Its parameters are "
                "flattened 1-D shards (or freed, with use_orig_params=False) outside forward, so the noise scale "
                "cannot be taken. Use FSDP2 instead: fsdp_version: 2 in the accelerate config (Trainer: "
                "fsdp_config={'fsdp_version': 2}), or torch.distributed.fsdp.fully_shard")
