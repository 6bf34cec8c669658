"""The CPU side of the GPU check (benchmarks/gpu_overhead.py, benchmarks/gpu_check.sh): arguments, the 1B
model's shape, the byte counts, smoke runs on a tiny Llama on CPU with the draws counted against their formula,
results written after every configuration, the deadline, the refusal of a fallback backend, and the shell's
caps and fail-fast. Nothing here times anything or needs a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from kit.scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/_bench


def _load():
    return load_benchmark("gpu_overhead")


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
    assert (args.model, args.rank, args.dtype, args.kernel) == ("llama-1b", 16, "bfloat16", "required")
    # the Llama recipe's own setting first: 2048-token micro-batches x 8, gradient checkpointing
    assert args.configs == [(2048, 8, True), (2048, 1, False), (8192, 1, False), (8192, 4, False)]
    assert args.variants == ["lora", "flat-exact", "flat-exact-torch", "lora-sam"]
    assert bench.parse_args(["--variants", "flat-exact"]).variants == ["lora", "flat-exact"]
    assert bench.parse_args(["--device", "cpu"]).kernel == "optional"
    assert bench.parse_args(["--device", "cpu", "--kernel", "required"]).kernel == "required"
    assert bench.parse_args(["--kernel", "optional"]).kernel == "optional"
    quick = bench.parse_args(["--quick", "--device", "cpu", "--configs", "2048x8+ckpt", "8192x8+ckpt", "2048x1"])
    assert quick.configs == [(64, 8, True), (64, 1, False)] and quick.model == "llama-tiny"
    for bad in ("2048", "2048x0", "x8", "2048x8+ckpt+ckpt", "2048x8 "):
        with pytest.raises(ValueError, match="TOKENSxACCUM"):
            bench.parse_args(["--configs", bad])
    with pytest.raises(ValueError, match="multiples of seq"):
        bench.parse_args(["--configs", "1000x1"])
    with pytest.raises(ValueError, match="device"):
        bench.parse_args(["--device", "tpu"])


def test_bad_arguments_are_one_line_and_exit_2(capsys):
    assert _load().main(["--device", "cpu", "--configs", "12x"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_smoke_run_on_cpu(tmp_path):
    bench = _load()
    assert bench.main(["--device", "cpu", "--quick", "--dtype", "float32", "--configs", "64x3+ckpt", "64x1",
                       "64x2", "--out", str(tmp_path)]) == 0
    result = _json(tmp_path / "gpu-overhead-cpu-quick.json")
    assert result["status"] == "complete" and result["skipped"] == [] and result["backend"] == "torch"
    assert [(c["tokens"], c["accum"], c["checkpointing"]) for c in result["configs"]] == [(64, 3, True),
                                                                                         (64, 1, False),
                                                                                         (64, 2, False)]
    assert result["meta"]["python"] == sys.executable
    assert result["meta"]["command"].startswith(f"{sys.executable} benchmarks/gpu_overhead.py")
    layers = result["model"]["targets"]
    for c in result["configs"]:
        assert set(c["variants"]) == {"lora", "flat-exact", "flat-exact-torch", "lora-sam"}
        assert c["rounds"] == 2 and all(v["wall"]["n"] == 2 for v in c["variants"].values())
        assert c["variants"]["lora"]["paired_ratio"] == 1.0
        assert "noise backend 'torch'" in c["notes"]["flat-exact"]  # CPU: no kernel in auto
        # exact mode: a draw per layer in forward and in backward, and one more in checkpointing's recompute
        per_micro_batch = 3 if c["checkpointing"] else 2
        for name in ("flat-exact", "flat-exact-torch"):
            d = c["variants"][name]["draws"]
            assert d == {"total": per_micro_batch * c["accum"] * layers, "per_layer": per_micro_batch * c["accum"],
                         "backends": {"torch": per_micro_batch * c["accum"] * layers}}
        for name in ("lora", "lora-sam"):
            assert c["variants"][name]["draws"] == {"total": 0, "per_layer": 0, "backends": {}}
    assert set(result["breakdown"]) == {"torch"}
    b = result["breakdown"]["torch"]
    assert b["w_plus_e_ms_per_pass"] > 0 and b["elements"] > 0
    md = (tmp_path / "gpu-overhead-cpu-quick.md").read_text()
    assert result["meta"]["command"] in md and md.count("| 64 |") == 12
    assert "| 64 | 3 | on | 2 | flat-exact | 9.00 | torch |" in md


def test_results_are_on_disk_after_every_configuration(tmp_path, monkeypatch):
    """A run killed in its second configuration leaves the first one (and the breakdown after it) written."""
    bench = _load()
    real, calls = bench.run_config, []

    def run_config(*args, **kwargs):
        calls.append(args[4])
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a timeout's signal would stop it
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "run_config", run_config)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--device", "cpu", "--quick", "--dtype", "float32", "--configs", "64x1", "64x2",
                    "--variants", "flat-exact", "--out", str(tmp_path)])
    result = _json(tmp_path / "gpu-overhead-cpu-quick.json")
    assert calls == [(64, 1, False), (64, 2, False)]
    assert result["status"] == "running" and [c["accum"] for c in result["configs"]] == [1]
    assert set(result["breakdown"]) == {"torch"}
    assert "status: **running**" in (tmp_path / "gpu-overhead-cpu-quick.md").read_text()
    assert not list(tmp_path.glob("*.tmp"))


def test_configurations_past_the_deadline_are_skipped_and_listed(tmp_path):
    bench = _load()
    assert bench.main(["--device", "cpu", "--quick", "--dtype", "float32", "--configs", "64x1", "64x2+ckpt",
                       "--variants", "flat-exact", "--deadline-s", "0.001", "--out", str(tmp_path)]) == 0
    result = _json(tmp_path / "gpu-overhead-cpu-quick.json")
    assert result["status"] == "deadline" and result["skipped"] == ["64x2+ckpt", "qlora"]
    assert [c["accum"] for c in result["configs"]] == [1] and "breakdown" not in result and "qlora" not in result
    assert "Not run (deadline): 64x2+ckpt, qlora" in (tmp_path / "gpu-overhead-cpu-quick.md").read_text()


def test_a_required_kernel_that_does_not_draw_is_refused_before_timing(tmp_path, monkeypatch, capsys):
    """On CUDA the kernel is required (``--kernel auto``); on CPU torch's generator draws, which stands in for a
    failed probe: the run stops with exit 1, one line, and a JSON that says why, before building the model."""
    bench = _load()
    monkeypatch.setattr(bench, "build_llama", lambda *a, **k: pytest.fail("built the model"))
    assert bench.main(["--device", "cpu", "--quick", "--kernel", "required", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--kernel optional" in err
    result = _json(tmp_path / "gpu-overhead-cpu-quick.json")
    assert result["status"] == "refused" and result["backend"] == "torch" and result["configs"] == []
    assert "--kernel optional" in result["error"] and result["meta"]["torch"] == torch.__version__
    assert "status: **refused**" in (tmp_path / "gpu-overhead-cpu-quick.md").read_text()


def test_the_refusal_names_the_probes_failure(monkeypatch):
    from flatlora import noise

    bench = _load()

    def failed_probe(device, dtype=torch.float32):
        warnings.warn("flatlora: the Triton noise kernel failed on cuda:0 (CompilationError('ptxas')); drawing "
                      "with torch")
        return "torch"

    monkeypatch.setattr(noise, "backend_for", failed_probe)
    backend, why = bench.check_kernel(torch.device("cuda", 0), torch.bfloat16, required=True)
    assert backend == "torch" and "CompilationError('ptxas')" in why and "--kernel optional" in why
    assert bench.check_kernel(torch.device("cuda", 0), torch.bfloat16, required=False) == ("torch", None)
    monkeypatch.setattr(noise, "backend_for", lambda device, dtype=None: "triton")
    assert bench.check_kernel(torch.device("cuda", 0), torch.bfloat16, required=True) == ("triton", None)


# --- benchmarks/gpu_check.sh: the shell's own logic, with stand-ins for pytest where its tests would run -----
def _fake_modules(tmp_path: Path, **modules: str) -> Path:
    """A folder of stand-in modules (``name -> source``; ``pkg/__main__`` for ``python -m pkg``)."""
    root = tmp_path / "fake"
    for name, src in modules.items():
        path = root / f"{name}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(src)
    return root


def _gpu_check(tmp_path: Path, fake: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    out = tmp_path / "out"
    full = {**os.environ, "PY": sys.executable, "OUT": str(out), "PYTHONPATH": str(fake), **env}
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args], env=full,
                          capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - t0


def test_gpu_check_fails_fast_on_a_missing_import(tmp_path):
    fake = _fake_modules(tmp_path, peft="raise ImportError('No module named peft (stand-in)')\n")
    proc, seconds = _gpu_check(tmp_path, fake, "--device", "cpu", "--quick")
    assert proc.returncode == 2 and seconds < 60
    assert "No module named peft (stand-in)" in proc.stderr and "nothing is installed" in proc.stderr
    assert not (tmp_path / "out" / "gpu-overhead-cpu-quick.json").exists()


def test_gpu_check_caps_its_steps_and_the_whole_run(tmp_path):
    hang = {"pytest/__init__": "", "pytest/__main__": "import time\nprint('hanging', flush=True)\ntime.sleep(600)\n"}
    fake = _fake_modules(tmp_path, **hang)
    out = tmp_path / "out"
    # the tests' own cap: they are stopped, the benchmark still runs (here: refuses at once), logs kept in $OUT
    proc, seconds = _gpu_check(tmp_path, fake, "--device", "cpu", "--quick", "--kernel", "required",
                               GPU_CHECK_TESTS_S="3")
    assert proc.returncode == 1 and seconds < 60
    assert "tests exit 124, benchmark exit 1" in (out / "check.log").read_text()
    assert "hanging" in (out / "tests.log").read_text()
    assert _json(out / "gpu-overhead-cpu-quick.json")["status"] == "refused"
    # the whole script's cap: the tests get what it leaves after a minute kept for the benchmark (here less than
    # their own 120 s), so the benchmark still runs and the script ends by itself (1, not the cap's 124)
    proc, seconds = _gpu_check(tmp_path, fake, "--device", "cpu", "--quick", "--kernel", "required",
                               GPU_CHECK_CAP_S="110")
    assert proc.returncode == 1 and seconds < 110
    second = (out / "check.log").read_text().split("tests exit 124, benchmark exit 1, ")[2]
    assert second.startswith(tuple(f"{s} s of 110" for s in range(110)))
