"""Reference models inside a perturbed step: with the adapters disabled (``model.disable_adapter()``, the
reference of TRL's DPO, KTO, ORPO and GRPO's KL term) the exact mode computes with the clean weights ``W0``, bit
for bit, while the policy forwards of the same step see ``W + E``. The in-place mode, whose base weights hold the
noise, refuses such a forward. The end-to-end check runs TRL's real ``DPOTrainer`` on a tiny random Llama."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo
from torch import nn

from flatlora import FlatLora, FlatLoraConfig
from kit.compare import base_state
from kit.models import batch_for, gpt2_model, llama_model, toy_model

T = 4

MODELS = {  # builder, batch kind, target_modules
    "mlp (swapped forward)": (toy_model, "mlp", None),
    "dora (noise beside, hooks)": (lambda: toy_model(use_dora=True), "mlp", None),
    "gpt2 Conv1D": (gpt2_model, "gpt2", None),
    "llama": (llama_model, "llama", None),
    "llama + plain lm_head": (llama_model, "llama", ["_proj$", "lm_head$"]),
}


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch)["logits"].detach()


def reference(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad(), model.disable_adapter():
        return logits(model, batch)


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("ref_first", [False, True])
def test_disabled_adapters_compute_the_clean_model_inside_a_step(kind, ref_first):
    build, batch_kind, targets = MODELS[kind]
    model = build().eval()
    batch = batch_for(batch_kind)
    clean_ref, clean_policy = reference(model, batch), logits(model, batch)
    assert not torch.allclose(clean_ref, clean_policy, atol=1e-4)  # the adapters matter
    flat = FlatLora(model, FlatLoraConfig(rho=0.5, target_modules=targets), total_steps=T)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the policy forward ran: nothing bypassed
        with flat.perturbed(T):
            ref_in_step = reference(model, batch) if ref_first else None
            policy = logits(model, batch)
            ref_in_step = reference(model, batch) if not ref_first else ref_in_step
    assert torch.equal(ref_in_step, clean_ref)  # bit for bit
    assert not torch.allclose(policy, clean_policy, atol=1e-4)
    assert flat._seen == set(range(len(flat.targets)))


def test_the_policy_sees_the_same_noise_whether_the_reference_runs_first(monkeypatch):
    """Under FSDP2 a layer's noise scale is taken at its first forward of the step (simulated: every layer
    reported sharded). A reference forward first must not take it from W0 alone (adapters disabled)."""
    import flatlora._sharding

    batch = batch_for("llama")
    out = {}
    for ref_first in (False, True):
        model = llama_model().eval()
        flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)
        monkeypatch.setattr(flatlora._sharding, "sharded", lambda target: True)
        with flat.perturbed(T):
            if ref_first:
                reference(model, batch)
            out[ref_first] = logits(model, batch)
        monkeypatch.undo()
    assert torch.equal(out[True], out[False])


def test_only_a_disabled_adapter_forward_is_not_a_perturbed_step():
    model = toy_model()
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)
    with pytest.raises(RuntimeError, match="none of the 2 layers"):
        with flat.perturbed(T):
            reference(model, batch_for("mlp"))


def test_disabled_adapters_under_compile():
    torch._dynamo.reset()
    model = toy_model().eval()
    batch = batch_for("mlp")
    compiled = torch.compile(model, backend="aot_eager")
    clean_ref, clean_policy = reference(compiled, batch), logits(compiled, batch)
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            for t in (2, 3):
                with flat.perturbed(t):
                    policy = logits(compiled, batch)
                    ref = reference(compiled, batch)
                assert torch.equal(ref, clean_ref)
                assert not torch.allclose(policy, clean_policy, atol=1e-4)
    finally:
        torch._dynamo.reset()


def _switched_reference(model: nn.Module, batch: dict) -> torch.Tensor:
    """The reference as TRL computes it for a PeftModel: a frozen copy of the adapter, "ref", made active."""
    model.set_adapter("ref")
    try:
        with torch.no_grad():
            return logits(model, batch)
    finally:
        model.set_adapter("default")


def _with_ref_adapter(model: nn.Module) -> nn.Module:
    model.add_adapter("ref", model.peft_config["default"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".default." in name:
                model.get_parameter(name.replace(".default.", ".ref.")).copy_(p)
    return model


def test_a_switched_adapter_computes_the_clean_reference_inside_a_step():
    model = _with_ref_adapter(toy_model()).eval()
    batch = batch_for("mlp")
    clean = _switched_reference(model, batch)
    torch.testing.assert_close(clean, logits(model, batch), rtol=0, atol=1e-6)  # the copy computes the same
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with flat.perturbed(T):
            policy = logits(model, batch)
            ref = _switched_reference(model, batch)
    assert torch.equal(ref, clean) and not torch.allclose(policy, clean, atol=1e-4)


@pytest.mark.parametrize("how", ["disabled", "switched"])
def test_inplace_mode_refuses_a_reference_forward(how):
    model = _with_ref_adapter(toy_model())
    before = base_state(model)
    flat = FlatLora(model, FlatLoraConfig(rho=0.5, mode="inplace"), total_steps=T)
    what = "its adapters disabled" if how == "disabled" else r"adapters \['ref'\] active instead of \['default'\]"
    with pytest.raises(ValueError, match=r"layer 'base_model.model.fc1' ran a forward with " + what + r".*"
                                         r"perturbed\(4\) with mode='inplace'.*Use mode='exact'"):
        with flat.perturbed(T):
            logits(model, batch_for("mlp"))  # the policy: fine
            (reference if how == "disabled" else _switched_reference)(model, batch_for("mlp"))
    assert not flat.is_perturbed and not any(m._forward_pre_hooks for m in model.modules())
    assert all(torch.allclose(before[k], v, rtol=0, atol=1e-6) for k, v in base_state(model).items())


# --- TRL's DPOTrainer --------------------------------------------------------------------------------------------
WORDS = "the a cat dog sat ran on mat log is red blue good bad yes no what color sky grass".split()


def _tokenizer():
    """A word-level tokenizer over `WORDS`, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _llama(tok) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg)


def _dpo(tmp_path, targets: list[str], wrapped: bool, steps: int = 2):
    """TRL's DPOTrainer with FlatLoraCallback, no separate reference model, learning rate 0 (so the clean model
    after training is the clean model of every step). ``wrapped=False``: the trainer gets a plain model and a
    ``peft_config`` and computes the reference under ``disable_adapter()``; ``wrapped=True``: it gets a PeftModel
    with a (random) adapter and computes the reference with a frozen copy, the "ref" adapter, activated inside
    the step. Every forward of the PeftModel is recorded: kwargs, adapters (None: disabled), log-probabilities."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import DPOConfig, DPOTrainer

    from flatlora import FlatLoraCallback
    from kit.adapters import randomize_lora

    tok = _tokenizer()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM")
    model, peft_config = _llama(tok), lora
    if wrapped:
        model, peft_config = get_peft_model(model, lora), None
        randomize_lora(model, 0)
    data = Dataset.from_dict({
        "prompt": ["what color is the sky", "what color is the grass", "the cat sat on", "the dog ran on"],
        "chosen": [" blue", " red", " the mat", " the log"],
        "rejected": [" red good", " blue", " the dog", " a cat is bad"]})
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=steps, learning_rate=0.0,
                     use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
                     dataloader_num_workers=0, seed=0, beta=0.1)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft_config,
                         callbacks=[FlatLoraCallback(rho=0.5, schedule="constant")])
    calls = []

    def record(module, args, kwargs, output):
        q = module.base_model.model.model.layers[0].self_attn.q_proj
        adapters = None if q.disable_adapters else tuple(q.active_adapters)
        calls.append((dict(kwargs), adapters, output.log_probs.detach().clone()))

    handle = trainer.model.register_forward_hook(record, with_kwargs=True)
    trainer.train()
    handle.remove()
    return trainer, calls


@pytest.mark.parametrize("wrapped", [False, True], ids=["peft_config: adapters disabled", "PeftModel: ref adapter"])
def test_dpo_reference_log_probs_inside_a_perturbed_step_are_the_clean_models(tmp_path, wrapped):
    from trl.trainer.utils import use_adapter

    trainer, calls = _dpo(tmp_path, ["q_proj", "v_proj", "down_proj"], wrapped)
    model = trainer.model
    ref = ("ref",) if wrapped else None
    assert [adapters for _, adapters, _ in calls] == [("default",), ref] * 2  # policy, then reference; 2 steps
    for kwargs, adapters, got in calls:
        with torch.no_grad():
            if adapters == ref:
                with use_adapter(model, "ref" if wrapped else None):  # as DPOTrainer does
                    want = model(**kwargs).log_probs
                assert torch.equal(got, want)  # the clean reference model, bit for bit
            else:
                want = model(**kwargs).log_probs
                mask = kwargs["labels"][:, 1:] != -100
                assert (got - want)[mask].abs().max() > 1e-3  # the policy ran at W + E

