"""The LLM recipes' training data against the official preparation (nblt/Flat-LoRA data.py: load_meta_math,
load_codefeedback, load_wizardlm), re-implemented here as written there and run on local datasets in the hub
schema: which rows survive, in which order, and the exact prompt and completion texts."""

from __future__ import annotations

from pathlib import Path

import pytest

import _train_fixtures as fx
from flatlora.train import load_recipe
from flatlora.train.runner import prepare

ROOT = Path(__file__).resolve().parents[2]
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def official(rows, skip, x_of, y_of, tok, max_tokens, n):
    """The official loop: skip, then drop when len(tokenizer(x + ' ' + y)) >= max_tokens, then the first n."""
    out = []
    for r in rows:
        if skip(r):
            continue
        x, y = x_of(r), y_of(r)
        if len(tok(x + " " + y)["input_ids"]) >= max_tokens:
            continue
        out.append((x, y))
        if len(out) == n:
            break
    return out


CASES = {
    "metamath": ("llama/llama-2-7b_metamath_gsm8k.yaml", fx.METAMATH_ROWS * 2, 28, 3,
                 lambda r: "GSM" not in r["type"], lambda r: f'Q: {r["query"]}\nA: ',
                 lambda r: r["response"].split("\nThe answer is:")[0]),
    "codefeedback": ("llama/llama-2-7b_codefeedback.yaml", fx.CODEFEEDBACK_ROWS, 60, 3,
                     lambda r: "```" not in r["answer"], lambda r: ALPACA.format(instruction=r["query"]),
                     lambda r: "```".join(r["answer"].split("```")[:2]) + "```"),
    "wizardlm": ("llama/llama-2-7b_wizardlm.yaml", fx.WIZARDLM_ROWS, 60, 2,
                 lambda r: "sorry" in r["output"].lower() or "as an ai" in r["output"].lower(),
                 lambda r: ALPACA.format(instruction=r["instruction"]), lambda r: r["output"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_training_rows_are_the_official_preparation(name, assets, tmp_path):
    from transformers import AutoTokenizer

    file, rows, max_tokens, n, skip, x_of, y_of = CASES[name]
    recipe = load_recipe(ROOT / "recipes" / file, [
        "--model.name_or_path", assets("llama"), "--data.train.path", assets(name),
        "--task.max_train_tokens", str(max_tokens), "--data.train.max_samples", str(n),
        "--data.cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "run"), *fx.FAST_TRAINING,
        *(["--data.eval.path", assets("gsm8k")] if name == "metamath" else [])])
    tok = AutoTokenizer.from_pretrained(assets("llama"))
    expected = official(rows, skip, x_of, y_of, tok, max_tokens, n)
    # the case is not trivial: some rows are dropped for length, and the cut to n comes after the drop
    kept = [r for r in rows if not skip(r)]
    assert any(len(tok(x_of(r) + " " + y_of(r))["input_ids"]) >= max_tokens for r in kept[:n + 1])
    assert len(expected) == n
    train = prepare(recipe).task_data.train
    assert [(r["prompt"], r["completion"]) for r in train] == [(x, " " + y) for x, y in expected]
