"""A stand-in for Unsloth's fused LoRA paths, patched onto a tiny decoder the way Unsloth patches a Llama.

Unsloth cannot be imported without a GPU. What flatlora.integrations relies on is how Unsloth installs its
kernels and what they read, taken from unsloth 2026.10.9 (the PyPI wheel):

* unsloth/models/llama.py, ``FastLlamaModel.patch_peft_model``: for every decoder layer whose projections all hold
  LoRA, ``layer.self_attn.apply_qkv = apply_lora_qkv``, ``layer.self_attn.apply_o = apply_lora_o`` (plain functions
  on the instance) and ``mlp.forward = types.MethodType(apply_lora_mlp_swiglu, mlp)`` (``mlp._unsloth_forward``
  when a tiled MLP already wraps it; a ``functools.partial(..., inplace=False)`` for Cohere);
* unsloth/models/llama.py, ``LlamaAttention_fast_forward``: ``getattr(self, "apply_qkv", original_apply_qkv)(self,
  hidden_states)`` and ``getattr(self, "apply_o", original_apply_o)(self, attn_output)``;
* unsloth/kernels/fast_lora.py ``apply_lora_qkv`` / ``apply_lora_o`` / ``apply_lora_mlp_swiglu``: take
  ``get_lora_parameters(proj)`` (unsloth/kernels/utils.py: ``base_layer.weight``, its ``quant_state``,
  ``lora_A[adapter].weight``, ``lora_B[adapter].weight``, ``scaling[adapter]``) and compute
  ``X W^T + s (X A^T) B^T`` in their own autograd functions (``matmul_lora``), never calling a forward;
* unsloth/models/qwen3_moe.py: ``Qwen3MoeMLP.forward = fast_swiglu_inference`` (defined in models/llama.py), and
  every model's ``<Model>ForCausalLM.forward = CausalLM_fast_forward(...)`` (models/llama.py), whose loss reads
  ``self.lm_head.weight`` unless ``UNSLOTH_RETURN_LOGITS=1``.

The stand-in kernels below compute the same math from the same tensors, and carry Unsloth's module and function
names (``__module__``, ``__qualname__``), which is all the detection reads.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn

FAST_LORA = "unsloth.kernels.fast_lora"
LLAMA = "unsloth.models.llama"


def _named(module: str, qualname: str):
    def mark(fn):
        fn.__module__, fn.__qualname__, fn.__name__ = module, qualname, qualname.rpartition(".")[2]
        return fn
    return mark


def get_lora_parameters(proj: nn.Module):
    """unsloth/kernels/utils.py ``get_lora_parameters`` for an unquantized single-adapter layer."""
    adapter = proj.active_adapters[0]
    return proj.base_layer.weight, None, proj.lora_A[adapter].weight, proj.lora_B[adapter].weight, proj.scaling[adapter]


def matmul_lora(X: torch.Tensor, W, W_quant, A, B, s) -> torch.Tensor:
    """unsloth/kernels/utils.py ``matmul_lora``: ``X W^T + s (X A^T) B^T`` from the raw tensors."""
    return X @ W.t() + s * ((X @ A.t()) @ B.t())


@_named(FAST_LORA, "apply_lora_qkv")
def apply_lora_qkv(self, X, inplace=True):
    return tuple(matmul_lora(X, *get_lora_parameters(p)) for p in (self.q_proj, self.k_proj, self.v_proj))


@_named(FAST_LORA, "apply_lora_o")
def apply_lora_o(self, X):
    return matmul_lora(X, *get_lora_parameters(self.o_proj))


@_named(FAST_LORA, "apply_lora_mlp_swiglu")
def apply_lora_mlp_swiglu(self, X, inplace=True):
    gate = matmul_lora(X, *get_lora_parameters(self.gate_proj))
    up = matmul_lora(X, *get_lora_parameters(self.up_proj))
    return matmul_lora(nn.functional.silu(gate) * up, *get_lora_parameters(self.down_proj))


@_named(LLAMA, "fast_swiglu_inference")
def fast_swiglu_inference(self, X):
    """models/llama.py ``fast_swiglu_inference`` through ``fast_linear_forward`` (q_len > 1: ``matmul_lora``)."""
    return apply_lora_mlp_swiglu(self, X)


def original_apply_qkv(self, X):
    return self.q_proj(X), self.k_proj(X), self.v_proj(X)


def original_apply_o(self, X):
    return self.o_proj(X)


class Attention(nn.Module):
    """Single-head causal attention with Unsloth's call pattern for ``apply_qkv``/``apply_o``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Q, K, V = getattr(self, "apply_qkv", original_apply_qkv)(self, x)
        scores = (Q @ K.transpose(-1, -2)) / Q.shape[-1] ** 0.5
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
        out = scores.masked_fill(mask, float("-inf")).softmax(-1) @ V
        return getattr(self, "apply_o", original_apply_o)(self, out)


class MLP(nn.Module):
    """transformers' ``LlamaMLP``."""

    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class FastMLP(MLP):
    """A class whose forward Unsloth replaced, as ``Qwen3MoeMLP.forward = fast_swiglu_inference``."""

    forward = fast_swiglu_inference


class Block(nn.Module):
    def __init__(self, d: int, h: int, mlp_cls: type = MLP) -> None:
        super().__init__()
        self.self_attn, self.mlp = Attention(d), mlp_cls(d, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(x)
        return x + self.mlp(x)


class TinyDecoder(nn.Module):
    """embed -> 2 blocks -> lm_head; ``forward(input_ids, labels)`` returns ``{"loss", "logits"}``."""

    def __init__(self, d: int = 16, h: int = 24, vocab: int = 32, mlp_cls: type = MLP) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, h, mlp_cls) for _ in range(2))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        logits = self.lm_head(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return out


@_named(LLAMA, "CausalLM_fast_forward.<locals>._CausalLM_fast_forward")
def _causal_lm_fast_forward(self, input_ids, labels=None):
    """Unsloth's causal-LM forward: the loss from ``self.lm_head.weight`` (its fused cross-entropy)."""
    x = self.embed_tokens(input_ids)
    for layer in self.layers:
        x = layer(x)
    logits = x @ self.lm_head.weight.t()
    out = {"logits": logits}
    if labels is not None:
        out["loss"] = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    return out


class FastDecoder(TinyDecoder):
    """A causal LM whose class forward Unsloth replaced (``LlamaForCausalLM.forward = CausalLM_fast_forward(...)``)."""

    forward = _causal_lm_fast_forward


ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_decoder(seed: int = 0, targets: list[str] = ALL, base: type = TinyDecoder, **kwargs) -> nn.Module:
    """``TinyDecoder`` with LoRA (r 4, dropout 0, bias none: the case Unsloth fuses), adapters randomised."""
    from kit.adapters import randomize_adapters
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(base(**kwargs), LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    randomize_adapters(model, seed, which="ab")
    return model


def patch_peft_model(model: nn.Module, tiled: bool = False, cohere: bool = False) -> int:
    """What unsloth's ``patch_peft_model`` does to each decoder layer whose projections all hold LoRA; returns the
    number of kernels installed."""
    apply_mlp = functools.partial(apply_lora_mlp_swiglu, inplace=False) if cohere else apply_lora_mlp_swiglu
    n = 0
    for layer in model.base_model.model.layers:
        mlp, attn = layer.mlp, layer.self_attn
        if all(hasattr(getattr(mlp, p), "lora_A") for p in ("gate_proj", "up_proj", "down_proj")):
            if tiled:
                mlp._unsloth_forward = types.MethodType(apply_mlp, mlp)
            else:
                mlp.forward = types.MethodType(apply_mlp, mlp)
            n += 1
        if all(hasattr(getattr(attn, p), "lora_A") for p in ("q_proj", "k_proj", "v_proj")):
            attn.apply_qkv = apply_lora_qkv
            n += 1
        if hasattr(attn.o_proj, "lora_A"):
            attn.apply_o = apply_lora_o
            n += 1
    return n
