"""AdaLoRA: its SVD layers (LoraLayer subclasses) get noise on W_base + B (A * E) s / (ranknum + 1e-5), and
``update_and_allocate`` is called once per optimizer step, after optimizer.step() and before zero_grad(), by
the Trainer callback (``adalora_update=True``, the default) or by the plain loop of docs/variants.md."""

import copy

import pytest
import torch
from peft import AdaLoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from flatlora import FlatLora, FlatLoraCallback, FlatLoraConfig
from kit.adapters import randomize_adapters
from kit.checks import check_variant
from kit.models import ToyMLP, lm_batch, loss_of, mlp_batch
from kit.references import PREFIX

T = 8
INIT_R, TARGET_R = 4, 2


def _adalora_toy(seed: int = 0, randomize: bool = True):
    torch.manual_seed(seed)
    cfg = AdaLoraConfig(init_r=INIT_R, target_r=TARGET_R, tinit=1, tfinal=2, deltaT=1, total_step=T, lora_alpha=8,
                        target_modules=["fc1", "fc2"])
    model = get_peft_model(ToyMLP(), cfg)
    if randomize:  # lora_E starts at 0 (no delta): give it values
        randomize_adapters(model, seed)
    return model


def _adalora_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = get_peft_model(LlamaForCausalLM(cfg), AdaLoraConfig(
        init_r=INIT_R, target_r=TARGET_R, total_step=T, lora_alpha=8, target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM"))
    randomize_adapters(model, seed)
    return model


def _adalora_bert(seed: int = 0):
    """BERT layers have biases and 3-D inputs: F.linear then returns a view, and AdaLoRA adds in place to it."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    model = get_peft_model(BertForSequenceClassification(cfg), AdaLoraConfig(
        init_r=INIT_R, target_r=TARGET_R, total_step=T, lora_alpha=8, target_modules=["query", "value", "dense"],
        task_type="SEQ_CLS"))
    randomize_adapters(model, seed)
    return model


def _nonzero_ranks(model) -> int:
    return sum(int((p != 0).sum()) for n, p in model.named_parameters() if "lora_E" in n)


def test_the_svd_layers_are_the_targets():
    from peft.tuners.adalora import SVDLinear

    model = _adalora_toy()
    flat = FlatLora(model, FlatLoraConfig(), total_steps=T)
    assert flat.targets == [PREFIX + "fc1", PREFIX + "fc2"]
    assert all(isinstance(t.module, SVDLinear) for t in flat.target_layers)


def _manual_adalora_merge(model, names) -> dict:
    """W0 + B (A * E) * scaling / (ranknum + 1e-5), from the parameters."""
    out = {}
    for name in names:
        m = model.get_submodule(name)
        a, b, e = m.lora_A["default"], m.lora_B["default"], m.lora_E["default"]
        delta = b @ (a * e) * m.scaling["default"] / (m.ranknum["default"] + 1e-5)
        out[name] = (m.base_layer.weight + delta).detach().float()
    return out


@pytest.mark.parametrize("which", ["mlp", "llama", "bert"])
def test_adalora_noise_scale_and_gradients(which):
    model = {"mlp": _adalora_toy, "llama": _adalora_llama, "bert": _adalora_bert}[which]().train()
    if which == "bert":
        batch = {"input_ids": lm_batch()["input_ids"], "labels": torch.tensor([0, 1, 2, 0])}
    else:
        batch = mlp_batch() if which == "mlp" else lm_batch()
    # both PEFT's merge and the closed form above serve as the true weight
    check_variant(model, batch, total=T, merged=_manual_adalora_merge,
                  after_step=lambda m: lambda t: m.base_model.update_and_allocate(t - 1))
    check_variant(model, batch, total=T, modes=("exact",))


def _data(n: int = 16) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(16, generator=gen), "labels": torch.randint(0, 4, (), generator=gen)} for _ in range(n)]


def _spy_on_update(model, flat_of) -> list:
    """Wrap the tuner's update_and_allocate: record (step, perturbed?, the step's gradients still there?)."""
    tuner = model.base_model
    original = tuner.update_and_allocate
    calls = []

    def spy(step):
        grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
        present = all(g is not None for g in grads) and any(bool(g.abs().sum() > 0) for g in grads)
        calls.append((step, flat_of().is_perturbed, present))
        return original(step)

    tuner.update_and_allocate = spy
    return calls


def _train_with_trainer(tmp_path, adalora_update: bool = True):
    model = _adalora_toy(randomize=False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    cb = FlatLoraCallback(rho=0.3, seed=2, adalora_update=adalora_update)
    calls = _spy_on_update(model, lambda: cb.flat)
    data = _data()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=len(data), max_steps=T,
                             use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
                             remove_unused_columns=False, seed=0, max_grad_norm=0.0, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched), callbacks=[cb]).train()
    return model, calls


def _train_plain_loop():
    """The loop of docs/variants.md: update_and_allocate(t - 1) after optimizer.step(), before zero_grad()."""
    model = _adalora_toy(randomize=False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    flat = FlatLora(model, FlatLoraConfig(rho=0.3, seed=2), total_steps=T)
    data = _data()
    batch = {"x": torch.stack([d["x"] for d in data]), "labels": torch.stack([d["labels"] for d in data])}
    for t in range(1, T + 1):
        with flat.perturbed(t):
            loss_of(model, batch).backward()
        opt.step()
        model.base_model.update_and_allocate(t - 1)
        opt.zero_grad()
    return model


def test_the_callback_calls_update_and_allocate_like_the_plain_loop(tmp_path):
    trained, calls = _train_with_trainer(tmp_path)
    # once per optimizer step, 0-based, on clean weights, while the step's gradients are still there
    assert calls == [(s, False, True) for s in range(T)]
    # AdaLoRA pruned to its final budget: target_r ranks per layer
    assert _nonzero_ranks(trained) == TARGET_R * 2
    assert trained.peft_config["default"].rank_pattern
    # the same run written as the documented plain loop (full batch each step) ends at the same adapters
    loop = _train_plain_loop()
    assert loop.peft_config["default"].rank_pattern == trained.peft_config["default"].rank_pattern
    for (n, a), (_, b) in zip(trained.named_parameters(), loop.named_parameters()):
        if "lora_" in n:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=n)


def test_adalora_update_can_be_switched_off(tmp_path):
    trained, calls = _train_with_trainer(tmp_path, adalora_update=False)
    assert calls == []
    assert _nonzero_ranks(trained) == INIT_R * 2  # nothing pruned


def test_the_callback_option_round_trips_and_is_validated():
    cb = FlatLoraCallback(rho=0.1, adalora_update=False)
    rebuilt = FlatLoraCallback.from_state(cb.state())
    assert rebuilt.adalora_update is False and rebuilt.config == cb.config
    with pytest.raises(ValueError, match="adalora_update='yes'"):
        FlatLoraCallback(adalora_update="yes")


def test_a_plain_lora_model_gets_no_adalora_call(tmp_path):
    from kit.models import toy

    model = toy()
    cb = FlatLoraCallback(rho=0.3)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, use_cpu=True,
                             report_to=[], save_strategy="no", logging_strategy="no", remove_unused_columns=False)
    Trainer(model=copy.deepcopy(model), args=args, train_dataset=_data(), callbacks=[cb]).train()
    assert cb._adalora is None
