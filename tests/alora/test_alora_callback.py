"""ALoRA in the transformers Trainer (with Flat-LoRA's callback) ends where the documented plain loop ends, and a
run resumed from a checkpoint continues with the saved gates."""

import json

import pytest
import torch
from transformers import Trainer, TrainingArguments

from _planted import planted
from flatlora import FlatLora, FlatLoraCallback, FlatLoraConfig
from flatlora.alora import ALoRA, ALoRACallback, ALoRAConfig

T = 12
CFG = ALoRAConfig(init_rank=2, warmup_steps=4, interval_steps=3, rounds=3, ranks_per_round=2, seed=4)


pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(seed=0):
    model, data = planted(seed)
    train, val = data(32), data(16)
    return model, train, val


def _rows(batch):
    return [{"x": x, "y": y} for x, y in zip(batch["x"], batch["y"])]


def _opt(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)


def _trainer(model, train, val, out, callbacks, max_steps=T, save_steps=None):
    opt = _opt(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=len(train["x"]), max_steps=max_steps,
                             use_cpu=True, report_to=[], logging_strategy="no", remove_unused_columns=False, seed=0,
                             max_grad_norm=0.0, dataloader_num_workers=0,
                             save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500)
    return Trainer(model=model, args=args, train_dataset=_rows(train), optimizers=(opt, sched), callbacks=callbacks)


def _plain_loop():
    """docs/variants.md's loop: Flat-LoRA's step, optimizer.step(), then alora.update(t, optimizer)."""
    model, train, val = _setup()
    flat = FlatLora(model, FlatLoraConfig(rho=0.2, seed=1), total_steps=T)
    alora = ALoRA(model, CFG, [val])
    opt = _opt(model)
    for t in range(1, T + 1):
        with flat.perturbed(t):
            model(**train)["loss"].backward()
        opt.step()
        alora.update(t, opt)
        opt.zero_grad()
    return model, alora


def _lora_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_trainer_with_both_callbacks_matches_the_plain_loop(tmp_path):
    model, train, val = _setup()
    cb = ALoRACallback(CFG, [val])
    _trainer(model, train, val, tmp_path, [FlatLoraCallback(rho=0.2, seed=1), cb]).train()
    loop, alora = _plain_loop()
    assert [r.step for r in cb.alora.history] == [4, 7, 10] and len(cb.alora.history) == len(alora.history)
    assert cb.alora.ranks() == alora.ranks() and cb.alora.history == alora.history
    assert any(r.pruned for r in alora.history)  # ranks moved: the comparison covers reallocation
    got, want = _lora_params(model), _lora_params(loop)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    saved = json.loads((tmp_path / "alora_state.json").read_text())
    assert saved["gates"] == alora.state_dict()["gates"]


def test_a_resumed_run_continues_with_the_saved_gates(tmp_path):
    model, train, val = _setup()
    _trainer(model, train, val, tmp_path / "full", [ALoRACallback(CFG, [val])]).train()
    first, train2, val2 = _setup()
    _trainer(first, train2, val2, tmp_path / "cut", [ALoRACallback(CFG, [val2])], save_steps=8, max_steps=8).train()
    assert (tmp_path / "cut" / "checkpoint-8" / "alora_state.json").is_file()
    again, train3, val3 = _setup()
    cb = ALoRACallback(CFG, [val3])
    _trainer(again, train3, val3, tmp_path / "cut", [cb]).train(
        resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-8"))
    full = json.loads((tmp_path / "full" / "alora_state.json").read_text())
    assert cb.alora.state_dict()["gates"] == full["gates"]
    got, want = _lora_params(again), _lora_params(model)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    # a checkpoint without the gates cannot be resumed silently
    (tmp_path / "cut" / "checkpoint-8" / "alora_state.json").unlink()
    lost, train4, val4 = _setup()
    with pytest.raises(ValueError, match="alora_state.json' is missing"):
        _trainer(lost, train4, val4, tmp_path / "cut", [ALoRACallback(CFG, [val4])]).train(
            resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-8"))


def test_a_run_too_short_for_any_round_warns(tmp_path):
    model, train, val = _setup()
    short = ALoRAConfig(init_rank=2, warmup_steps=T, interval_steps=3, rounds=3, ranks_per_round=2)
    callback = ALoRACallback(short, [val])
    with pytest.warns(RuntimeWarning, match=r"none of the round steps \[12, 15, 18\] .* lower warmup_steps"):
        _trainer(model, train, val, tmp_path, [callback]).train()
    assert callback.alora.history[0].step == T  # the one round at the last step: nothing trains after it
    saved = json.loads((tmp_path / "alora_state.json").read_text())
    assert [r["step"] for r in saved["history"]] == [T]
