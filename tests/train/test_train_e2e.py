"""Every shipped recipe's code path end to end, offline: the recipe file itself, with only the model (a tiny random
model of the same architecture), the dataset location (a local folder in the hub's layout and schema, read by the
recipe's own ``load_dataset`` call), the run length and the device changed by flags.

Each run is checked against independent references: the saved adapter reloads with ``PeftModel.from_pretrained``
to the trained model's outputs, and the metrics in ``metrics.json`` are recomputed by hand from the reloaded model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import _train_fixtures as fx
from flatlora.train import load_recipe
from flatlora.train.runner import prepare, run

ROOT = Path(__file__).resolve().parents[2]


def recipe_for(file: str, model: str, data: dict[str, str], tmp_path: Path, *extra: str):
    # without evaluations during training (FAST_TRAINING) the GLUE recipes' model selection is switched off too
    selection = ["--early_stopping_patience", "null", "--training.load_best_model_at_end", "false"] \
        if file.startswith("glue/") else []
    args = ["--model.name_or_path", model, "--data.cache_dir", str(tmp_path / "cache"),
            "--output_dir", str(tmp_path / "run"), *fx.FAST_TRAINING, *selection, *extra]
    for role, path in data.items():
        args += [f"--data.{role}.path", path]
    return load_recipe(ROOT / "recipes" / file, args)


def check_run_folder(out: Path, flat: bool, steps: int = 3) -> dict:
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "metrics.json", "recipe.yaml", "trainer_state.json",
            "log.jsonl"} <= names
    assert ("flat_lora_config.json" in names) == flat
    if flat:
        record = json.loads((out / "flat_lora_config.json").read_text())
        assert (record["total_steps"], record["step"]) == (steps, steps)
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logs if "loss" in entry] == list(range(1, steps + 1))
    assert all(("flat_lora_sigma" in entry) == flat for entry in logs if "loss" in entry)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == steps and state["log_history"]
    assert load_recipe(out / "recipe.yaml") is not None
    return json.loads((out / "metrics.json").read_text())


def reload(auto_class, base_path: str, out: Path, **kwargs):
    from peft import PeftModel

    base = auto_class.from_pretrained(base_path, **kwargs)
    return PeftModel.from_pretrained(base, str(out)).eval()


@pytest.mark.parametrize("task", ["sst2", "mnli"])
def test_glue_t5_recipe(task, assets, tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    recipe = recipe_for(f"glue/t5-base_{task}.yaml", assets("t5"), {"train": assets("glue"), "eval": assets("glue")},
                        tmp_path)
    prep = prepare(recipe)
    metrics = run(prep)
    out = Path(recipe.output_dir)
    assert check_run_folder(out, flat=True) == metrics
    trained = prep.trainer.model.eval()

    tok = AutoTokenizer.from_pretrained(assets("t5"))
    if task == "sst2":
        rows = [(recipe.task.prompt_template.format(sentence=s), y) for s, y in fx.SST2_VALIDATION]
    else:  # validation_matched: the three pairs once
        pairs = [("a man plays a guitar", "a man plays music", 0), ("a man plays a guitar", "the man is famous", 1),
                 ("a man plays a guitar", "nobody plays anything", 2)]
        rows = [(recipe.task.prompt_template.format(premise=p, hypothesis=h), y) for p, h, y in pairs]
    enc = tok([x for x, _ in rows], return_tensors="pt", padding=True)
    start = torch.full((len(rows), 1), tok.pad_token_id)  # T5 starts decoding from the pad token
    with torch.no_grad():
        logits = trained(**enc, decoder_input_ids=start).logits
        again = reload(AutoModelForSeq2SeqLM, assets("t5"), out)(**enc, decoder_input_ids=start).logits
    torch.testing.assert_close(again, logits, rtol=0, atol=1e-6)
    # the class is the label word whose first word piece scores highest at the first decoder position
    first = [tok.convert_tokens_to_ids(tok.tokenize(w)[0]) for w in recipe.task.label_words]
    predicted = logits[:, 0, first].argmax(-1).tolist()
    assert metrics["eval_accuracy"] == pytest.approx(sum(p == y for p, (_, y) in zip(predicted, rows)) / len(rows))
    assert metrics["optimizer_steps"] == 3 and metrics["method"] == "flat-lora"


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_clip_recipe(name, assets, tmp_path):
    """The paper's CLIP set-up: LoRA on the vision tower, CLIP's zero-shot head over the dataset's class names,
    frozen."""
    from peft import PeftModel
    from transformers import AutoImageProcessor

    from flatlora.train import zero_shot

    recipe = recipe_for(f"clip/clip-vit-b32_{name}.yaml", assets("clip"), {"train": assets(name), "eval": assets(name)},
                        tmp_path)
    assert recipe.task.image_head == "clip-zero-shot"
    prep = prepare(recipe)
    names = fx.CIFAR10_NAMES if name == "cifar10" else [f"class{i}" for i in range(100)]
    fresh = zero_shot.load(assets("clip"), names, recipe.task.class_templates)
    head_before = prep.trainer.model.base_model.model.head.clone()
    torch.testing.assert_close(head_before, fresh.head, rtol=0, atol=0)  # the class names' prompts, in label order
    metrics = run(prep)
    out = Path(recipe.output_dir)
    check_run_folder(out, flat=True)
    assert json.loads((out / "flat_lora_config.json").read_text())["config"]["rho"] == 0.15
    trained = prep.trainer.model.eval()
    torch.testing.assert_close(trained.base_model.model.head, head_before, rtol=0, atol=0)  # frozen
    assert all(("lora_" in n) for n, p in trained.named_parameters() if p.requires_grad)
    classes = 10 if name == "cifar10" else 100
    labels = [i % 10 for i in range(6)] if name == "cifar10" else [7 * (i % 10) for i in range(6)]
    processor = AutoImageProcessor.from_pretrained(str(out))  # saved beside the adapter
    pixels = processor(images=fx.random_images(6, seed=1), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = trained(pixel_values=pixels).logits
        again = PeftModel.from_pretrained(fresh, str(out)).eval()(pixel_values=pixels).logits
    assert logits.shape == (6, classes)
    torch.testing.assert_close(again, logits, rtol=0, atol=1e-6)
    top1 = logits.argmax(-1).tolist()
    assert metrics["eval_accuracy"] == pytest.approx(sum(p == y for p, y in zip(top1, labels)) / 6)


def llama_recipe(file: str, assets, tmp_path: Path):
    return recipe_for(file, assets("llama"), {"train": assets("metamath"), "eval": assets("gsm8k")}, tmp_path,
                      "--training.max_length", "64", "--training.gradient_accumulation_steps", "1",
                      "--task.max_new_tokens", "6", "--task.generation_batch_size", "2")


def check_gsm8k(prep, metrics: dict, out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["lenient_reference"] for r in records] == [gold for _, _, gold in fx.GSM8K_TEST]  # by hand
    assert [r["prompt"] for r in records] == [f"Q: {q}\nA:  " for q, _, _ in fx.GSM8K_TEST]  # official: x + " "
    assert metrics["eval_gsm8k_accuracy"] == sum(r["correct"] for r in records) / len(records)
    assert metrics["eval_gsm8k_accuracy_lenient"] == sum(r["lenient_correct"] for r in records) / len(records)
    assert [r["reference"] for r in records] == [1234, 5, 3, 72, 0]  # the official scorer's reading
    assert metrics["eval_gsm8k_examples"] == len(fx.GSM8K_TEST) and "eval_loss" in metrics
    # the training pairs: GSM rows only (4 of the 5 types, twice), the response cut before "The answer is:"
    train = prep.task_data.train
    assert len(train) == 8
    assert (train[0]["prompt"], train[0]["completion"]) == ("Q: What is 2 + 3?\nA: ", " 2 + 3 = 5.\n#### 5")
    return records


def trained_model(prep):
    """The trained PeftModel without the autocast wrapper accelerate put on its forward for bf16 mixed precision:
    the computation a reloaded adapter does."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(prep.trainer.model, keep_fp32_wrapper=False).eval()


def greedy(model, tok, prompts: list[str], new: int) -> list[str]:
    tok.padding_side = "left"
    out = []
    with torch.no_grad():
        for p in prompts:  # one at a time: no padding, an independent path from the batched run
            enc = tok(p, return_tensors="pt")
            gen = model.generate(**enc, max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
            out.append(tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def test_llama_metamath_gsm8k_recipe(assets, tmp_path):
    """bf16 base, fp32 LoRA, TRL's SFTTrainer, GSM8K greedy generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = llama_recipe("llama/llama-2-7b_metamath_gsm8k.yaml", assets, tmp_path)
    prep = prepare(recipe)
    from trl import SFTTrainer

    assert isinstance(prep.trainer, SFTTrainer)
    dtypes = {("lora_" in n, p.dtype) for n, p in prep.trainer.model.named_parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    metrics = run(prep)
    out = Path(recipe.output_dir)
    check_run_folder(out, flat=True)
    records = check_gsm8k(prep, metrics, out)
    tok = AutoTokenizer.from_pretrained(assets("llama"))
    again = reload(AutoModelForCausalLM, assets("llama"), out, dtype=torch.bfloat16)
    enc = tok([r["prompt"] for r in records], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(again(**enc).logits, trained_model(prep)(**enc).logits, rtol=0, atol=0)
    assert greedy(again, tok, [r["prompt"] for r in records], 6) == [r["generation"] for r in records]


def test_llama_qlora_recipe(assets, tmp_path):
    """The same with a bitsandbytes 4-bit base (bitsandbytes runs 4-bit layers on CPU)."""
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    recipe = llama_recipe("llama/llama-2-7b_metamath_gsm8k_qlora.yaml", assets, tmp_path)
    prep = prepare(recipe)
    quantized = [m for m in prep.trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # every attention and MLP projection of the 2 layers
    trainable = {p.dtype for p in prep.trainer.model.parameters() if p.requires_grad}
    assert trainable == {torch.float32}  # fp32 LoRA on the 4-bit base too (TRL would make it bf16)
    metrics = run(prep)
    out = Path(recipe.output_dir)
    check_run_folder(out, flat=True)
    check_gsm8k(prep, metrics, out)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    base = prepare_model_for_kbit_training(
        AutoModelForCausalLM.from_pretrained(assets("llama"), dtype=torch.bfloat16, quantization_config=quant))
    from peft import PeftModel

    again = PeftModel.from_pretrained(base, str(out)).eval()
    tok = AutoTokenizer.from_pretrained(assets("llama"))
    enc = tok([q for q, _, _ in fx.GSM8K_TEST], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(again(**enc).logits, trained_model(prep)(**enc).logits, rtol=0, atol=0)


def test_lora_and_flat_lora_differ_only_in_the_callback(assets, tmp_path):
    from flatlora import FlatLoraCallback

    data = {"train": assets("glue"), "eval": assets("glue")}
    runs = {}
    for name, extra in (("lora", ["--method", "lora"]), ("flat0", ["--flat_lora.rho", "0"]),
                        ("flat", ["--flat_lora.rho", "0.5"])):
        recipe = recipe_for("glue/t5-base_sst2.yaml", assets("t5"), data, tmp_path / name, *extra)
        runs[name] = prepare(recipe)
    lora, flat = runs["lora"], runs["flat"]
    # before training: the same Trainer but for the callback
    kinds = [type(c) for c in flat.trainer.callback_handler.callbacks]
    assert kinds[0] is FlatLoraCallback and flat.callback is flat.trainer.callback_handler.callbacks[0]
    assert kinds[1:] == [type(c) for c in lora.trainer.callback_handler.callbacks] and lora.callback is None
    args_lora, args_flat = lora.trainer.args.to_dict(), flat.trainer.args.to_dict()
    assert {k for k in args_lora if args_lora[k] != args_flat[k]} <= {"output_dir", "run_name", "logging_dir"}
    state_lora, state_flat = lora.trainer.model.state_dict(), flat.trainer.model.state_dict()
    assert state_lora.keys() == state_flat.keys()
    assert all(torch.equal(state_lora[k], state_flat[k]) for k in state_lora)  # same base, head and LoRA init
    assert lora.trainer.train_dataset[:] == flat.trainer.train_dataset[:]
    assert type(lora.trainer) is type(flat.trainer)
    # after training: rho = 0 reproduces LoRA; rho = 0.5 does not
    adapters = {}
    for name, prep in runs.items():
        run(prep)
        adapters[name] = load_file(str(Path(prep.recipe.output_dir) / "adapter_model.safetensors"))
    assert adapters["lora"].keys() == adapters["flat0"].keys() == adapters["flat"].keys()
    for k in adapters["lora"]:
        torch.testing.assert_close(adapters["flat0"][k], adapters["lora"][k], rtol=0, atol=0)
    assert any(not torch.allclose(adapters["flat"][k], adapters["lora"][k]) for k in adapters["lora"])


def test_minilm_example(tmp_path):
    """examples/train_minilm.yaml (sequence classification on the embedded MiniLM), shortened to 3 steps."""
    import csv

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from flatlora.train.runner import resolve_model

    recipe = load_recipe(ROOT / "examples" / "train_minilm.yaml",
                         ["--training.max_steps", "3", "--training.logging_steps", "1", "--output_dir",
                          str(tmp_path / "run"), "--data.cache_dir", str(tmp_path / "cache")])
    prep = prepare(recipe)
    metrics = run(prep)
    out = Path(recipe.output_dir)
    check_run_folder(out, flat=True)
    with open(ROOT / "examples" / "data" / "sentiment_eval.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    tok = AutoTokenizer.from_pretrained(str(out))
    enc = tok([r["sentence"] for r in rows], return_tensors="pt", padding=True, truncation=True, max_length=32)
    with torch.no_grad():
        logits = reload(AutoModelForSequenceClassification, resolve_model(recipe), out, num_labels=2)(**enc).logits
        torch.testing.assert_close(logits, prep.trainer.model.eval()(**enc).logits, rtol=0, atol=1e-5)
    predicted, gold = logits.argmax(-1).tolist(), [int(r["label"]) for r in rows]
    tp = sum(p == g == 1 for p, g in zip(predicted, gold))
    fp = sum(p == 1 and g == 0 for p, g in zip(predicted, gold))
    fn = sum(p == 0 and g == 1 for p, g in zip(predicted, gold))
    assert metrics["eval_accuracy"] == pytest.approx(sum(p == g for p, g in zip(predicted, gold)) / len(rows))
    assert metrics["eval_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn) if tp else 0.0)


def test_seq2seq_text_targets_by_generation(assets, tmp_path):
    """seq2seq without label_words: greedy generation (Seq2SeqTrainer's predict_with_generate), exact match."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    recipe = recipe_for("glue/t5-base_sst2.yaml", assets("t5"), {"train": assets("glue"), "eval": assets("glue")},
                        tmp_path, "--task.label_words", "null", "--task.target_template", "{sentence}",
                        "--task.metrics", "[exact_match]", "--task.max_target_length", "6")
    assert recipe.training.get("predict_with_generate") is None  # set by the task, not by the recipe
    prep = prepare(recipe)
    assert prep.trainer.args.predict_with_generate and prep.trainer.args.generation_max_length == 6
    metrics = run(prep)
    out = Path(recipe.output_dir)
    check_run_folder(out, flat=True)
    tok = AutoTokenizer.from_pretrained(assets("t5"))
    model = reload(AutoModelForSeq2SeqLM, assets("t5"), out)
    hits = 0
    with torch.no_grad():
        for sentence, _ in fx.SST2_VALIDATION:
            enc = tok(recipe.task.prompt_template.format(sentence=sentence), return_tensors="pt")
            gen = model.generate(**enc, max_length=6, do_sample=False, num_beams=1)
            target = tok.decode(tok(text_target=sentence, truncation=True, max_length=6)["input_ids"],
                                skip_special_tokens=True)
            hits += tok.decode(gen[0], skip_special_tokens=True).strip() == target.strip()
    assert metrics["eval_exact_match"] == pytest.approx(hits / len(fx.SST2_VALIDATION))


def test_glue_reports_the_lowest_eval_loss_epoch_as_the_official_code(assets, tmp_path):
    """The GLUE recipes evaluate every epoch, stop early (patience 5) and report the checkpoint with the lowest eval
    loss, restored; metrics.json keeps the last epoch's scores too."""
    from transformers import EarlyStoppingCallback

    recipe = recipe_for("glue/t5-base_sst2.yaml", assets("t5"), {"train": assets("glue"), "eval": assets("glue")},
                        tmp_path, "--training.max_steps", "-1", "--training.num_train_epochs", "3",
                        "--training.eval_strategy", "epoch", "--training.save_strategy", "epoch",
                        "--training.load_best_model_at_end", "true", "--early_stopping_patience", "5",
                        "--training.learning_rate", "3e-2")
    assert (recipe.early_stopping_patience, recipe.training["metric_for_best_model"]) == (5, "eval_loss")
    prep = prepare(recipe)
    stops = [c for c in prep.trainer.callback_handler.callbacks if isinstance(c, EarlyStoppingCallback)]
    assert len(stops) == 1 and stops[0].early_stopping_patience == 5
    metrics = run(prep)
    out = Path(recipe.output_dir)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evals = [e for e in history if "eval_loss" in e]
    assert [e["epoch"] for e in evals] == [1, 2, 3]
    best = min(evals, key=lambda e: e["eval_loss"])
    assert metrics["best_checkpoint_step"] == best["step"] and metrics["best_metric"] == best["eval_loss"]
    # the restored best checkpoint, evaluated again at the end, scores as it did at its epoch
    assert metrics["eval_loss"] == pytest.approx(best["eval_loss"], rel=1e-5)
    assert metrics["eval_accuracy"] == best["eval_accuracy"]
    assert metrics["last_eval"] == evals[-1]
