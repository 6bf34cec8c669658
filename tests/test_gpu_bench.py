"""The CPU side of benchmarks/gpu_overhead.py (issue 15's GPU benchmark): arguments, the 1B model's shape, the
byte counts, and one smoke run on a tiny Llama on CPU. Nothing here times anything or needs a GPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/_bench


def _load():
    spec = importlib.util.spec_from_file_location("flatlora_bench_gpu_overhead",
                                                  ROOT / "benchmarks" / "gpu_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_1b_model_is_llama_3_2_1b_shaped_with_lora_on_every_linear_layer():
    """Built on the meta device (no memory): 1.24B base parameters, 7 LoRA layers x 16 blocks, r 16."""
    from _bench.llama import LLAMA_PRESETS, build_llama

    from flatlora import FlatLora, FlatLoraConfig

    model = build_llama(LLAMA_PRESETS["llama-1b"], rank=16, seed=0, device=torch.device("meta"), dtype=torch.bfloat16)
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert base == 1_235_814_400  # Llama 3.2 1B with tied embeddings
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    flat = FlatLora(model, FlatLoraConfig(rho=0.05), total_steps=1)
    assert len(flat.targets) == 16 * 7 and len(lora) == 2 * 16 * 7
    assert {tuple(t.base_weight().shape) for t in flat.target_layers} == {(2048, 2048), (512, 2048), (8192, 2048),
                                                                          (2048, 8192)}
    assert sum(t.base_weight().numel() for t in flat.target_layers) == 973_078_528
    assert all(min(p.shape) == 16 for p in lora)


def test_bytes_per_weight_element_of_one_draw():
    """The torch path: normal_ writes fp32 (4), mul_ reads and writes it (8), the cast reads fp32 and writes the
    dtype (4 + b, none for fp32), W + e reads two and writes one (3b); the kernel reads W and writes W + E."""
    bench = _load()
    assert bench.bytes_per_element(torch.bfloat16) == {"torch": 24, "triton": 4}
    assert bench.bytes_per_element(torch.float32) == {"torch": 24, "triton": 8}


def test_arguments():
    bench = _load()
    args = bench.parse_args([])
    assert (args.model, args.tokens, args.accum, args.rank, args.dtype) == ("llama-1b", [2048, 8192], [1, 4], 16,
                                                                            "bfloat16")
    assert args.variants == ["lora", "flat-exact", "flat-exact-torch", "lora-sam"]
    assert bench.parse_args(["--variants", "flat-exact"]).variants == ["lora", "flat-exact"]
    with pytest.raises(ValueError, match="multiples of seq"):
        bench.parse_args(["--tokens", "1000"])
    with pytest.raises(ValueError, match="device"):
        bench.parse_args(["--device", "tpu"])


def test_smoke_run_on_cpu(tmp_path):
    bench = _load()
    assert bench.main(["--device", "cpu", "--quick", "--dtype", "float32", "--accum", "1", "2", "--out",
                       str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu-overhead-cpu-quick.json").read_text())
    assert [(c["tokens"], c["accum"]) for c in result["configs"]] == [(64, 1), (64, 2)]
    for c in result["configs"]:
        assert set(c["variants"]) == {"lora", "flat-exact", "flat-exact-torch", "lora-sam"}
        assert c["rounds"] == 2 and all(v["wall"]["n"] == 2 for v in c["variants"].values())
        assert c["variants"]["lora"]["paired_ratio"] == 1.0
        assert "noise backend 'torch'" in c["notes"]["flat-exact"]  # CPU: no kernel in auto
    assert set(result["breakdown"]) == {"torch"}
    b = result["breakdown"]["torch"]
    assert b["noise_ms_per_micro_batch"] == pytest.approx(2 * b["w_plus_e_ms_per_pass"]) and b["elements"] > 0
    md = (tmp_path / "gpu-overhead-cpu-quick.md").read_text()
    assert result["meta"]["command"] in md and md.count("| 64 |") == 8
