"""LoRA+ (peft.optimizers.create_loraplus_optimizer): Flat-LoRA never touches the optimizer, so the user's
LoRA+ optimizer (B learning faster than A) steps on the gradients taken at W + E, in a plain loop and in the
Trainer (where the optimizer is passed through ``optimizers=``)."""

import copy

import pytest
import torch
from peft.optimizers import create_loraplus_optimizer
from transformers import Trainer, TrainerCallback, TrainingArguments

from flatlora import FlatLora, FlatLoraCallback, FlatLoraConfig
from kit.compare import step_grads, trainable_grads
from kit.models import loss_of, mlp_batch, toy
from kit.references import with_base_at

T, LR, RATIO = 10, 0.05, 16.0


def _loraplus(model):
    return create_loraplus_optimizer(model, torch.optim.SGD, lr=LR, loraplus_lr_ratio=RATIO)


def _groups(opt) -> list[tuple[float, list[int]]]:
    return [(g["lr"], [id(p) for p in g["params"]]) for g in opt.param_groups]


def _expected_sgd_step(start: dict, grads: dict) -> dict:
    """One SGD step of LoRA+: B at lr * ratio, A at lr."""
    return {n: start[n] - LR * (RATIO if "lora_B" in n else 1.0) * grads[n] for n in start}


@pytest.mark.parametrize("mode", ["exact", "inplace"])
def test_a_step_with_the_loraplus_optimizer_equals_the_reference_step(mode):
    proto = toy().eval()
    batch = mlp_batch()
    model = copy.deepcopy(proto)
    opt = _loraplus(model)
    groups = _groups(opt)
    assert sorted({lr for lr, params in groups if params}) == [LR, LR * RATIO]  # no embedding group here
    flat = FlatLora(model, FlatLoraConfig(rho=0.5, mode=mode, seed=3), total_steps=T)
    ref = with_base_at(proto, flat.noise(T))  # an independent model at W + E with its own LoRA+ optimizer
    ref_opt = _loraplus(ref)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    clean_grads = step_grads(model, batch)[1]

    with flat.perturbed(T):
        loss_of(model, batch).backward()
    opt.step()
    opt.zero_grad()
    loss_of(ref, batch).backward()
    ref_grads = trainable_grads(ref)
    ref_opt.step()

    after = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for n, p in ref.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(after[n], p.detach(), rtol=1e-5, atol=1e-7, msg=n)
    want = _expected_sgd_step(start, ref_grads)
    unperturbed = _expected_sgd_step(start, clean_grads)
    for n in want:
        torch.testing.assert_close(after[n], want[n], rtol=1e-5, atol=1e-7, msg=n)
    assert any(not torch.allclose(after[n], unperturbed[n], rtol=1e-4, atol=1e-6) for n in want)
    assert _groups(opt) == groups  # same groups, same parameters, same rates


class _StepSpy(TrainerCallback):
    """Checks, at every optimizer step of the Trainer, which optimizer steps and how far it moved B and A."""

    def __init__(self, flat_cb: FlatLoraCallback, model, opt) -> None:
        self.flat_cb, self.model, self.opt = flat_cb, model, opt
        self.perturbed_at_begin, self.steps = [], []

    def on_step_begin(self, args, state, control, **kw):
        self.perturbed_at_begin.append(self.flat_cb.flat.is_perturbed)

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.start = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        self.grads = trainable_grads(self.model)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the user's optimizer
        after = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        self.steps.append((inner is self.opt, after, _expected_sgd_step(self.start, self.grads)))


def test_the_trainer_steps_the_users_loraplus_optimizer_under_flat_lora(tmp_path):
    model = toy()
    opt = _loraplus(model)
    groups = _groups(opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    gen = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(16, generator=gen), "labels": torch.randint(0, 4, (), generator=gen)}
            for _ in range(24)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4,
                             use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
                             remove_unused_columns=False, seed=0, max_grad_norm=0.0, dataloader_num_workers=0)
    cb = FlatLoraCallback(rho=0.5)
    spy = _StepSpy(cb, model, opt)
    Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched), callbacks=[cb, spy]).train()
    assert spy.perturbed_at_begin == [True] * 4
    assert len(spy.steps) == 4
    for is_users, after, want in spy.steps:
        assert is_users
        for n in want:
            torch.testing.assert_close(after[n], want[n], rtol=1e-5, atol=1e-7, msg=n)
    assert _groups(opt) == groups
