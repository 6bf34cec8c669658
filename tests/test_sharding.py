"""`flatlora._sharding` without a process group: how FlatLora reacts to the marks that DeepSpeed ZeRO-3
(``ds_id``, ``ds_status``) and FSDP1 (``_fsdp_flattened``) leave on parameters. The real packages run in
tests/distributed/test_deepspeed.py and test_fsdp1.py; these check the decisions made from the marks."""

from __future__ import annotations

import copy
import sys
from types import SimpleNamespace

import pytest
import torch

from flatlora import FlatLora, FlatLoraConfig
from kit.compare import base_state, lora_grads
from kit.models import batch_for, loss_of, toy_model

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = FlatLoraConfig(rho=0.5, seed=3)
T = 4


def mark_zero3(model: torch.nn.Module, status: str) -> None:
    """Give every parameter ZeRO-3's marks (DeepSpeed's ``ds_status`` is an enum; its ``name`` is read)."""
    for i, p in enumerate(model.parameters()):
        p.ds_id, p.ds_status = i, SimpleNamespace(name=status)


def test_zero3_parameters_defer_the_norms_to_the_first_forward_with_the_same_numbers(monkeypatch):
    """Whole inside forward (AVAILABLE, as the engine leaves them there): the spec is taken at the layer's first
    forward, and the step computes what an unmarked model computes. DeepSpeed is never imported for it."""
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` would raise
    model, ref = toy_model(), toy_model()
    mark_zero3(model, "AVAILABLE")
    flat, flat_ref = FlatLora(model, CFG, total_steps=T), FlatLora(ref, CFG, total_steps=T)
    batch = batch_for("mlp")
    with flat.perturbed(T), flat_ref.perturbed(T):
        assert flat._applied.specs == [] and len(flat_ref._applied.specs) == 2  # deferred vs taken at perturb
        loss_of(model, batch).backward()
        loss_of(ref, batch).backward()
        assert [tg.name for tg, _ in flat._applied.specs] == flat.targets
        for (_, s), (_, r) in zip(flat._applied.specs, flat_ref._applied.specs):
            assert s.seed == r.seed and torch.equal(s.scale, r.scale)
    got, want = lora_grads(model), lora_grads(ref)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_a_zero3_parameter_not_gathered_in_forward_raises_and_the_step_is_undone():
    """Outside the engine's forward nothing gathers ZeRO-3's placeholders: one clear error, not a shape crash."""
    model = toy_model()
    clean = base_state(model)
    mark_zero3(model, "NOT_AVAILABLE")
    flat = FlatLora(model, CFG, total_steps=T)
    with pytest.raises(RuntimeError, match=r"ZeRO-3 parameter 'weight' of layer '.*fc1' is not gathered .*"
                                           r"NOT_AVAILABLE.*DeepSpeed engine"):
        with flat.perturbed(T):
            loss_of(model, batch_for("mlp"))
    assert not flat.is_perturbed and not any("forward" in m.__dict__ for m in model.modules())
    assert all(torch.equal(w, clean[k]) for k, w in base_state(model).items())


def test_zero3_parameters_refuse_the_inplace_mode():
    model = toy_model()
    mark_zero3(model, "NOT_AVAILABLE")
    with pytest.raises(ValueError, match=r"mode='inplace' cannot perturb layer .*ZeRO-3 partition.*mode='exact'"):
        FlatLora(model, FlatLoraConfig(mode="inplace"))


def test_fsdp1_marks_are_refused_at_construction_perturb_and_noise_specs():
    model = toy_model()
    clean = copy.deepcopy(base_state(model))
    flat = FlatLora(model, CFG, total_steps=T)  # built before "wrapping"
    model.base_model.model.fc2.base_layer.weight._fsdp_flattened = True  # what FSDP1 marks (use_orig_params=True)
    for call in (lambda: FlatLora(model, CFG, total_steps=T), lambda: flat.perturb(T), lambda: flat.noise_specs(T)):
        with pytest.raises(ValueError, match=r"^Flat-LoRA does not support FSDP1 .*'base_model\.model\.fc2\.base_layer"
                                             r"\.weight' is flattened by FSDP1.*fsdp_version: 2"):
            call()
    assert not flat.is_perturbed and all(torch.equal(w, clean[k]) for k, w in base_state(model).items())
