"""Tiny models built from configs (no downloads) with PEFT LoRA adapters, and reference helpers."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


class ToyMLP(nn.Module):
    """y = fc2(gelu(fc1(x))); returns {'loss', 'logits'} like a transformers model."""

    def __init__(self, d_in: int = 16, d_hidden: int = 32, d_out: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.fc2(torch.nn.functional.gelu(self.fc1(x)))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = torch.nn.functional.cross_entropy(logits, labels)
        return out


def randomize_lora(model: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Give lora_B (zero at init) random values so the merged weight differs from the base."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def toy_model(seed: int = 0, dtype: torch.dtype = torch.float32, **lora_kwargs) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = ToyMLP().to(dtype)
    cfg = dict(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], lora_dropout=0.0)
    cfg.update(lora_kwargs)
    model = get_peft_model(base, LoraConfig(**cfg))
    randomize_lora(model, seed)
    return model


def bert_model(seed: int = 0) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=32, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = get_peft_model(BertForSequenceClassification(cfg),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    randomize_lora(model, seed)
    return model


def llama_model(seed: int = 0) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = get_peft_model(LlamaForCausalLM(cfg),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                      task_type="CAUSAL_LM"))
    randomize_lora(model, seed)
    return model


def gpt2_model(seed: int = 0) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = get_peft_model(GPT2LMHeadModel(cfg),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                      task_type="CAUSAL_LM"))
    randomize_lora(model, seed)
    return model


MODELS = {"mlp": toy_model, "bert": bert_model, "llama": llama_model, "gpt2": gpt2_model}


def batch_for(kind: str, seed: int = 0, n: int = 4) -> dict:
    gen = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return {"x": torch.randn(n, 16, generator=gen), "labels": torch.randint(0, 4, (n,), generator=gen)}
    ids = torch.randint(0, 64, (n, 8), generator=gen)
    if kind == "bert":
        return {"input_ids": ids, "labels": torch.randint(0, 3, (n,), generator=gen)}
    return {"input_ids": ids, "labels": ids}


def loss_of(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(**batch)
    return out["loss"] if isinstance(out, dict) else out.loss


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


def reference_at(model: nn.Module, noise: dict[str, torch.Tensor]) -> nn.Module:
    """An independent reference: a deep copy whose stored base weights are overwritten with W_base + E.

    ``noise`` maps LoRA-layer names to E in logical (out, in) layout; GPT-2 Conv1D stores (in, out).
    """
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for name, e in noise.items():
            base = modules[name].get_base_layer()
            w = base.weight
            e = e.t() if type(base).__name__ == "Conv1D" else e
            w.copy_((w.float() + e).to(w.dtype))
    return ref


@pytest.fixture(params=sorted(MODELS))
def model_kind(request) -> str:
    return request.param
