"""FlatLoraCallback in a real transformers Trainer: step bookkeeping, clean weights, resume, logged sigma,
the saved adapter's record, and the guard against evaluating at W + E after a failed train()."""

import json
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

import flatlora
from flatlora import FlatLoraCallback, FlatLoraConfig, load_flat_lora_config, save_flat_lora_config
from flatlora.callback import CARD_PREFIX
from kit.compare import base_state
from kit.models import toy_model

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


# --- flat_lora_sigma in the logs -------------------------------------------------------------------------------
class LogRecorder(TrainerCallback):
    """Keeps a copy of every log dict as this callback sees it (as a reporting integration would)."""

    def __init__(self) -> None:
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs))


def _cosine(rho: float, t: int, total: int) -> float:
    return rho * (1 - math.cos(math.pi * t / total)) / 2


def test_logs_carry_the_cosine_sigma_of_the_last_step(tmp_path):
    rho, total = 0.3, 6
    cb, after = FlatLoraCallback(rho=rho), LogRecorder()
    trainer = Trainer(model=toy_model(), args=_args(tmp_path, logging_strategy="steps", logging_steps=1),
                      train_dataset=_dataset(), callbacks=[cb, after])
    trainer.train()
    train_logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in train_logs] == [1, 2, 3, 4, 5, 6]
    for e in train_logs:
        assert e["flat_lora_sigma"] == pytest.approx(_cosine(rho, e["step"], total), rel=1e-12, abs=1e-15)
    summary = trainer.state.log_history[-1]
    assert "train_runtime" in summary and summary["flat_lora_sigma"] == pytest.approx(rho, rel=1e-12)
    # callbacks after it (the console's progress/printer callback is always last) see it too
    seen = [e for e in after.logs if "loss" in e]
    assert [e["flat_lora_sigma"] for e in seen] == [e["flat_lora_sigma"] for e in train_logs]


def test_attach_puts_the_sigma_in_front_of_reporting_integrations(tmp_path):
    # the Trainer puts integrations (TensorBoard, W&B) before the callbacks given to it, like `before` here
    before = LogRecorder()
    trainer = Trainer(model=toy_model(), args=_args(tmp_path, logging_strategy="steps", logging_steps=3),
                      train_dataset=_dataset(), callbacks=[before, FlatLoraCallback(rho=0.3)])
    trainer.train()
    assert before.logs and not any("flat_lora_sigma" in e for e in before.logs)  # too late for them
    before = LogRecorder()
    trainer = Trainer(model=toy_model(), args=_args(tmp_path, logging_strategy="steps", logging_steps=3),
                      train_dataset=_dataset(), callbacks=[before])
    cb = FlatLoraCallback(rho=0.3).attach(trainer)
    assert trainer.callback_handler.callbacks[0] is cb
    trainer.train()
    got = [(e["flat_lora_sigma"]) for e in before.logs if "loss" in e]
    assert got == pytest.approx([_cosine(0.3, 3, 6), _cosine(0.3, 6, 6)], rel=1e-12)
    with pytest.raises(ValueError, match="already holds a FlatLoraCallback"):
        FlatLoraCallback(rho=0.1).attach(trainer)
    with pytest.raises(ValueError, match="needs a transformers Trainer"):
        FlatLoraCallback(rho=0.1).attach(object())


def test_report_to_without_attach_warns():
    state, control = TrainerState(max_steps=3), TrainerControl()
    with pytest.warns(UserWarning, match=r"report_to=\['wandb'\].*attach\(trainer\)"):
        FlatLoraCallback(rho=0.1).on_train_begin(SimpleNamespace(report_to=["wandb"]), state, control,
                                                 model=toy_model())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FlatLoraCallback(rho=0.1).on_train_begin(SimpleNamespace(report_to=[]), state, control, model=toy_model())
        attached = FlatLoraCallback(rho=0.1)
        attached.attach(SimpleNamespace(callback_handler=SimpleNamespace(callbacks=[])))
        attached.on_train_begin(SimpleNamespace(report_to=["wandb"]), state, control, model=toy_model())


# --- flat_lora_config.json and the model card ----------------------------------------------------------------
def _card_lines(folder) -> list[str]:
    return [line for line in (folder / "README.md").read_text().splitlines() if line.startswith(CARD_PREFIX)]


def test_checkpoints_and_the_saved_model_record_the_flat_lora_config(tmp_path):
    import peft

    cfg = FlatLoraConfig(rho=0.2, seed=3, schedule="linear", exclude_modules=["fc2"])
    trainer = Trainer(model=toy_model(), args=_args(tmp_path, save_strategy="steps", save_steps=2),
                      train_dataset=_dataset(), callbacks=[FlatLoraCallback(cfg)])
    trainer.train()
    trainer.save_model()  # no callback event: relies on the files on_train_end wrote there
    for folder, step in [(tmp_path / "checkpoint-2", 2), (tmp_path / "checkpoint-4", 4),
                         (tmp_path / "checkpoint-6", 6), (tmp_path, 6)]:
        assert (folder / "adapter_model.safetensors").is_file()  # PEFT saved an adapter here ...
        record = json.loads((folder / "flat_lora_config.json").read_text())
        assert record["total_steps"] == 6 and record["step"] == step
        assert record["flatlora_version"] == flatlora.__version__
        assert FlatLoraConfig.from_dict(record["config"]) == cfg
        assert load_flat_lora_config(folder) == cfg
        card = (folder / "README.md").read_text()
        assert "library_name: peft" in card and f"- PEFT {peft.__version__}" in card  # ... and its card
        [line] = _card_lines(folder)
        assert "rho=0.2, schedule=linear, 6 optimizer steps, noise seed 3" in line


def test_save_flat_lora_config_before_or_after_save_pretrained(tmp_path):
    import peft

    cfg = FlatLoraConfig(rho=0.1, seed=9)
    after, before = tmp_path / "after", tmp_path / "before"
    toy_model().save_pretrained(after)
    save_flat_lora_config(after, cfg, total_steps=100)
    save_flat_lora_config(after, cfg.replace(rho=0.05), total_steps=100)  # a second call replaces the line
    [line] = _card_lines(after)
    assert "rho=0.05," in line
    assert load_flat_lora_config(after / "flat_lora_config.json") == cfg.replace(rho=0.05)
    # written first, the card is kept and updated by PEFT's save_pretrained
    save_flat_lora_config(before, cfg, total_steps=100, step=40)
    toy_model().save_pretrained(before)
    [line] = _card_lines(before)
    assert "rho=0.1, schedule=cosine, 100 optimizer steps, noise seed 9" in line
    assert f"- PEFT {peft.__version__}" in (before / "README.md").read_text()
    assert json.loads((before / "flat_lora_config.json").read_text())["step"] == 40
    save_flat_lora_config(tmp_path / "nocard", cfg, total_steps=1, model_card=False)
    assert not (tmp_path / "nocard" / "README.md").exists()
    with pytest.raises(ValueError, match="total_steps=0 must be a positive int"):
        save_flat_lora_config(tmp_path, cfg, total_steps=0)
    with pytest.raises(ValueError, match="config must be a FlatLoraConfig"):
        save_flat_lora_config(tmp_path, cfg.to_dict(), total_steps=3)
    with pytest.raises(ValueError, match="does not exist"):
        load_flat_lora_config(tmp_path / "missing")


# --- a train() that raised mid-step ------------------------------------------------------------------------
class Boom(RuntimeError):
    pass


class RaiseMidStep(TrainerCallback):
    """Raises after the first micro-batch of the 2nd optimizer step: the noise of step 2 is live."""

    def on_substep_end(self, args, state, control, **kw):
        if state.global_step == 1:
            raise Boom("simulated failure (e.g. out of memory) between two micro-batches")


def _eval_dataset(n: int = 16):
    gen = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(n, 16, generator=gen), torch.randint(0, 4, (n,), generator=gen)
    return [{"x": xs[i], "labels": ys[i]} for i in range(n)]


def _pre_hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("mode", ["exact", "inplace"])
def test_evaluate_after_a_failed_train_runs_at_clean_weights_and_warns(tmp_path, mode):
    model = toy_model()
    base_before, hooks_before = base_state(model), _pre_hooks(model)
    cb = FlatLoraCallback(rho=0.5, mode=mode)
    trainer = Trainer(model=model, args=_args(tmp_path, per_device_eval_batch_size=8), train_dataset=_dataset(),
                      eval_dataset=_eval_dataset(), callbacks=[cb, RaiseMidStep()])
    with pytest.raises(Boom):
        trainer.train()
    assert cb.flat.is_perturbed  # the failure left the model at W + E
    # independent reference: a fresh model holding the untouched base weights and the trained LoRA weights
    lora = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    ref = toy_model()
    ref.load_state_dict({**base_before, **lora})
    ev = _eval_dataset()
    x, y = torch.stack([e["x"] for e in ev]), torch.stack([e["labels"] for e in ev])
    with torch.no_grad():
        clean = torch.nn.functional.cross_entropy(ref(x)["logits"], y).item()
        noisy = torch.nn.functional.cross_entropy(model(x)["logits"], y).item()  # train mode: still perturbed
    assert abs(noisy - clean) > 1e-3  # so the comparison below can tell W from W + E
    with pytest.warns(RuntimeWarning, match="training step 2 was still applied.*raised mid-step"):
        metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(clean, rel=1e-5)  # mean of two equal batches = mean of all
    assert not cb.flat.is_perturbed and _pre_hooks(model) == hooks_before
    assert not any("forward" in m.__dict__ for m in model.modules())
    after = base_state(model)
    assert all(torch.allclose(after[k], base_before[k], atol=1e-6, rtol=0) for k in after)


@pytest.mark.parametrize("targets, trigger", [(None, "generate"), (["embed_tokens"], "forward")])
def test_guard_catches_forwards_that_skip_the_peft_forward(targets, trigger):
    """``PeftModel.generate`` calls the base model, not the PeftModel's forward. The plain-embedding case has its
    noise in the embedding's own forward, which runs first: its guard must sit on a parent."""
    from kit.models import llama_model

    model = llama_model()
    base = model.get_base_model()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        clean_logits = base(input_ids=ids).logits
        clean_gen = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    cb, state, control = FlatLoraCallback(rho=0.5, target_modules=targets), TrainerState(max_steps=1), TrainerControl()
    cb.on_train_begin(SimpleNamespace(report_to=[]), state, control, model=model)
    cb.on_step_begin(None, state, control)
    model.train()
    with torch.no_grad():
        noisy_logits = base(input_ids=ids).logits
    assert not torch.allclose(noisy_logits, clean_logits, atol=1e-4)
    model.eval()
    with pytest.warns(RuntimeWarning, match="noise of training step 1"), torch.no_grad():
        if trigger == "generate":
            assert torch.equal(model.generate(input_ids=ids, max_new_tokens=4, do_sample=False), clean_gen)
        else:
            assert torch.equal(base(input_ids=ids).logits, clean_logits)
    assert not cb.flat.is_perturbed
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).logits, clean_logits)
        assert torch.equal(model.generate(input_ids=ids, max_new_tokens=4, do_sample=False), clean_gen)


def test_guard_before_a_dora_layer_whose_noise_comes_from_its_hooks():
    """DoRA layers get their exact-mode noise from hooks on the layer: the guard must act before they are read."""
    model = toy_model(use_dora=True)
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        clean = model.get_base_model()(x)["logits"]
    cb, state, control = FlatLoraCallback(rho=0.5), TrainerState(max_steps=1), TrainerControl()
    cb.on_train_begin(SimpleNamespace(report_to=[]), state, control, model=model)
    cb.on_step_begin(None, state, control)
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model.get_base_model()(x)["logits"], clean, atol=1e-4)
    model.eval()
    with pytest.warns(RuntimeWarning, match="eval mode"), torch.no_grad():
        guarded = model.get_base_model()(x)["logits"]  # skips the PeftModel's forward, like generate
    assert torch.equal(guarded, clean) and not cb.flat.is_perturbed


@pytest.mark.parametrize("reentrant", [False, True])
def test_guard_stays_quiet_in_training_with_gradient_checkpointing(tmp_path, reentrant, recwarn):
    from kit.models import llama_model

    model = llama_model()
    hooks_before = _pre_hooks(model)
    cb = FlatLoraCallback(rho=0.5)

    class Live(TrainerCallback):  # placed before cb: sees each step while the noise is on
        def __init__(self) -> None:
            self.seen = []

        def on_substep_end(self, args, state, control, **kw):
            self.seen.append((cb.flat.is_perturbed, _pre_hooks(model) > hooks_before))

        def on_pre_optimizer_step(self, args, state, control, **kw):
            self.seen.append((cb.flat.is_perturbed, _pre_hooks(model) > hooks_before))

    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (16, 8), generator=gen)]
    live = Live()
    args = _args(tmp_path, max_steps=3, gradient_checkpointing=True,
                 gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[live, cb])
    trainer.train()
    assert live.seen == [(True, True)] * 6  # 3 steps x (1 substep end + pre-optimizer): noise and guard live
    assert not [w for w in recwarn if "eval mode" in str(w.message)]
    assert _pre_hooks(model) == hooks_before and not cb.flat.is_perturbed
