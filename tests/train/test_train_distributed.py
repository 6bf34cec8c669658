"""`accelerate launch -m flatlora train RECIPE.yaml`: the shipped Llama recipe, unchanged but for flags, on 2 CPU
processes (gloo DDP): the Trainer shards the data, the GSM8K generations are sharded and gathered back in order,
only the main process writes and prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import _train_fixtures as fx

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]


def test_accelerate_launch_two_processes(assets, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch

    from test_train_e2e import greedy

    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes=2",
           "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", "-m", "flatlora", "train",
           str(ROOT / "recipes" / "llama" / "llama-2-7b_metamath_gsm8k.yaml"),
           "--model.name_or_path", assets("llama"), "--data.train.path", assets("metamath"),
           "--data.eval.path", assets("gsm8k"), "--data.cache_dir", str(tmp_path / "cache"), "--output_dir", str(out),
           *fx.FAST_TRAINING, "--training.ddp_backend", "gloo", "--training.per_device_train_batch_size", "2",
           "--training.gradient_accumulation_steps", "1", "--training.max_length", "64",
           "--task.max_new_tokens", "5", "--task.generation_batch_size", "2"]
    proc = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    metrics = json.loads(proc.stdout)  # printed once, by the main process
    assert metrics == json.loads((out / "metrics.json").read_text())
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["train_batch_size"] == 2
    # 8 training pairs, 2 processes x 2 per step: an epoch is 2 optimizer steps, so 3 steps = 1.5 epochs
    assert metrics["epoch"] == pytest.approx(1.5)
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["lenient_reference"] for r in records] == [gold for _, _, gold in fx.GSM8K_TEST]
    # the shards came back in order: one process regenerates every answer from the saved adapter
    tok = AutoTokenizer.from_pretrained(assets("llama"))
    base = AutoModelForCausalLM.from_pretrained(assets("llama"), dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    assert greedy(model, tok, [r["prompt"] for r in records], 5) == [r["generation"] for r in records]
