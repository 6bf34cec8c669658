"""Flat-LoRA in a plain PyTorch loop, with gradient accumulation (runs in seconds on a CPU).

    python examples/plain_loop.py

A tiny BERT is built from a config (no download); swap in any PEFT model and data loader.
"""

import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

from flatlora import FlatLora, FlatLoraConfig

torch.manual_seed(0)
bert = BertForSequenceClassification(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=128, vocab_size=100, num_labels=2))
model = get_peft_model(bert, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS"))
gen = torch.Generator().manual_seed(0)
loader = [[{"input_ids": torch.randint(0, 100, (8, 16), generator=gen),
            "labels": torch.randint(0, 2, (8,), generator=gen)} for _ in range(2)]  # 2 micro-batches per step
          for _ in range(20)]

optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
flat = FlatLora(model, FlatLoraConfig(rho=0.05), total_steps=len(loader))
for t, micro_batches in enumerate(loader, start=1):   # t = optimizer step, 1..T
    with flat.perturbed(t):                            # every micro-batch of step t runs at W + E_t
        for batch in micro_batches:
            (model(**batch).loss / len(micro_batches)).backward()
    optimizer.step()                                   # ... and the optimizer sees W again
    optimizer.zero_grad()
    if t % 5 == 0:
        print(f"step {t:2d}  sigma {flat.sigma(t):.4f}  loss {model(**micro_batches[0]).loss.item():.4f}")
