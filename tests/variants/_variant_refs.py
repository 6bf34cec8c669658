"""Independent references for the variant tests (no flatlora code inside, apart from reading ``flat.noise``).

* The merged weight comes from PEFT's own ``merge_and_unload`` on a deep copy (or, for quantized bases, from
  bitsandbytes' own dequantization plus the adapter's factors), and the row std from the closed form
  ``sigma_t * ||W[i, :]|| / sqrt(n)`` with ``sigma_t = rho (1 - cos(pi t / T)) / 2``.
* The forward at ``W + E`` is built on a deep copy without flatlora: either ``W_base + E`` is written into the
  copy's base weight (LoRA variants whose output is ``base(x) + adapter(x)``), or a plain forward hook adds
  ``op(x, E)`` (with the materialised ``E``) to the output of the layer (DoRA and quantized bases, whose
  output is not one base matmul).
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from conftest import loss_of

PREFIX = "base_model.model."


def cosine_sigma(t: int, total: int, rho: float) -> float:
    return rho * (1 - math.cos(math.pi * t / total)) / 2


def logical(module: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """GPT-2 Conv1D stores ``(in, out)``; everything else stores rows (output filters) first."""
    return w.t() if type(module).__name__ == "Conv1D" else w


def merged_by_peft(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The logical fp32 weight of each named layer after PEFT's ``merge_and_unload`` on a deep copy."""
    ref = copy.deepcopy(model)
    unloaded = ref.merge_and_unload() if hasattr(ref, "merge_and_unload") else ref.base_model.merge_and_unload()
    modules = dict(unloaded.named_modules())
    out = {}
    for name in names:
        m = modules[name.removeprefix(PREFIX)]
        out[name] = logical(m, m.weight.detach()).float().clone()
    return out


def row_std(w: torch.Tensor, sigma: float) -> torch.Tensor:
    """``sigma * ||W[i, :]|| / sqrt(n)`` for a logical ``(m, *fan_in)`` weight."""
    flat = w.reshape(w.shape[0], -1).double()
    return (sigma * flat.norm(dim=1) / math.sqrt(flat.shape[1])).float()


def assert_scales_match(flat, t: int, merged: dict[str, torch.Tensor], rho: float, total: int,
                        rtol: float = 1e-5) -> None:
    """``flat.noise_specs(t)`` against the closed form on independently merged weights."""
    sigma = cosine_sigma(t, total, rho)
    specs = flat.noise_specs(t)
    assert {target.name for target, _ in specs} == set(merged)
    for target, spec in specs:
        want = row_std(merged[target.name], sigma)
        assert spec.shape == tuple(merged[target.name].shape), target.name
        torch.testing.assert_close(spec.scale, want, rtol=rtol, atol=0, msg=target.name)


def with_base_at(model: nn.Module, noise: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy whose base weights hold ``W_base + E`` (E in logical layout)."""
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for name, e in noise.items():
            layer = modules[name]
            base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
            w = base.weight
            w.copy_((w.float() + logical(base, e)).to(w.dtype))
    return ref


def _op_of(base: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if isinstance(base, nn.Embedding):
        return lambda x, e: F.embedding(x, e)
    if isinstance(base, nn.Conv2d):
        return lambda x, e: F.conv2d(x, e, None, base.stride, base.padding, base.dilation, base.groups)
    return lambda x, e: F.linear(x, e)  # Linear, bitsandbytes Linear4bit/8bitLt, Conv1D (E is logical)


def with_output_plus(model: nn.Module, noise: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy where each named layer's output gets ``+ op(x, E)``: the layer computed at ``W + E``."""
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    for name, e in noise.items():
        layer = modules[name]
        op = _op_of(layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer)

        def hook(module, args, output, e=e, op=op):
            return output + op(args[0], e.to(output.dtype))

        layer.register_forward_hook(hook)
    return ref


def trainable_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gradients of every trainable parameter (the adapter's: lora_A/B/E, magnitudes), by name."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@contextlib.contextmanager
def fixed_rng(seed: int | None) -> Iterator[None]:
    """Fix the global RNG for one forward (dropout masks) and put it back afterwards (test-side only)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def step_grads(model: nn.Module, batch: dict, context=None, rng: int | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward/backward of ``batch`` (inside ``context`` if given): (loss, trainable grads)."""
    model.zero_grad(set_to_none=True)
    with context if context is not None else contextlib.nullcontext(), fixed_rng(rng):
        loss = loss_of(model, batch)
        loss.backward()
    grads = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_grads_close(got: dict, want: dict, clean: dict | None = None, rtol: float = 1e-4,
                       atol: float = 1e-6) -> None:
    """Same keys, same values; and the noise moved the gradients well beyond the tolerance (else the
    comparison could not fail)."""
    assert got.keys() == want.keys() and len(got) > 0, (sorted(got), sorted(want))
    if clean is not None:
        moved = max(((want[k] - clean[k]).norm() / want[k].norm().clamp_min(1e-12)).item() for k in want)
        assert moved > 1e-2, f"the noise hardly changes the gradients ({moved:.2e}): the check would be vacuous"
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol, msg=k)


def state_without_adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every frozen tensor (base weights, biases, buffers, quantization state): not the adapters and not PEFT's
    trainable copies of ``modules_to_save`` (e.g. a classifier head).

    Read from the parameters and their quantization state, not through ``state_dict()``: bitsandbytes'
    ``Linear4bit._save_to_state_dict`` converts a CPU-packed 4-bit weight back in place, so a state dict would
    change the very layout under test.
    """
    keys = ("lora_", "ranknum", "modules_to_save")
    out = {}
    for prefix, module in model.named_modules():
        own = [*module.named_parameters(prefix=prefix, recurse=False), *module.named_buffers(prefix=prefix, recurse=False)]
        for name, t in own:
            if any(s in name for s in keys):
                continue
            out[name] = t.detach().clone()
            # 8-bit scales: on the weight until the first forward, then on the layer's state
            scb = getattr(t, "SCB", None)
            scb = scb if scb is not None else getattr(getattr(module, "state", None), "SCB", None)
            if type(t).__name__ == "Int8Params" and scb is not None:
                out[f"{name}.SCB"] = scb.detach().clone()
            qs = getattr(t, "quant_state", None)
            while qs is not None:  # 4-bit: absmax, code, offset, nested state2; and the layout flag
                for k, v in vars(qs).items():
                    if isinstance(v, torch.Tensor):
                        out[f"{name}.quant_state.{k}"] = v.detach().clone()
                out[f"{name}.quant_state.packed"] = torch.tensor(bool(getattr(qs, "packing_format_for_cpu", False)))
                name, qs = f"{name}.state2", getattr(qs, "state2", None)
    return out


def assert_same_state(before: dict, after: dict, atol: float = 0.0) -> None:
    assert before.keys() == after.keys()
    for k in before:
        if atol == 0.0 or not before[k].dtype.is_floating_point:
            assert torch.equal(before[k], after[k]), k
        else:
            torch.testing.assert_close(after[k], before[k], rtol=0, atol=atol, msg=k)


def randomize_adapters(model: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Give every adapter factor (lora_A/B, AdaLoRA's lora_E, LoRA embeddings) random values, so the merged
    weight differs from the base and every factor gets a gradient; scale DoRA magnitudes by U(0.5, 1.5) per
    row, since at init they equal ||W_base||_row and DoRA's merged weight would have the base's row norms."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in ("lora_A", "lora_B", "lora_E", "lora_embedding_A", "lora_embedding_B")):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif "lora_magnitude_vector" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=gen))
