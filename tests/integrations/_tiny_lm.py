"""A tiny random Llama with its own word-level tokenizer, and a tiny instruction dataset, written to a folder.

The training stacks load models with ``AutoModelForCausalLM.from_pretrained(path)`` and tokenizers with
``AutoTokenizer.from_pretrained(path)``: a folder written here stands in for a hub checkpoint, offline.
"""

from __future__ import annotations

import json
from pathlib import Path

WORDS = ("the a cat dog sat on mat ran to park is big small red blue what color say hello yes no why because "
         "question answer one two three").split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
ROWS = [
    {"instruction": "what color is the cat", "input": "", "output": "the cat is red"},
    {"instruction": "say hello", "input": "", "output": "hello"},
    {"instruction": "is the dog big", "input": "", "output": "yes the dog is big"},
    {"instruction": "why is the cat on the mat", "input": "", "output": "because the cat sat on the mat"},
    {"instruction": "what color is the mat", "input": "", "output": "the mat is blue"},
    {"instruction": "is the park small", "input": "", "output": "no the park is big"},
    {"instruction": "say one two three", "input": "", "output": "one two three"},
    {"instruction": "the dog ran to the park", "input": "", "output": "yes"},
]


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS + list("?:.,!'\"-()0123456789"))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece()  # joins words with spaces
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def write_model(folder: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 32) and its tokenizer, saved to ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_alpaca(path: Path) -> Path:
    """The rows as alpaca-format JSON lines (instruction, input, output)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path
