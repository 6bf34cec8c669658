"""Flat-LoRA in transformers' Trainer through `FlatLoraCallback` (runs in seconds on a CPU, core install only).

    python examples/trainer_callback.py [OUTPUT_DIR]

A tiny BERT is built from a config (no download), with random token data; swap in any PEFT model and dataset.
Prints sigma and the loss of every logged step to stdout.
"""

import sys
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from flatlora import FlatLoraCallback

torch.manual_seed(0)
bert = BertForSequenceClassification(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=128, vocab_size=100, num_labels=2))
model = get_peft_model(bert, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS"))
gen = torch.Generator().manual_seed(0)
data = [{"input_ids": torch.randint(0, 100, (16,), generator=gen), "labels": int(torch.randint(0, 2, (), generator=gen))}
        for _ in range(64)]

out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="flatlora-trainer-")
args = TrainingArguments(output_dir=out, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                         max_steps=4, learning_rate=5e-4, logging_steps=1, save_strategy="no", report_to=[],
                         use_cpu=True, disable_tqdm=True)
trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[FlatLoraCallback(rho=0.05)])
trainer.train()
for log in trainer.state.log_history:
    if "loss" in log:
        print(f"step {log['step']}  sigma {log['flat_lora_sigma']:.4f}  loss {log['loss']:.4f}")
