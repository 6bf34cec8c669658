"""The four task types: which transformers Auto class loads the model, how dataset rows become model inputs, which
Trainer class trains it and how its predictions become metrics.

* ``sequence-classification``: ``AutoModelForSequenceClassification``, text column(s) tokenized (pairs for two
  columns), ``Trainer``; accuracy / F1 / Matthews correlation of the argmax.
* ``seq2seq``: ``AutoModelForSeq2SeqLM``, ``prompt_template`` -> source, ``label_words[label]`` or
  ``target_template`` -> target, ``Seq2SeqTrainer``. With ``label_words`` the class is the label word whose first
  token scores highest at the first decoder position (a forced choice, as in the LoRA-GA code the paper's code
  builds on); without, greedy generation and exact match.
* ``causal-lm-sft``: ``AutoModelForCausalLM``, prompt/completion pairs from the templates, TRL's ``SFTTrainer``
  (loss on the completion only); GSM8K accuracy by greedy generation after training.
* ``image-classification``: ``AutoModelForImageClassification`` (``image_head: linear``: the vision tower + a new
  linear head) or CLIP with its frozen zero-shot head (``image_head: clip-zero-shot``, `.zero_shot`, built by the
  runner), ``AutoImageProcessor`` applied on the fly, ``Trainer``; top-1 accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .._extras import require
from .metrics import classification_metrics, exact_match

if TYPE_CHECKING:
    from datasets import Dataset

    from .recipe import Recipe
    from .sections import TaskSpec

AUTO_CLASSES = {"sequence-classification": "AutoModelForSequenceClassification", "seq2seq": "AutoModelForSeq2SeqLM",
                "causal-lm-sft": "AutoModelForCausalLM", "image-classification": "AutoModelForImageClassification"}


@dataclass
class TaskData:
    """What the Trainer gets for one task: datasets, collator, metric hooks; and the generation eval set."""

    train: Any
    eval: Any = None
    collator: Any = None
    compute_metrics: Callable | None = None
    preprocess_logits: Callable | None = None
    prompts: list[str] = field(default_factory=list)  # causal-lm-sft generation eval
    references: list[str] = field(default_factory=list)


def load_processing(task: "TaskSpec", path: str, revision: str | None, trust_remote_code: bool) -> Any:
    """The tokenizer (text tasks) or image processor (images), with a pad token."""
    from transformers import AutoImageProcessor, AutoTokenizer

    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    kind = "an image processor" if task.type == "image-classification" else "a tokenizer"
    try:
        if task.type == "image-classification":
            return AutoImageProcessor.from_pretrained(path, **kwargs)
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"model.tokenizer: cannot load {kind} from {path!r} ({' '.join(str(exc).split())[:300]}); "
                         "set model.tokenizer to a folder or hub id that holds one") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"model.tokenizer: the tokenizer of {path!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def model_class(task_type: str) -> Any:
    import transformers

    return getattr(transformers, AUTO_CLASSES[task_type])


def rows(batch: dict[str, list]) -> list[dict[str, Any]]:
    keys = list(batch)
    return [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]


def cut(text: str, stop: str | None) -> str:
    return text.split(stop, 1)[0] if stop else text


def target_text(task: "TaskSpec", row: dict[str, Any]) -> str:
    """The target (seq2seq) or completion (SFT) of a row: ``target_template`` filled in, cut at ``target_stop``,
    and with ``target_first_code_block`` kept up to the end of its first ``` block, as the official Code-Feedback
    preparation (``"```".join(y.split("```")[:2]) + "```"``)."""
    text = cut(task.target_template.format_map(row), task.target_stop)
    if task.target_first_code_block:
        text = "```".join(text.split("```")[:2]) + "```"
    return text


def drop_long(task: "TaskSpec", tok: Any) -> Callable[["Dataset"], "Dataset"]:
    """The row selection of ``task.max_train_tokens``: keep rows whose prompt + completion, tokenized as one text
    with the tokenizer's special tokens, is shorter than the limit (the official ``len(tokenizer(x + ' ' + y)
    ['input_ids']) >= max_tokens`` -> drop, where our prompt and completion hold the official x and ' ' + y)."""
    limit = task.max_train_tokens

    def short(batch: dict[str, list]) -> list[bool]:
        texts = [task.prompt_template.format_map(r) + target_text(task, r) for r in rows(batch)]
        return [len(ids) < limit for ids in tok(texts)["input_ids"]]

    return lambda ds: ds.filter(short, batched=True, desc=f"dropping rows of {limit}+ tokens")


def build(recipe: "Recipe", model: Any, proc: Any, train: "Dataset", evals: "Dataset | None",
          names: list[str] | None) -> TaskData:
    """Turn the loaded datasets into the Trainer's inputs for ``recipe.task.type``."""
    return {"sequence-classification": _seq_cls, "seq2seq": _seq2seq, "causal-lm-sft": _sft,
            "image-classification": _image}[recipe.task.type](recipe.task, model, proc, train, evals, names)


def _classification_metrics(task: "TaskSpec") -> Callable:
    def compute(eval_pred: Any) -> dict[str, float]:
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        return classification_metrics(np.argmax(logits, axis=-1), eval_pred.label_ids, task.metrics)

    return compute


def _seq_cls(task, model, tok, train, evals, names) -> TaskData:
    from transformers import DataCollatorWithPadding

    def encode(batch):
        enc = tok(*[batch[c] for c in task.text_columns], truncation=True, max_length=task.max_length)
        enc["labels"] = batch[task.label_column]
        return enc

    def prep(ds):
        return None if ds is None else ds.map(encode, batched=True, remove_columns=ds.column_names,
                                              desc="tokenizing")

    return TaskData(prep(train), prep(evals), DataCollatorWithPadding(tok), _classification_metrics(task))


def first_tokens(tok: Any, words: list[str]) -> list[int]:
    """The first target token of each label word; they must differ (the forced choice scores them)."""
    ids = []
    for word in words:
        encoded = tok(text_target=word, add_special_tokens=False)["input_ids"]
        if not encoded:
            raise ValueError(f"task.label_words: {word!r} encodes to no token")
        ids.append(encoded[0])
    if len(set(ids)) != len(ids):
        same = [w for w, i in zip(words, ids) if ids.count(i) > 1]
        raise ValueError(f"task.label_words: {same} start with the same token; choose words whose first tokens "
                         "differ")
    return ids


def _seq2seq(task, model, tok, train, evals, names) -> TaskData:
    from transformers import DataCollatorForSeq2Seq

    def encode(batch):
        items = rows(batch)
        sources = [task.prompt_template.format_map(r) for r in items]
        if task.label_words:
            targets = [_label_word(task, r[task.label_column]) for r in items]
        else:
            targets = [target_text(task, r) for r in items]
        enc = tok(sources, truncation=True, max_length=task.max_length)
        enc["labels"] = tok(text_target=targets, truncation=True, max_length=task.max_target_length)["input_ids"]
        return enc

    def prep(ds):
        return None if ds is None else ds.map(encode, batched=True, remove_columns=ds.column_names,
                                              desc="tokenizing")

    data = TaskData(prep(train), prep(evals), DataCollatorForSeq2Seq(tok, model=model, label_pad_token_id=-100))
    if task.label_words:
        cand = first_tokens(tok, task.label_words)

        def preprocess(logits, labels):
            logits = logits[0] if isinstance(logits, tuple) else logits
            return logits[:, 0, cand]  # (batch, classes): the first decoder position, label words only

        def compute(eval_pred):
            scores = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
            gold = [cand.index(int(t)) for t in eval_pred.label_ids[:, 0]]
            return classification_metrics(np.argmax(scores, axis=-1), gold, task.metrics)

        data.preprocess_logits, data.compute_metrics = preprocess, compute
    else:
        def compute(eval_pred):
            preds = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
            preds = np.where(preds < 0, tok.pad_token_id, preds)
            labels = np.where(eval_pred.label_ids < 0, tok.pad_token_id, eval_pred.label_ids)
            return {"exact_match": exact_match(tok.batch_decode(preds, skip_special_tokens=True),
                                               tok.batch_decode(labels, skip_special_tokens=True))}

        data.compute_metrics = compute
    return data


def _label_word(task: "TaskSpec", label: Any) -> str:
    if not isinstance(label, int) or not 0 <= label < len(task.label_words):
        raise ValueError(f"task.label_words has {len(task.label_words)} words but the data holds label {label!r} "
                         f"(column {task.label_column!r}); unlabelled splits (label -1, e.g. GLUE test) cannot train "
                         "or be scored")
    return task.label_words[label]


def _sft(task, model, tok, train, evals, names) -> TaskData:
    from .sections import template_fields

    def pairs(ds):
        return ds.map(lambda r: {"prompt": task.prompt_template.format_map(r),
                                 "completion": target_text(task, r)},
                      remove_columns=ds.column_names, desc="formatting")

    data = TaskData(pairs(train))
    if evals is not None:
        if set(template_fields(task.target_template, "task.target_template")) <= set(evals.column_names):
            data.eval = pairs(evals)  # eval loss on the completions; skipped when eval rows lack them
        if "gsm8k_accuracy" in task.metrics:
            data.prompts = [task.prompt_template.format_map(r) + task.generation_suffix for r in evals]
            data.references = [str(r[task.answer_column]) for r in evals]
    return data


def _image(task, model, processor, train, evals, names) -> TaskData:
    import torch

    require("PIL", "flatlora train's image-classification task")
    from datasets import Image

    def prep(ds, role):
        if ds is None:
            return None
        ds = ds.select_columns([task.image_column, task.label_column])
        if not isinstance(ds.features[task.image_column], Image):
            try:
                ds = ds.cast_column(task.image_column, Image())
            except Exception as exc:
                raise ValueError(f"data.{role}: column {task.image_column!r} (task.image_column) does not hold "
                                 f"images ({ds.features[task.image_column]}): {exc}") from None

        def transform(batch):
            images = [img.convert("RGB") for img in batch[task.image_column]]
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
            return {"pixel_values": pixels, "labels": torch.as_tensor(batch[task.label_column])}

        return ds.with_transform(transform)

    def collate(features):
        return {"pixel_values": torch.stack([f["pixel_values"] for f in features]),
                "labels": torch.stack([torch.as_tensor(f["labels"]) for f in features])}

    return TaskData(prep(train, "train"), prep(evals, "eval"), collate, _classification_metrics(task))


def make_trainer(recipe: "Recipe", model: Any, args: Any, proc: Any, data: TaskData) -> Any:
    """The task's Trainer (``Trainer``, ``Seq2SeqTrainer`` or TRL's ``SFTTrainer``), built with the recipe's args."""
    kwargs: dict[str, Any] = {"model": model, "args": args, "train_dataset": data.train, "eval_dataset": data.eval,
                              "processing_class": proc}
    if recipe.task.type == "causal-lm-sft":
        return require("trl", "flatlora train's causal-lm-sft task (TRL's SFTTrainer)").SFTTrainer(**kwargs)
    from transformers import Seq2SeqTrainer, Trainer

    kwargs.update(data_collator=data.collator, compute_metrics=data.compute_metrics if data.eval is not None else None,
                  preprocess_logits_for_metrics=data.preprocess_logits)
    return (Seq2SeqTrainer if recipe.task.type == "seq2seq" else Trainer)(**kwargs)


def generate(trainer: Any, tok: Any, prompts: list[str], task: "TaskSpec") -> list[str]:
    """Greedy completions of ``prompts`` by the trained model, each process a share; every process gets the full
    list back. Call it after training (it removes the Trainer's autocast wrapper from the model's forward).

    Under several processes each one generates ``prompts[rank::world]`` and the shares are gathered
    (``accelerate.utils.gather_object``); every process runs the same number of ``generate`` calls with
    ``synced_gpus=True``, which FSDP needs (its forward all-gathers)."""
    import math

    import torch
    from accelerate.utils import gather_object

    acc = trainer.accelerator
    # without the mixed-precision wrapper (autocast) the Trainer put on forward: generate as the saved adapter
    # computes once reloaded (bf16 base, fp32 LoRA)
    model = acc.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    rank, world = acc.process_index, acc.num_processes
    mine = list(range(rank, len(prompts), world))
    per_rank = math.ceil(len(prompts) / world)
    size = task.generation_batch_size
    side, tok.padding_side = tok.padding_side, "left"
    was_training = model.training
    model.eval()
    out: list[tuple[int, str]] = []
    try:
        with torch.no_grad():
            for start in range(0, per_rank, size):
                idx = mine[start:start + size]
                batch = [prompts[i] for i in idx] or [prompts[0]]  # keep every process in step
                enc = tok(batch, return_tensors="pt", padding=True).to(trainer.args.device)
                gen = model.generate(**enc, max_new_tokens=task.max_new_tokens, do_sample=False, num_beams=1,
                                     pad_token_id=tok.pad_token_id, synced_gpus=world > 1)
                texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                out.extend(zip(idx, texts))
    finally:
        tok.padding_side = side
        model.train(was_training)
    if world > 1:
        out = gather_object(out)
    texts_by_index = dict(out)
    return [texts_by_index[i] for i in range(len(prompts))]
