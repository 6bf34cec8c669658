"""Gradients and frozen state of a model, one forward/backward, and the assertions that compare them.

Test-side plumbing only (no flatlora code): the tests run the library and a reference from ``references.py``
through ``step_grads`` and compare what comes out with ``assert_grads_close`` / ``assert_same_state``. Two
selections of "the frozen part" exist because the suites check different things:

* ``base_state``: the ``state_dict`` without adapter entries (``lora_`` in the key); it keeps PEFT's trainable
  copies of ``modules_to_save`` (tests/*.py);
* ``state_without_adapters``: every frozen tensor read from the parameters, buffers and quantization state,
  without the adapters and without ``modules_to_save`` copies (tests/variants, including bitsandbytes bases).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from kit.models import loss_of


def _grads(model: nn.Module, keep: Callable[[str, nn.Parameter], bool]) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if keep(n, p) and p.grad is not None}


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gradients of the parameters whose name contains ``lora_``, by name."""
    return _grads(model, lambda n, p: "lora_" in n)


def trainable_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gradients of every trainable parameter (the adapter's: lora_A/B/E, magnitudes), by name."""
    return _grads(model, lambda n, p: p.requires_grad)


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


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The ``state_dict`` entries without ``lora_`` in their key, cloned."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


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
    """Same keys; equal tensors (bit for bit when ``atol`` is 0 or the dtype is not floating)."""
    assert before.keys() == after.keys()
    for k in before:
        if atol == 0.0 or not before[k].dtype.is_floating_point:
            assert torch.equal(before[k], after[k]), k
        else:
            torch.testing.assert_close(after[k], before[k], rtol=0, atol=atol, msg=k)
