"""FlatLoraCallback in a real transformers Trainer: step bookkeeping, clean weights, resume."""

import json

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from conftest import base_state, toy_model
from flatlora import FlatLoraCallback, FlatLoraConfig

N = 48  # examples; batch 4 x accumulation 2 -> 6 optimizer steps per epoch


def _dataset():
    gen = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(N, 16, generator=gen), torch.randint(0, 4, (N,), generator=gen)
    return [{"x": xs[i], "labels": ys[i]} for i in range(N)]


def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                max_steps=6, learning_rate=5e-2, use_cpu=True, report_to=[], save_strategy="no",
                logging_strategy="no", remove_unused_columns=False, seed=0, data_seed=0,
                restore_callback_states_from_checkpoint=True, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


class Spy(TrainerCallback):
    """Records, per event, the step index the callback used and whether the base is clean."""

    def __init__(self, flat_cb: FlatLoraCallback, model) -> None:
        self.flat_cb, self.model, self.events = flat_cb, model, []
        self.clean = base_state(model)
        self.forwards = 0

    def _is_clean(self) -> tuple[bool, bool]:
        """(base weights bit-identical to the start, no forward swapped)"""
        now = base_state(self.model)
        return (all(torch.equal(self.clean[k], now[k]) for k in now),
                not any("forward" in m.__dict__ for m in self.model.modules()))

    def on_step_begin(self, args, state, control, **kw):
        applied = self.flat_cb.flat._applied
        self.events.append(("begin", state.global_step, applied.step, self._is_clean()))

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.events.append(("pre_opt", state.global_step, self.flat_cb.flat.is_perturbed, self._is_clean()))


@pytest.mark.parametrize("mode", ["exact", "inplace"])
def test_trainer_steps_perturb_once_per_optimizer_step_and_optimizer_sees_clean_weights(tmp_path, mode):
    model = toy_model()
    before = base_state(model)
    cb = FlatLoraCallback(rho=0.5, mode=mode)
    spy = Spy(cb, model)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), callbacks=[cb, spy])
    trainer.train()
    begins = [e for e in spy.events if e[0] == "begin"]
    pre = [e for e in spy.events if e[0] == "pre_opt"]
    assert [e[2] for e in begins] == [1, 2, 3, 4, 5, 6]  # t = global_step + 1, T = max_steps = 6
    assert cb.flat.total_steps == 6 and cb.flat.sigma(6) == 0.5
    # inside a step, exact mode swaps forwards and never writes weights; inplace writes the weights
    assert all(e[3] == ((True, False) if mode == "exact" else (False, True)) for e in begins)
    # the optimizer step sees the model at W: nothing swapped, weights back (bit-exact for exact mode)
    assert all(perturbed is False and clean[1] and (clean[0] or mode == "inplace") for _, _, perturbed, clean in pre)
    after = base_state(model)
    same = torch.equal if mode == "exact" else lambda a, b: torch.allclose(a, b, atol=1e-6, rtol=0)
    assert all(same(before[k], after[k]) for k in before)
    assert not any("forward" in m.__dict__ for m in model.modules())


def _train(tmp_path, resume_from=None, seed=4, **kw):
    model = toy_model()
    trainer = Trainer(model=model, args=_args(tmp_path, **kw), train_dataset=_dataset(),
                      callbacks=[FlatLoraCallback(FlatLoraConfig(rho=0.5, seed=seed))])
    trainer.train(resume_from_checkpoint=resume_from)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}, trainer


def test_resume_from_checkpoint_matches_the_uninterrupted_run(tmp_path):
    full, _ = _train(tmp_path / "full")
    # the same run, checkpointed at step 3 and stopped there ...
    _train(tmp_path / "part", save_strategy="steps", save_steps=3, max_steps=6, save_only_model=False)
    ckpt = tmp_path / "part" / "checkpoint-3"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["FlatLoraCallback"]
    assert FlatLoraConfig.from_json(saved["args"]["config"]) == FlatLoraConfig(rho=0.5, seed=4)
    # ... resumed by a fresh Trainer, which rebuilds the callback from the checkpoint
    resumed, _ = _train(tmp_path / "part", resume_from=str(ckpt))
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=1e-6, atol=1e-7, msg=k)
    # other noise gives other adapters, so the match above is a real check of the resumed noise
    other, _ = _train(tmp_path / "other", seed=5)
    assert any(not torch.allclose(other[k], full[k], rtol=1e-4, atol=1e-6) for k in full)


def test_callback_constructors_and_state():
    cfg = FlatLoraConfig(rho=0.15, seed=2)
    assert FlatLoraCallback(cfg).config == cfg
    assert FlatLoraCallback(rho=0.15, seed=2).config == cfg
    assert FlatLoraCallback(cfg.to_json()).config == cfg
    assert FlatLoraCallback(cfg.to_dict()).config == cfg
    rebuilt = FlatLoraCallback.from_state(FlatLoraCallback(cfg).state())
    assert rebuilt.config == cfg
    with pytest.raises(ValueError, match="either a config or keyword fields"):
        FlatLoraCallback(cfg, rho=0.1)
    with pytest.raises(ValueError, match="rho=-1"):
        FlatLoraCallback(rho=-1)
