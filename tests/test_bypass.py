"""No perturbed layer is bypassed without a word (exact mode).

Fused LoRA kernels (Unsloth, Axolotl's lora_*_kernel, liger's fused linear cross-entropy) compute a LoRA layer
from ``lora_layer.base_layer.weight`` themselves, so the exact mode's swapped base forward never runs. The
stand-in here does exactly that: ``F.linear(x, base_layer.weight, base_layer.bias) + lora_B(lora_A(x)) * s``
inside the parent's forward (as Axolotl's ``apply_lora_mlp`` replaces the MLP's). A step in which no
perturbed layer computed with its noise raises; a layer that never has is named once; the normal paths
(accumulation, checkpointing, evaluation between steps, DoRA's hooks, torch.compile, the Trainer) stay silent.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from torch._dynamo.utils import counters

from flatlora import FlatLora, FlatLoraConfig
from kit.adapters import randomize_lora
from kit.compare import base_state
from kit.models import ToyMLP, batch_for, llama_model, loss_of, toy_model

T = 4
FC1, FC2 = "base_model.model.fc1", "base_model.model.fc2"
CAUSES = r"Unsloth.*Axolotl.*liger.*copied, compiled or wrapped after FlatLora was built.*no forward ran"


def lora_kernel(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a fused LoRA kernel computes: reads ``base_layer.weight`` itself, never calls the base layer."""
    base = layer.base_layer
    out = F.linear(x, base.weight, base.bias)
    for a in layer.active_adapters:
        out = out + layer.lora_B[a](layer.lora_A[a](x)) * layer.scaling[a]
    return out


class FusedMLP(ToyMLP):
    """ToyMLP whose layers named in ``fused`` go through `lora_kernel`; ``route`` ("fc1", "fc2" or "both", set
    per forward) skips the other layer, as a mixture of experts leaves an expert out (it adds zeros instead)."""

    def __init__(self, fused: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.fused, self.route = fused, "both"

    def _layer(self, name: str, x: torch.Tensor) -> torch.Tensor:
        layer = getattr(self, name)
        return lora_kernel(layer, x) if name in self.fused else layer(x)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        h = F.gelu(self._layer("fc1", x)) if self.route in ("fc1", "both") else x.new_zeros(x.shape[0], 32)
        logits = self._layer("fc2", h) if self.route in ("fc2", "both") else h[:, :4]
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def fused_model(*fused: str) -> nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(FusedMLP(fused), LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]))
    randomize_lora(model, 0)
    return model


def _step(model: nn.Module, flat: FlatLora, t: int, seed: int = 0) -> torch.Tensor:
    with flat.perturbed(t):
        loss = loss_of(model, batch_for("mlp", seed))
        loss.backward()
    return loss.detach()


def _swapped(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if "forward" in m.__dict__ or m._forward_hooks or m._forward_pre_hooks]


def test_the_stand_in_kernel_computes_the_lora_layer():
    """The stand-in is faithful: outside a perturbed step, fused and PEFT forwards give the same output."""
    fused, plain = fused_model("fc1", "fc2"), fused_model()
    x = batch_for("mlp")["x"]
    torch.testing.assert_close(fused(x)["logits"], plain(x)["logits"], rtol=1e-6, atol=1e-6)


def test_a_step_whose_layers_all_go_through_a_kernel_raises():
    model = fused_model("fc1", "fc2")
    before = base_state(model)
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)
    with pytest.raises(RuntimeError, match=r"step 2 \(sigma=.*none of the 2 layers FlatLora perturbs computed with "
                                           r"its noise.*plain LoRA.*" + CAUSES):
        _step(model, flat, 2)
    assert not flat.is_perturbed and _swapped(model) == []  # restored before raising
    assert all(torch.equal(before[k], v) for k, v in base_state(model).items())


def test_inplace_mode_puts_the_noise_where_kernels_read_it():
    """mode='inplace' writes E into W_base, which the kernel reads: perturbed, and nothing to check."""
    model = fused_model("fc1", "fc2")
    clean = loss_of(model, batch_for("mlp")).detach()
    flat = FlatLora(model, FlatLoraConfig(rho=0.5, mode="inplace"), total_steps=T)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        noisy = _step(model, flat, T)
    assert abs(noisy - clean) > 1e-3


def test_one_bypassed_layer_is_named_once():
    model = fused_model("fc2")
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)
    with pytest.warns(RuntimeWarning, match=r"step 1 \(sigma=.*layers 'base_model.model.fc2' never computed with "
                                            r"Flat-LoRA's noise.*while 1 other layers did.*allow_unperturbed") as got:
        _step(model, flat, 1)
    assert [str(w.message).count(FC1) for w in got if "never computed" in str(w.message)] == [0]  # fc1 ran
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named once: steps 2..T are silent
        for t in range(2, T + 1):
            _step(model, flat, t)


def test_allow_unperturbed_silences_the_named_layers_but_not_an_unperturbed_step():
    model = fused_model("fc2")
    flat = FlatLora(model, FlatLoraConfig(rho=0.5, allow_unperturbed=[r"\.fc2$"]), total_steps=T)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(model, flat, 1)
    everything = FlatLora(fused_model("fc1", "fc2"), FlatLoraConfig(rho=0.5, allow_unperturbed=[".*"]), total_steps=T)
    with pytest.raises(RuntimeError, match="none of the 2 layers"):
        _step(everything.model, everything, 1)


def test_layers_that_ran_in_an_earlier_step_are_not_named():
    """Routing as in a mixture of experts: a layer left out of a step after it ran in an earlier one is normal;
    one that has never run is named, once."""
    model = fused_model()
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)
    inner = model.get_base_model()
    inner.route = "both"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(model, flat, 1)
        inner.route = "fc1"
        _step(model, flat, 2)
    fresh = fused_model()
    flat = FlatLora(fresh, FlatLoraConfig(rho=0.5), total_steps=T)
    fresh.get_base_model().route = "fc1"
    with pytest.warns(RuntimeWarning, match=re.escape(repr(FC2))):
        _step(fresh, flat, 1)
    fresh.get_base_model().route = "fc2"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(fresh, flat, 2)
        fresh.get_base_model().route = "fc1"
        _step(fresh, flat, 3)


def test_an_empty_step_raises_unless_sigma_is_zero_or_the_mode_is_inplace():
    model = toy_model()
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)
    with pytest.raises(RuntimeError, match="none of the 2 layers.*no forward ran inside the step"):
        with flat.perturbed(1):
            pass
    assert not flat.is_perturbed and _swapped(model) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with flat.perturbed(0):  # sigma_0 = 0: nothing perturbed, nothing to check
            pass
        inplace = FlatLora(model, FlatLoraConfig(rho=0.5, mode="inplace"), total_steps=T)
        with inplace.perturbed(1):
            pass


@pytest.mark.parametrize("manual", [False, True])
def test_a_failing_step_is_not_masked_by_the_check(manual):
    """The body raised before any forward: the caller sees its own exception, and the model is restored."""
    model = toy_model()
    before = base_state(model)
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)
    with pytest.raises(KeyError, match="boom") as info:
        if manual:  # perturb/restore by hand, restore in a finally
            flat.perturb(2)
            try:
                raise KeyError("boom")
            finally:
                flat.restore()
        else:
            with flat.perturbed(2):
                raise KeyError("boom")
    assert info.value.__context__ is None  # nothing raised on top of it
    assert not flat.is_perturbed and _swapped(model) == []
    assert all(torch.equal(before[k], v) for k, v in base_state(model).items())


def _checkpointed_llama(reentrant: bool) -> nn.Module:
    model = llama_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    return model.train()


NORMAL = {  # model, batch kind, steps, target_modules
    "accumulation": (toy_model, "mlp", 3, None),
    "dora hooks": (lambda: toy_model(use_dora=True), "mlp", 2, None),
    "plain lm_head opted in": (llama_model, "llama", 2, ["_proj$", "lm_head$"]),
    "checkpointing": (lambda: _checkpointed_llama(False), "llama", 2, None),
    "checkpointing reentrant": (lambda: _checkpointed_llama(True), "llama", 2, None),
}


@pytest.mark.parametrize("path", sorted(NORMAL))
def test_normal_paths_stay_silent(path):
    """Each step: 2 micro-batches, then a no_grad evaluation outside the step; every layer counted as run."""
    build, kind, steps, targets = NORMAL[path]
    model = build()
    flat = FlatLora(model, FlatLoraConfig(rho=0.5, target_modules=targets), total_steps=steps)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for t in range(1, steps + 1):
            with flat.perturbed(t):
                for j in range(2):
                    (loss_of(model, batch_for(kind, 10 * t + j)) / 2).backward()
            with torch.no_grad():  # evaluation between steps
                loss_of(model, batch_for(kind, 99))
    assert flat._seen == set(range(len(flat.targets))) and len(flat.targets) >= 2


# --- torch.compile: the traced Python runs once, the custom op at every call ---------------------------------
def test_a_compiled_model_stays_silent_for_several_steps_without_new_graphs(fresh_dynamo):
    model = toy_model()
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)
    compiled = torch.compile(model, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for t in range(1, T + 1):
            _step(compiled, flat, t, seed=t)
            if t == 1:
                graphs = counters["stats"]["unique_graphs"]
            assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["recompiles"] and flat._seen == {0, 1}


@pytest.mark.parametrize("fused", [("fc2",), ("fc1", "fc2")])
def test_a_compiled_kernel_bypass_is_caught_at_every_step(fresh_dynamo, fused):
    """The check counts what runs, not what was traced: steps after the first (no tracing) are checked too."""
    model = fused_model(*fused)
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)
    compiled = torch.compile(model, backend="aot_eager")
    if len(fused) == 2:
        for t in (1, 2):
            with pytest.raises(RuntimeError, match="none of the 2 layers"):
                _step(compiled, flat, t)
        return
    with pytest.warns(RuntimeWarning, match=re.escape(repr(FC2))):
        _step(compiled, flat, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _step(compiled, flat, 2)
    assert flat._seen == {0, 1}  # fc1 ran (through the op), fc2 was named


# --- the Trainer callback ------------------------------------------------------------------------------------
def _train(model: nn.Module, tmp_path, **kw) -> None:
    from transformers import Trainer, TrainingArguments

    from flatlora import FlatLoraCallback

    gen = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(16, 16, generator=gen), torch.randint(0, 4, (16,), generator=gen)
    data = [{"x": xs[i], "labels": ys[i]} for i in range(16)]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2,
        learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
        eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4, remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=True, **kw)
    Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8],
            callbacks=[FlatLoraCallback(rho=0.5, schedule="constant")]).train()


def test_the_trainer_with_accumulation_and_evaluation_stays_silent(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _train(toy_model(), tmp_path)


def test_the_trainer_with_a_fused_kernel_refuses_the_first_step(tmp_path):
    model = fused_model("fc1", "fc2")
    before = base_state(model)
    with pytest.raises(RuntimeError, match="step 1 .*none of the 2 layers"):
        _train(model, tmp_path)
    assert _swapped(model) == []  # on_pre_optimizer_step restored before the check raised
    assert all(torch.equal(before[k], v) for k, v in base_state(model).items())
