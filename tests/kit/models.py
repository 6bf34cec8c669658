"""Tiny models built from configs (no downloads, no network) with PEFT adapters, their batches, and ``loss_of``.

Every builder seeds the global RNG, builds the base model, wraps it with PEFT and overwrites the adapter
factors from a seeded generator (``adapters.randomize_adapters``), so every suite, every rank of a torchrun
launch and every single-process reference builds bit-identical models. ``randomize`` names the convention
("ab": lora_A/B only, "all": every factor and DoRA magnitudes, None: PEFT's init); the defaults and presets
below keep each suite's models exactly as they were before the suites shared this module:

* tests/*.py and tests/analysis: ``toy_model``, ``bert_model``, ``llama_model``, ``gpt2_model`` ("ab");
* tests/variants: ``toy``, ``gpt2``, ``conv_model``, ``embed_model`` ("all");
* tests/distributed: ``dist_bert``, ``dist_llama`` ("ab", adapters drawn with ``seed + 1000``).
"""

from __future__ import annotations

import torch
from torch import nn

from kit.adapters import randomize_adapters


def loss_of(model: nn.Module, batch: dict) -> torch.Tensor:
    """The loss of a forward, from a dict output (toy models) or a transformers ``ModelOutput``."""
    out = model(**batch)
    return out["loss"] if isinstance(out, dict) else out.loss


# --- plain modules ------------------------------------------------------------------------------------------
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


class TinyConvNet(nn.Module):
    """conv1 (3 -> 6, 3x3) -> conv2 (6 -> 8, 3x3, stride 2) -> mean -> head; returns {'loss', 'logits'}."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        h = nn.functional.gelu(self.conv1(x))
        logits = self.head(nn.functional.gelu(self.conv2(h)).mean(dim=(2, 3)))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class TinyEmbedNet(nn.Module):
    """emb (20 tokens x 8) -> mean over the sequence -> fc (8 -> 4); returns {'loss', 'logits'}."""

    def __init__(self, embedding: nn.Embedding | None = None) -> None:
        super().__init__()
        self.emb = embedding if embedding is not None else nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.fc(self.emb(input_ids).mean(dim=1))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


# --- PEFT models ----------------------------------------------------------------------------------------------
def _with_lora(base: nn.Module, seed: int, randomize: str | None, **lora) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base, LoraConfig(**lora))
    if randomize is not None:
        randomize_adapters(model, seed, which=randomize)
    return model


def toy_model(seed: int = 0, dtype: torch.dtype = torch.float32, randomize: str | None = "ab",
              **lora_kwargs) -> nn.Module:
    """ToyMLP (16 -> 32 -> 4) in ``dtype`` with LoRA (r 4, alpha 8) on fc1 and fc2."""
    torch.manual_seed(seed)
    base = ToyMLP().to(dtype)
    return _with_lora(base, seed, randomize, **{**dict(r=4, lora_alpha=8, target_modules=["fc1", "fc2"],
                                                       lora_dropout=0.0), **lora_kwargs})


def bert_model(seed: int = 0, initializer_range: float = 0.02, adapter_seed: int | None = None) -> nn.Module:
    """2-layer BERT classifier (hidden 32, 3 labels) with LoRA on query/value (adapters drawn with
    ``adapter_seed``, default ``seed``)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=32, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=initializer_range)
    return _with_lora(BertForSequenceClassification(cfg), seed if adapter_seed is None else adapter_seed, "ab",
                      r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")


def llama_model(seed: int = 0, adapter_seed: int | None = None, **lora_kwargs) -> nn.Module:
    """2-layer Llama (hidden 32, GQA) with LoRA on q/v/down projections (out dims 32, 16, 32); ``lora_kwargs``
    extend the LoRA config (e.g. ``use_dora``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return _with_lora(LlamaForCausalLM(cfg), seed if adapter_seed is None else adapter_seed, "ab",
                      **{**dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                task_type="CAUSAL_LM"), **lora_kwargs})


def gpt2_model(seed: int = 0, randomize: str | None = "ab", **lora_kwargs) -> nn.Module:
    """A 2-layer GPT-2 (Conv1D layers storing (in, out)) with LoRA on c_attn and c_fc."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return _with_lora(GPT2LMHeadModel(cfg), seed, randomize,
                      **{**dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                task_type="CAUSAL_LM"), **lora_kwargs})


def conv_model(seed: int = 0, randomize: str | None = "all", **lora_kwargs) -> nn.Module:
    """TinyConvNet with LoRA (r 2, alpha 4) on conv1 and conv2."""
    torch.manual_seed(seed)
    return _with_lora(TinyConvNet(), seed, randomize,
                      **{**dict(r=2, lora_alpha=4, target_modules=["conv1", "conv2"]), **lora_kwargs})


def embed_model(seed: int = 0, embedding: nn.Embedding | None = None, randomize: str | None = "all",
                **lora_kwargs) -> nn.Module:
    """TinyEmbedNet (optionally around a given embedding) with LoRA (r 2, alpha 4) on emb and fc."""
    torch.manual_seed(seed)
    return _with_lora(TinyEmbedNet(embedding), seed, randomize,
                      **{**dict(r=2, lora_alpha=4, target_modules=["emb", "fc"]), **lora_kwargs})


MODELS = {"mlp": toy_model, "bert": bert_model, "llama": llama_model, "gpt2": gpt2_model}


# --- the variant suite's and the distributed suites' presets ---------------------------------------------------
def toy(seed: int = 0, randomize: bool = True, **lora_kwargs) -> nn.Module:
    """``toy_model`` with every factor (and DoRA magnitude) randomised, or none (tests/variants)."""
    return toy_model(seed, randomize="all" if randomize else None, **lora_kwargs)


def gpt2(seed: int = 0, **lora_kwargs) -> nn.Module:
    """``gpt2_model`` with every factor (and DoRA magnitude) randomised (tests/variants)."""
    return gpt2_model(seed, randomize="all", **lora_kwargs)


def dist_bert(seed: int = 0) -> nn.Module:
    """The distributed suites' BERT: initializer_range 0.2 and adapters drawn with ``seed + 1000``."""
    return bert_model(seed, initializer_range=0.2, adapter_seed=seed + 1000)


def dist_llama(seed: int = 0, dora: bool = False) -> nn.Module:
    """The distributed suites' Llama, with LoRA or DoRA; adapters drawn with ``seed + 1000``."""
    return llama_model(seed, adapter_seed=seed + 1000, use_dora=dora)


# --- batches ---------------------------------------------------------------------------------------------------
def batch_for(kind: str, seed: int = 0, n: int = 4, length: int = 8) -> dict:
    """A batch for ``MODELS[kind]``: features and labels for "mlp", token ids and labels for "bert", token ids
    as their own labels for any other kind (language models)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return {"x": torch.randn(n, 16, generator=gen), "labels": torch.randint(0, 4, (n,), generator=gen)}
    ids = torch.randint(0, 64, (n, length), generator=gen)
    if kind == "bert":
        return {"input_ids": ids, "labels": torch.randint(0, 3, (n,), generator=gen)}
    return {"input_ids": ids, "labels": ids}


def mlp_batch(seed: int = 0, n: int = 8) -> dict:
    return batch_for("mlp", seed, n)


def lm_batch(seed: int = 0, n: int = 4, length: int = 8) -> dict:
    return batch_for("lm", seed, n, length)


def conv_batch(seed: int = 0, n: int = 4) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 3, 9, 9, generator=gen), "labels": torch.randint(0, 4, (n,), generator=gen)}


def embed_batch(seed: int = 0, n: int = 4) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 20, (n, 6), generator=gen), "labels": torch.randint(0, 4, (n,), generator=gen)}
