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
    assert {"clip-vit-b32_cifar10.yaml", "clip-vit-b32_cifar100.yaml", "llama-2-7b_metamath_gsm8k.yaml",
            "llama-2-7b_metamath_gsm8k_qlora.yaml"} <= names


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
    assert load_recipe(ROOT / "recipes/glue/t5-base_mnli.yaml").data.eval.split == "validation_matched"
    assert load_recipe(ROOT / "recipes/glue/t5-base_cola.yaml").task.metrics[0] == "matthews_correlation"
    assert set(load_recipe(ROOT / "recipes/glue/t5-base_mrpc.yaml").task.metrics) == {"f1", "accuracy"}
    for name in ("cifar10", "cifar100"):
        r = load_recipe(ROOT / "recipes" / "clip" / f"clip-vit-b32_{name}.yaml")
        assert (r.flat_lora.rho, r.training["learning_rate"], r.training["weight_decay"]) == (0.15, 5e-4, 0.1)
        assert r.training["num_train_epochs"] == 10 and r.data.train.path == f"uoft-cs/{name}"
    for name, four_bit in (("llama-2-7b_metamath_gsm8k", False), ("llama-2-7b_metamath_gsm8k_qlora", True)):
        r = load_recipe(ROOT / "recipes" / "llama" / f"{name}.yaml")
        assert (r.model.dtype, r.model.load_in_4bit, r.training["bf16"]) == ("bfloat16", four_bit, True)
        assert (r.lora["r"], r.lora["lora_alpha"], r.training["learning_rate"], r.training["num_train_epochs"],
                r.flat_lora.rho) == (8, 16, 5e-4, 2, 0.05)
        assert (r.data.eval.path, r.data.eval.name, r.task.metrics) == ("openai/gsm8k", "main", ["gsm8k_accuracy"])


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
    assert r.output_dir == os.path.join("runs", "train", "t5-base_sst2", "lora", "seed0")


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
