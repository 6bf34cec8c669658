"""Check flatlora.integrations.unsloth against the real Unsloth, on a CUDA GPU (Unsloth does not import without one).

    pip install unsloth flatlora
    python examples/unsloth_check.py            # about a minute; prints one line per check, exit status 1 if any fails

A tiny random Llama (built from a config, saved to a temporary folder, no download) goes through
``FastLanguageModel.from_pretrained`` and ``FastLanguageModel.get_peft_model`` (LoRA on all seven projections,
dropout 0, bias none: the case Unsloth fuses). The checks:

1. detection: `fused_lora_paths` finds Unsloth's kernels (apply_qkv, apply_o, the MLP forward) on every layer;
2. the bypass: under ``FlatLora.perturbed`` the fused model's logits equal its clean logits (the noise is lost),
   and `flatlora.integrations.unsloth.check` refuses the model;
3. `prepare`: no fused kernel is left on a perturbed layer, the clean logits stay what the fused kernels gave (to
   bf16 rounding), and the perturbed logits match those of a twin that Unsloth never fused (same weights, same
   noise) as closely as the two clean models match, while differing from the clean ones;
4. training: 3 steps of transformers' Trainer (Unsloth's patched loop) with `FlatLoraCallback`: finite losses
   and flat_lora_sigma in the log.

The same checks run on CPU against a stand-in of Unsloth's patch in tests/integrations/test_unsloth_fused.py.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

RESULTS: list[tuple[str, bool, str]] = []


def report(name: str, ok: bool, detail: str) -> None:
    RESULTS.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)


def tiny_llama(folder: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(252)])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=2, eos_token_id=3, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def load(folder: Path):
    from unsloth import FastLanguageModel
    import torch

    model, tokenizer = FastLanguageModel.from_pretrained(model_name=str(folder), max_seq_length=64,
                                                         dtype=torch.bfloat16, load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(
        model, r=8, lora_alpha=16, lora_dropout=0, bias="none", random_state=0, use_gradient_checkpointing=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    with torch.no_grad():  # lora_B starts at zero: make the adapters matter, the same way in both models
        gen = torch.Generator(device="cpu").manual_seed(1)
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen).to(p))
    return model, tokenizer


def main() -> int:
    import unsloth  # noqa: F401  (first, as Unsloth asks)
    import torch
    from transformers import Trainer, TrainingArguments

    from flatlora import FlatLora, FlatLoraCallback, FlatLoraConfig
    from flatlora.integrations import fused_lora_paths
    from flatlora.integrations import unsloth as fl_unsloth

    if not torch.cuda.is_available():
        print("unsloth_check.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    folder = Path(tempfile.mkdtemp(prefix="flatlora-unsloth-"))
    tiny_llama(folder)
    model, _ = load(folder)
    twin, _ = load(folder)
    fl_unsloth.prepare(twin)  # the reference: PEFT's forwards from the start
    ids = torch.randint(4, 256, (2, 32), generator=torch.Generator().manual_seed(2)).cuda()
    config = FlatLoraConfig(rho=0.5, seed=3)

    def logits(m, t=None):
        m.train()
        with torch.no_grad():
            if t is None:
                return m(input_ids=ids).logits.float()
            flat = FlatLora(m, config, total_steps=2)
            with flat.perturbed(t):
                return m(input_ids=ids).logits.float()

    layers = len(model.base_model.model.model.layers)
    paths = fused_lora_paths(model)
    kinds = sorted({p.attribute for p in paths})
    report("detection", len(paths) == 3 * layers and kinds == ["apply_o", "apply_qkv", "forward"],
           f"{len(paths)} fused paths on {layers} layers ({', '.join(kinds)})")

    fused_clean, fused_noisy = logits(model), logits(model, 2)
    lost = (fused_noisy - fused_clean).abs().max().item()
    report("bypass without prepare", lost == 0.0, f"max |perturbed - clean| = {lost:.3g} (the noise is lost)")
    try:
        fl_unsloth.check(model)
        report("check refuses", False, "no error")
    except ValueError as exc:
        report("check refuses", "prepare(model)" in str(exc), str(exc)[:160])

    restored = fl_unsloth.prepare(model)
    report("prepare", len(restored) == len(paths) and not fused_lora_paths(model),
           f"{len(restored)} kernels switched off, {len(fused_lora_paths(model))} left")
    clean, noisy = logits(model), logits(model, 2)
    twin_clean, twin_noisy = logits(twin), logits(twin, 2)
    scale = clean.abs().max().item()
    d_fused = (clean - fused_clean).abs().max().item() / scale
    d_clean = (clean - twin_clean).abs().max().item() / scale
    d_noisy = (noisy - twin_noisy).abs().max().item() / scale
    effect = (noisy - clean).abs().max().item() / scale
    report("clean output kept", d_fused < 2e-2, f"max rel |PEFT - fused| = {d_fused:.2e} (bf16)")
    report("noise reaches the output", effect > 10 * max(d_noisy, 1e-3) and d_noisy <= 2 * d_clean + 1e-3,
           f"rel effect of the noise {effect:.3f}; vs the never-fused twin: perturbed {d_noisy:.2e}, "
           f"clean {d_clean:.2e}")

    data = [{"input_ids": row, "labels": row} for row in ids.cpu()]
    args = TrainingArguments(output_dir=str(folder / "out"), max_steps=3, per_device_train_batch_size=1,
                             logging_steps=1, report_to="none", save_strategy="no", learning_rate=1e-3, bf16=True)
    trainer = Trainer(model=model, args=args, train_dataset=data * 4)
    FlatLoraCallback(rho=0.1, seed=1).attach(trainer)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    report("training", len(logs) == 3 and all("flat_lora_sigma" in e and e["loss"] == e["loss"] for e in logs),
           ", ".join(f"step {e['step']} loss {e['loss']:.4f} sigma {e.get('flat_lora_sigma', float('nan')):.4f}"
                     for e in logs))
    failed = [name for name, ok, _ in RESULTS if not ok]
    print(f"{len(RESULTS) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
