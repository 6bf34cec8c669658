"""Recipes: YAML round trip, flags over the file, `--dry-run` of every shipped recipe, and bad recipes (one line on
stderr naming the key, exit code 2, nothing written)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flatlora.cli import main
from flatlora.train import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
EXAMPLE = ROOT / "examples" / "train_minilm.yaml"


def test_recipes_are_shipped():
    names = {p.name for p in RECIPES}
    for task in ("sst2", "cola", "mrpc", "mnli", "qnli"):
        assert f"t5-base_{task}.yaml" in names
    assert {"clip-vit-b32_cifar10.yaml", "clip-vit-b32_cifar100.yaml", "clip-vit-b32_svhn.yaml",
            "clip-vit-b32_dtd.yaml", "clip-vit-b32_cars.yaml", "llama-2-7b_metamath_gsm8k.yaml",
            "llama-2-7b_metamath_gsm8k_qlora.yaml", "llama-2-7b_codefeedback.yaml", "llama-2-7b_wizardlm.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES + [EXAMPLE], ids=lambda p: p.name)
def test_dry_run_validates_every_shipped_recipe(path, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(path), "--dry-run", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    resolved = Recipe.from_dict(yaml.safe_load(printed))  # the printed recipe is a valid recipe ...
    assert resolved == load_recipe(path, ["--output_dir", str(out)])  # ... the same one
    assert not out.exists()  # nothing written, nothing loaded


def test_shipped_recipes_hold_the_papers_hyper_parameters():
    for task, epochs in (("sst2", 10), ("cola", 10), ("mrpc", 10), ("mnli", 1), ("qnli", 1)):
        r = load_recipe(ROOT / "recipes" / "glue" / f"t5-base_{task}.yaml")
        assert (r.model.name_or_path, r.lora["r"], r.lora["lora_alpha"]) == ("google-t5/t5-base", 8, 16)
        assert (r.training["learning_rate"], r.training["num_train_epochs"], r.flat_lora.rho) == (5e-4, epochs, 0.05)
        assert (r.data.train.path, r.data.train.name) == ("nyu-mll/glue", task)
        # model selection as the official code: every epoch, lowest eval loss restored, patience 5
        assert (r.training["eval_strategy"], r.training["save_strategy"], r.training["load_best_model_at_end"],
                r.training["metric_for_best_model"], r.training["greater_is_better"],
                r.early_stopping_patience) == ("epoch", "epoch", True, "eval_loss", False, 5)
        # the paper's average uses accuracy; CoLA and MRPC report F1 and Matthews correlation beside it
        both = task in ("cola", "mrpc")
        assert r.task.metrics == (["accuracy", "f1", "matthews_correlation"] if both else ["accuracy"])
    assert load_recipe(ROOT / "recipes/glue/t5-base_mnli.yaml").data.eval.split == "validation_matched"
    for name, path, classes in (("cifar10", "uoft-cs/cifar10", "label"), ("cifar100", "uoft-cs/cifar100", "fine_label"),
                                ("svhn", "ufldl-stanford/svhn", "label"), ("dtd", "tanganke/dtd", "label"),
                                ("cars", "tanganke/stanford_cars", "label")):
        r = load_recipe(ROOT / "recipes" / "clip" / f"clip-vit-b32_{name}.yaml")
        assert (r.flat_lora.rho, r.training["learning_rate"], r.training["weight_decay"]) == (0.15, 5e-4, 0.1)
        assert r.training["num_train_epochs"] == 10 and r.data.train.path == path
        assert (r.lora["r"], r.lora["lora_alpha"], r.task.label_column) == (8, 16, classes)
        assert r.task.image_head == "clip-zero-shot" and "modules_to_save" not in r.lora  # the head stays frozen
    for name, four_bit in (("llama-2-7b_metamath_gsm8k", False), ("llama-2-7b_metamath_gsm8k_qlora", True)):
        r = load_recipe(ROOT / "recipes" / "llama" / f"{name}.yaml")
        assert (r.model.dtype, r.model.load_in_4bit, r.training["bf16"]) == ("bfloat16", four_bit, True)
        assert (r.lora["r"], r.lora["lora_alpha"], r.training["learning_rate"], r.training["num_train_epochs"],
                r.flat_lora.rho) == (8, 16, 5e-4, 2, 0.05)
        assert (r.data.eval.path, r.data.eval.name, r.task.metrics) == ("openai/gsm8k", "main", ["gsm8k_accuracy"])
        # the official text "Q: <q>\nA:  <y>" (x + " " + y), rows of 512+ tokens dropped, generation from x + " "
        assert (r.task.prompt_template, r.task.target_template) == ("Q: {question}\nA: ", " {answer}")
        assert (r.task.max_train_tokens, r.task.generation_suffix, r.data.train.max_samples) == (512, " ", 100000)
        # checkpoints to resume from after a crash
        assert (r.training["save_strategy"], r.training["save_steps"]) == ("steps", 500)
    for name, samples in (("codefeedback", 100000), ("wizardlm", 52000)):
        r = load_recipe(ROOT / "recipes" / "llama" / f"llama-2-7b_{name}.yaml")
        assert (r.lora["r"], r.lora["lora_alpha"], r.training["learning_rate"], r.training["num_train_epochs"],
                r.flat_lora.rho, r.model.dtype) == (8, 16, 5e-4, 2, 0.05, "bfloat16")
        assert (r.task.max_train_tokens, r.data.train.max_samples, r.training["max_length"]) == (1024, samples, 1024)
        assert r.task.prompt_template.startswith("Below is an instruction that describes a task.")
        assert r.task.target_first_code_block == (name == "codefeedback")
        assert r.data.train.exclude == ({"output": ["sorry", "as an ai"]} if name == "wizardlm" else {})


def test_yaml_round_trip(tmp_path):
    r = load_recipe(ROOT / "recipes/llama/llama-2-7b_metamath_gsm8k.yaml")
    assert Recipe.from_yaml(r.to_yaml()) == r
    saved = r.save(tmp_path / "r.yaml")
    assert load_recipe(saved) == r
    assert "\\nA:" in r.to_yaml()  # the template's line break stays visible on one line


def test_flags_override_the_file():
    r = load_recipe(ROOT / "recipes/glue/t5-base_sst2.yaml", [
        "--lora.r", "16", "--training.learning_rate", "1e-4", "--training.bf16=false", "--flat_lora.rho", "0.1",
        "--method", "lora", "--task.label_words", "bad", "good", "--task.prompt_template", "review: {sentence}",
        "--lora.target_modules", "[q, v]", "--data.train.max_samples", "100", "--data.train.columns.text", "sentence"])
    assert (r.lora["r"], r.training["learning_rate"], r.training["bf16"], r.flat_lora.rho) == (16, 1e-4, False, 0.1)
    assert (r.method, r.task.label_words, r.task.prompt_template) == ("lora", ["bad", "good"], "review: {sentence}")
    assert r.lora["target_modules"] == ["q", "v"] and r.data.train.max_samples == 100
    assert r.data.train.columns == {"text": "sentence"}
    assert r.lora["lora_alpha"] == 16 and r.training["num_train_epochs"] == 10  # the rest from the file
    variant, method, seed = Path(r.output_dir).parts[3:]
    assert Path(r.output_dir).parts[:3] == ("runs", "train", "t5-base_sst2") and (method, seed) == ("lora", "seed0")
    assert variant.startswith("data.train.columns.text=sentence+data.train.max_samples=100+")


SST2 = ROOT / "recipes/glue/t5-base_sst2.yaml"


def folder(*flags: str) -> str:
    return load_recipe(SST2, list(flags)).output_dir


def test_output_folder_is_keyed_on_every_override_that_changes_the_run():
    base = os.path.join("runs", "train", "t5-base_sst2", "flat-lora", "seed0")
    assert folder() == base
    r16 = folder("--lora.r", "16")
    assert r16 != base and Path(r16).parent.parent.name.startswith("lora.r=16-")
    assert folder("--lora.r", "16") == r16  # the same overrides find the same folder ...
    assert folder("--lora.r", "32") != r16  # ... other values another one
    assert folder("--lora.r", "16", "--training.learning_rate", "1e-4") not in (r16, base)
    assert folder("--training.seed", "2", "--lora.r", "16") == str(Path(r16).parent / "seed2")
    assert folder("--method", "lora", "--lora.r", "16") == str(Path(r16).parent.parent / "lora" / "seed0")
    # the file's own value, logging settings and, for method lora, the flat_lora section change nothing
    assert folder("--lora.r", "8", "--training.logging_steps", "7", "--training.report_to", "none") == base
    assert folder("--method", "lora", "--flat_lora.rho", "0.1") == str(Path(base).parent.parent / "lora" / "seed0")
    assert folder("--flat_lora.rho", "0.1") != base
    # values that read alike as folder names still get their own folder (the hash is of the exact values)
    a = folder("--task.prompt_template", "a/b: {sentence}")
    b = folder("--task.prompt_template", "a_b: {sentence}")
    assert a != b and Path(a).parent.parent.name[:-9] == Path(b).parent.parent.name[:-9]


def test_noise_seed_follows_the_training_seed_unless_given():
    for seed in (0, 2):
        r = load_recipe(SST2, ["--training.seed", str(seed)])
        assert (r.flat_lora.seed, r.noise_seed_derived) == (seed, True)
    r = load_recipe(SST2, ["--training.seed", "2", "--flat_lora.seed", "7"])
    assert (r.flat_lora.seed, r.noise_seed_derived) == (7, False)
    # the saved recipe keeps the rule, not the number: a derived seed follows a new training seed ...
    derived = load_recipe(SST2, ["--training.seed", "2"])
    assert "seed" not in derived.to_dict()["flat_lora"] and "derived from training.seed" in derived.to_yaml()
    assert Recipe.from_yaml(derived.to_yaml()).flat_lora.seed == 2
    assert derived.replace(training={**derived.training, "seed": 5}).flat_lora.seed == 5
    # ... a given one stays
    given = load_recipe(SST2, ["--flat_lora.seed", "7"])
    assert given.replace(training={**given.training, "seed": 5}).flat_lora.seed == 7
    assert Recipe.from_yaml(given.to_yaml()).flat_lora.seed == 7


def test_relative_paths_are_taken_from_the_recipe_folder(tmp_path):
    r = load_recipe(EXAMPLE)
    assert r.data.train.data_files == [str(ROOT / "examples" / "data" / "sentiment_train.csv")]
    assert r.data.train.path == "csv" and r.data.eval.split == "validation"


def bad(args: list[str], capsys) -> str:
    """Run ``flatlora train ARGS``; assert exit code 2 and one line on stderr without a traceback; return it."""
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flatlora train: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("args, expected", [
    (["--lora.rr", "8"], "unknown key lora.rr: not a peft.LoraConfig field (did you mean r?)"),
    (["--training.learning_rat", "1e-4"], "(did you mean learning_rate?)"),
    (["--model.dtyp", "float16"], "unknown key --model.dtyp (did you mean dtype?)"),
    (["--training.num_train_epochs", "ten"], "training.num_train_epochs='ten' must be a number"),
    (["--model.load_in_4bit", "maybe"], "model.load_in_4bit='maybe' must be true or false"),
    (["--method", "flatlora"], "method='flatlora' must be one of lora, flat-lora"),
    (["--flat_lora.rho", "-1"], "flat_lora.rho=-1 must be finite and >= 0"),
    (["--training.eval_strategy", "sometimes"], "training: sometimes is not a valid IntervalStrategy"),
    (["--task.metrics", "gsm8k_accuracy"], "metrics: 'gsm8k_accuracy' does not apply to sequence-classification"),
    (["--training.output_dir", "x"], "training.output_dir: set the run folder with the recipe's top-level output_dir"),
    (["--data.train.data_files", "nope.csv"], "data.train.data_files: 'nope.csv' does not exist"),
    (["--dry-run", "--data.train.data_files", "nope.csv"], "data.train.data_files: 'nope.csv' does not exist"),
    (["stray"], "unexpected argument 'stray'"),
    (["--early_stopping_patience", "3"], "early_stopping_patience needs training.load_best_model_at_end: true"),
    (["--early_stopping_patience", "0"], "early_stopping_patience=0 must be >= 1"),
    (["--early_stopping_patience", "3", "--training.load_best_model_at_end", "true", "--training.eval_strategy",
      "no"], "early_stopping_patience needs evaluations: set training.eval_strategy"),
    (["--task.image_head", "mlp"], "image_head='mlp' must be one of linear, clip-zero-shot"),
    (["--task.class_templates", "a photo of a {label}."], "must hold {name} (the class name) and no other field"),
    (["--task.max_train_tokens", "512"], "max_train_tokens applies to causal-lm-sft, not sequence-classification"),
    (["--data.train.exclude.sentence", "[]"], "exclude: 'sentence': [] must map a column name to a list of texts"),
    (["--training.seed", "-1"], "training.seed=-1 must be an integer in [0, 2**63)"),
])
def test_bad_flags(args, expected, tmp_path, capsys):
    out = tmp_path / "run"
    err = bad([str(EXAMPLE), *args, "--output_dir", str(out)], capsys)
    assert expected in err
    assert not out.exists()


def test_bad_files(tmp_path, capsys):
    recipe = EXAMPLE.read_text()
    assert "unknown key lora.rank: not a peft.LoraConfig field" in bad(
        [str(_write(tmp_path, recipe.replace("  r: 8", "  rank: 8")))], capsys)
    assert "unknown key modle (did you mean model?)" in bad([str(_write(tmp_path, "modle: {}\n"))], capsys)
    assert "task.text_columns=7 must be a list of strings" in bad(
        [str(_write(tmp_path, recipe.replace("text_columns: [sentence]", "text_columns: 7")))], capsys)
    assert "is not valid YAML: line 2, column 1" in bad([str(_write(tmp_path, "model: [\n"))], capsys)
    assert "cannot read it" in bad([str(tmp_path / "missing.yaml")], capsys)
    assert "give the recipe file first" in bad(["--lora.r", "8"], capsys)


def test_missing_column_is_named_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    err = bad([str(EXAMPLE), "--output_dir", str(out), "--data.cache_dir", str(tmp_path / "cache"),
               "--task.text_columns", "review"], capsys)
    assert "data.train: column 'review' (needed by task.text_columns) is not in csv files sentiment_train.csv" in err
    assert "its columns are ['sentence', 'label']" in err and "data.train.columns: {<column>: review}" in err
    assert not out.exists()


def test_hub_ids_that_are_not_cached_offline(tmp_path, capsys):
    out = tmp_path / "run"
    err = bad([str(EXAMPLE), "--output_dir", str(out), "--model.name_or_path", "flatlora-test/not-cached"], capsys)
    assert "model.name_or_path='flatlora-test/not-cached' is not in the Hugging Face cache" in err
    assert "hf download flatlora-test/not-cached" in err
    err = bad([str(EXAMPLE), "--output_dir", str(out), "--data.cache_dir", str(tmp_path / "cache"),
               "--data.train.path", "flatlora-test/not-cached-data", "--data.train.data_files", "null"], capsys)
    assert "data.train.path='flatlora-test/not-cached-data' is not in the datasets cache" in err
    assert "datasets.load_dataset('flatlora-test/not-cached-data')" in err
    assert not out.exists()


def test_help_lists_the_keys(capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--model.name_or_path", "--data.train.split", "--task.label_words", "--lora.<field>",
                 "--training.<field>", "--flat_lora.rho", "--method", "--dry-run"):
        assert flag in text


def test_the_real_command_exits_2_with_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "flatlora", "train", str(EXAMPLE), "--lora.rr", "8", "--output_dir",
                           str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("flatlora train: error:")]
    assert len(lines) == 1 and "lora.rr" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()
