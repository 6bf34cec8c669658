"""The GPU benchmark's model and steps: a Llama built from a config (random weights), LoRA on every linear layer.

``llama-1b`` has the shape of Llama 3.2 1B (hidden 2048, 16 layers, 32 query / 8 key-value heads, FFN 8192,
vocabulary 128256, tied embeddings: 1.24B parameters); ``llama-tiny`` is a stand-in of the same architecture
for smoke runs on CPU. The base is cast to ``dtype`` (bf16 on the GPU); PEFT keeps the adapters in fp32. LoRA r
16, alpha 32, no dropout on ``all-linear`` (q, k, v, o, gate, up, down: 7 per block; not the LM head).

A step is ``gradients over the micro-batches -> AdamW step -> zero_grad``; the gradient rules compared:

* ``lora``: ``sum_k (loss_k / K).backward()``;
* ``flat-exact``: the same inside ``FlatLora.perturbed(t)`` (exact mode), noise from the default backend (the
  Triton kernel on CUDA when triton runs, see `flatlora.noise.backend_for`);
* ``flat-exact-torch``: the same with ``flatlora.noise.use_backend("torch")`` (torch's generator + 3 passes);
* ``lora-sam``: SAM on the LoRA factors with accumulation: gradients over all micro-batches, ``e = rho g /
  ||g||`` on A and B, gradients again over all micro-batches at ``(A, B) + e``, factors restored.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from flatlora import FlatLora, FlatLoraConfig, noise

GPU_VARIANTS = ("lora", "flat-exact", "flat-exact-torch", "lora-sam")
Step = Callable[[int], None]


@dataclass(frozen=True)
class LlamaSpec:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    def describe(self) -> str:
        return (f"Llama {self.layers}x{self.hidden}, {self.heads}/{self.kv_heads} heads, FFN {self.intermediate}, "
                f"vocab {self.vocab}, tied embeddings")


LLAMA_PRESETS = {
    "llama-1b": LlamaSpec("llama-1b", 2048, 16, 32, 8, 8192, 128256),  # Llama 3.2 1B's shape
    "llama-tiny": LlamaSpec("llama-tiny", 64, 2, 4, 2, 128, 1000),
}


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Initialise from a fixed seed without touching the caller's RNG state (CPU and, on CUDA, the device)."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def build_llama(spec: LlamaSpec, *, rank: int, seed: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``LlamaForCausalLM`` initialised on ``device`` in ``dtype`` (no fp32 copy on the host), with PEFT LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                         num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                         num_key_value_heads=spec.kv_heads, max_position_embeddings=8192, rope_theta=500000.0,
                         tie_word_embeddings=True)
    with _seeded(seed, device), _default_dtype(dtype), torch.device(device):
        model = LlamaForCausalLM(config)
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    return model.train()


def token_batches(spec: LlamaSpec, tokens: int, seq: int, micro: int, seed: int,
                  device: torch.device) -> list[dict[str, torch.Tensor]]:
    """``micro`` micro-batches of ``tokens`` tokens each (``tokens // seq`` sequences of ``seq``), random ids,
    labels = ids (causal LM loss), no padding."""
    if tokens % seq:
        raise ValueError(f"tokens={tokens} must be a multiple of seq={seq}")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(micro):
        ids = torch.randint(0, spec.vocab, (tokens // seq, seq), generator=gen).to(device)
        out.append({"input_ids": ids, "labels": ids})
    return out


def _sam_grads(model: nn.Module, params: list[nn.Parameter], trainable: list[nn.Parameter],
               grads: Callable[[], None], rho: float) -> None:
    """LoRA-SAM over all micro-batches: ``grads()`` at (A, B), then at (A, B) + rho g / ||g||."""
    grads()
    g = [p.grad for p in params]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in g if x is not None]))
    scale = rho / (norm + 1e-12)
    eps = [None if x is None else x * scale for x in g]
    for p in trainable:
        p.grad = None
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, e in zip(params, eps):
                if e is not None:
                    p.add_(e)
        grads()
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def build_gpu_steps(model: nn.Module, parts: list[dict], *, variants: list[str], total_steps: int, rho: float,
                    sam_rho: float, seed: int, lr: float = 1e-5) -> tuple[dict[str, Step], dict[str, str]]:
    """One step function per variant (sharing ``model``, the micro-batches and one AdamW), and notes on each."""
    unknown = sorted(set(variants) - set(GPU_VARIANTS))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {', '.join(GPU_VARIANTS)}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    opt = torch.optim.AdamW(trainable, lr=lr)
    flat = FlatLora(model, FlatLoraConfig(rho=rho, seed=seed), total_steps=total_steps)
    weight = flat.target_layers[0].base_weight() if flat.targets else None

    def grads() -> None:
        for p in parts:
            (model(**p).loss / len(parts)).backward()

    def finish() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    def plain(t: int) -> None:
        grads()
        finish()

    def flat_step(backend: str | None) -> Step:
        def step(t: int) -> None:
            with contextlib.nullcontext() if backend is None else noise.use_backend(backend):
                with flat.perturbed(t):
                    grads()
            finish()
        return step

    def sam(t: int) -> None:
        _sam_grads(model, lora, trainable, grads, sam_rho)
        finish()

    table = {"lora": plain, "flat-exact": flat_step(None), "flat-exact-torch": flat_step("torch"), "lora-sam": sam}
    notes = {}
    if weight is not None:
        dev, dt = weight.device, weight.dtype
        notes["flat-exact"] = (f"FlatLora(mode='exact', rho={rho}), {len(flat.targets)} layers, noise backend "
                               f"{noise.backend_for(dev, dt)!r}")
        with noise.use_backend("torch"):
            notes["flat-exact-torch"] = f"the same, noise backend {noise.backend_for(dev, dt)!r}"
    notes["lora-sam"] = f"LoRA-SAM on A, B (rho={sam_rho}), two passes over all micro-batches"
    return {v: table[v] for v in variants}, notes
