"""Multi-LoRA serving (LoRA Land / LoRAX): adapters trained with Flat-LoRA are ordinary PEFT adapters. Two are
trained on one base, saved (safetensors + adapter_config.json, the same keys as an adapter never trained with
Flat-LoRA), loaded onto one fresh base with load_adapter, switched, mixed per request, and merged."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from flatlora import FlatLora, FlatLoraConfig
from kit.models import lm_batch

STEPS = 4
CONFIGS = {
    "task_a": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    "task_b": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], task_type="CAUSAL_LM"),
}


def _base():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def _adapter_params(model, adapter: str) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{adapter}." in n}


def _train(model, adapter: str, seed: int) -> None:
    """Flat-LoRA on one adapter of a multi-adapter model: only that adapter is active, trained and perturbed."""
    model.set_adapter(adapter)
    other = "task_b" if adapter == "task_a" else "task_a"
    frozen = _adapter_params(model, other)
    flat = FlatLora(model, FlatLoraConfig(rho=0.1, seed=seed), total_steps=STEPS)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for t in range(1, STEPS + 1):
        batch = lm_batch(seed=10 * seed + t)
        with flat.perturbed(t):
            model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    after = _adapter_params(model, other)
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)  # the inactive adapter is untouched


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Train task_a and task_b with Flat-LoRA on one base and save both; also save a never-trained twin."""
    out = tmp_path_factory.mktemp("adapters")
    base = _base()
    base_state = copy.deepcopy(base.state_dict())
    model = get_peft_model(base, CONFIGS["task_a"], adapter_name="task_a")
    model.add_adapter("task_b", CONFIGS["task_b"])
    _train(model, "task_a", seed=1)
    _train(model, "task_b", seed=2)
    model.eval()
    model.save_pretrained(out / "flat")
    plain = get_peft_model(_base(), CONFIGS["task_a"], adapter_name="task_a")  # never saw Flat-LoRA
    plain.add_adapter("task_b", CONFIGS["task_b"])
    plain.save_pretrained(out / "plain")
    return model, base_state, out


@pytest.mark.parametrize("adapter", sorted(CONFIGS))
def test_saved_adapters_are_plain_peft_adapters(served, adapter):
    _, _, out = served
    flat_dir, plain_dir = out / "flat" / adapter, out / "plain" / adapter
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in flat_dir.iterdir()}
    assert not [p for p in flat_dir.iterdir() if p.suffix in (".bin", ".pt", ".pkl")]
    tensors, plain_tensors = load_file(flat_dir / "adapter_model.safetensors"), load_file(
        plain_dir / "adapter_model.safetensors")
    assert tensors.keys() == plain_tensors.keys() and all("lora_" in k for k in tensors)
    assert all(tensors[k].shape == plain_tensors[k].shape for k in tensors)
    cfg, plain_cfg = (json.loads((d / "adapter_config.json").read_text()) for d in (flat_dir, plain_dir))
    assert cfg == plain_cfg  # nothing Flat-LoRA specific is needed (or written) to load it
    assert not any("flat" in k.lower() for k in cfg)


def test_both_adapters_load_onto_one_fresh_base_and_switch(served):
    trained, base_state, out = served
    fresh = _base()
    fresh.load_state_dict(base_state)
    loaded = PeftModel.from_pretrained(fresh, out / "flat" / "task_a", adapter_name="task_a")
    loaded.load_adapter(out / "flat" / "task_b", adapter_name="task_b")
    loaded.eval()
    ids = lm_batch(seed=99)["input_ids"]
    logits = {}
    for adapter in CONFIGS:
        trained.set_adapter(adapter)
        loaded.set_adapter(adapter)
        with torch.no_grad():
            logits[adapter] = loaded(input_ids=ids).logits
            torch.testing.assert_close(logits[adapter], trained(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    with torch.no_grad(), loaded.disable_adapter():
        plain = loaded(input_ids=ids).logits
    assert not torch.allclose(logits["task_a"], logits["task_b"], atol=1e-3)
    assert not torch.allclose(logits["task_a"], plain, atol=1e-3)

    # LoRAX-style mixed batch: each request routed to its own adapter in one forward
    with torch.no_grad():
        mixed = loaded(input_ids=ids[:2], adapter_names=["task_a", "task_b"]).logits
    torch.testing.assert_close(mixed[0], logits["task_a"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], logits["task_b"][1], rtol=1e-5, atol=1e-5)

    # merged weights serve the same outputs as the unmerged adapter
    for adapter in CONFIGS:
        copy_ = copy.deepcopy(loaded)
        copy_.set_adapter(adapter)
        merged = copy_.merge_and_unload()
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=ids).logits, logits[adapter], rtol=1e-4, atol=1e-5)
