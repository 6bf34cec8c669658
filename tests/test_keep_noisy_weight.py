"""``NoiseSpec(keep=True)``: the eager exact op keeps forward's ``W + E`` for backward (one draw instead of two).

The reference is the same op with ``keep=False`` (which redraws ``E`` from the seed in backward): outputs and
gradients must be bit-identical, the noise drawn once per forward/backward pair instead of twice, and the kept
tensor freed with the graph.
"""

from __future__ import annotations

import dataclasses
import gc
import weakref

import pytest
import torch
from torch import nn

import flatlora.noise as noise
from flatlora.exact import Op, perturbed_op
from flatlora.noise import NoiseSpec, layer_seed, row_scale


class _Counting:
    """Wraps a noise function: counts calls and holds weak references to what it returned."""

    def __init__(self, fn):
        self.fn, self.calls, self.refs = fn, 0, []

    def __call__(self, *args, **kwargs):
        self.calls += 1
        out = self.fn(*args, **kwargs)
        self.refs.append(weakref.ref(out))
        return out


def _layer(kind: str) -> tuple[nn.Module, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    if kind == "linear":
        return nn.Linear(12, 7), torch.randn(3, 5, 12, generator=gen)
    if kind == "conv":
        return nn.Conv2d(4, 6, 3, padding=1), torch.randn(2, 4, 5, 5, generator=gen)
    return nn.Conv2d(4, 6, 3, padding="same"), torch.randn(2, 4, 5, 5, generator=gen)  # generic backward path


def _run(module, x, spec, *, beside=False, train_weight=False):
    """Output and gradients of ``perturbed_op`` (``beside``: the noise term ``op(x, E)`` alone)."""
    x = x.clone().requires_grad_(True)
    w = module.weight.detach().clone().requires_grad_(train_weight)
    b = module.bias.detach().clone().requires_grad_(True)
    kind = "linear" if isinstance(module, nn.Linear) else "conv"
    y = perturbed_op(x, None if beside else w, None if beside else b, spec, Op(kind, module))
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    return [t.detach() for t in (y, x.grad, b.grad, w.grad) if t is not None]


@pytest.mark.parametrize("beside", [False, True], ids=["w-plus-e", "e-beside"])
@pytest.mark.parametrize("kind", ["linear", "conv", "conv-generic"])
def test_keeping_w_plus_e_gives_the_same_numbers_with_one_draw(monkeypatch, kind, beside):
    module, x = _layer(kind)
    spec = NoiseSpec(layer_seed(0, 4, 0, 1), row_scale(module.weight, 0.3), tuple(module.weight.shape))
    name = "filter_noise" if beside else "add_filter_noise"
    counted, results, original = {}, {}, getattr(noise, name)
    for keep in (False, True):
        counted[keep] = _Counting(original)
        monkeypatch.setattr(noise, name, counted[keep])
        results[keep] = _run(module, x, dataclasses.replace(spec, keep=keep), beside=beside,
                             train_weight=kind == "conv-generic")
    want = 2 if beside else (4 if kind == "conv-generic" else 3)  # y, x.grad (+ b.grad, + w.grad when trained)
    assert len(results[True]) == len(results[False]) == want
    assert all(torch.equal(a, b) for a, b in zip(results[True], results[False]))
    assert counted[False].calls == 2 and counted[True].calls == 1
    gc.collect()
    assert all(r() is None for r in counted[True].refs)  # the kept W + E went with the graph


def test_default_spec_keeps_nothing():
    assert NoiseSpec(1, torch.ones(2), (2, 3)).keep is False


# --- the opt-in from FlatLoraConfig -------------------------------------------------------------------------------
def _flat_grads(model_fn, batches, keep: bool, monkeypatch) -> tuple[list, list, int]:
    """Losses and trainable gradients of 3 optimizer steps of 2 micro-batches each (no optimizer: the weights stay,
    so every step compares the same W), the specs handed out, and how many times W + E was drawn."""
    from flatlora import FlatLora, FlatLoraConfig
    from kit.compare import step_grads

    model = model_fn()
    flat = FlatLora(model, FlatLoraConfig(rho=0.5, seed=3, keep_noisy_weight=keep), total_steps=3)
    counted = _Counting(noise.add_filter_noise)
    monkeypatch.setattr(noise, "add_filter_noise", counted)
    out, specs = [], []
    for t in range(1, 4):
        with flat.perturbed(t):
            out += [step_grads(model, batch) for batch in batches]
            specs += [spec for _, spec in flat._applied.specs]
    monkeypatch.undo()
    return out, specs, counted.calls


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_config_keep_noisy_weight_reaches_the_spec_and_gives_the_same_gradients(monkeypatch, kind):
    from kit.models import batch_for, conv_batch, conv_model, toy_model

    model_fn = toy_model if kind == "mlp" else conv_model
    batches = [batch_for("mlp", 1), batch_for("mlp", 2)] if kind == "mlp" else [conv_batch(1), conv_batch(2)]
    default, specs_default, draws_default = _flat_grads(model_fn, batches, False, monkeypatch)
    kept, specs_kept, draws_kept = _flat_grads(model_fn, batches, True, monkeypatch)
    assert specs_kept and all(s.keep for s in specs_kept) and not any(s.keep for s in specs_default)
    assert [(s.seed, s.shape) for s in specs_kept] == [(s.seed, s.shape) for s in specs_default]
    for (loss_a, grads_a), (loss_b, grads_b) in zip(kept, default, strict=True):
        assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys() and grads_a
        assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    n_forwards = len(batches) * len(specs_kept)  # micro-batches x (steps x layers)
    assert draws_kept == n_forwards < draws_default  # one draw per forward; two where backward needs W + E


def test_config_keep_noisy_weight_is_validated_and_round_trips():
    from flatlora import FlatLoraArguments, FlatLoraConfig

    with pytest.raises(ValueError, match="keep_noisy_weight='yes' must be true or false"):
        FlatLoraConfig(keep_noisy_weight="yes")
    cfg = FlatLoraConfig(keep_noisy_weight=True)
    assert FlatLoraConfig.from_json(cfg.to_json()) == cfg
    assert FlatLoraArguments.from_config(cfg).to_config() == cfg
    pytest.importorskip("transformers")
    from flatlora import FlatLoraCallback

    state = FlatLoraCallback(cfg).state()  # what the Trainer saves in a checkpoint and rebuilds on resume
    assert FlatLoraCallback(**state["args"]).config.keep_noisy_weight is True
