"""Which generator draws the noise (flatlora.noise.set_backend / backend_for), without running the kernel."""

from __future__ import annotations

import os

import pytest
import torch

from flatlora import noise


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    """Each test starts at "auto" with no device probed; the module's state is put back afterwards."""
    monkeypatch.setitem(noise._state, "backend", "auto")
    monkeypatch.setitem(noise._state, "probed", {})


def test_auto_draws_with_torch_on_cpu_and_matches_the_torch_generator():
    assert noise.backend_for("cpu") == "torch"
    scale = torch.rand(7) + 0.1
    want = torch.randn(7, 9, generator=torch.Generator().manual_seed(5)) * scale[:, None]
    assert torch.equal(noise.filter_noise((7, 9), scale, 5), want)


def test_set_backend_validates_and_use_backend_restores():
    with pytest.raises(ValueError, match="noise backend 'cuRAND'"):
        noise.set_backend("cuRAND")
    with noise.use_backend("torch"):
        assert noise._state["backend"] == "torch" and noise.backend_for("cuda") == "torch"
    assert noise._state["backend"] == "auto"
    with pytest.raises(RuntimeError), noise.use_backend("torch"):
        raise RuntimeError("inside")
    assert noise._state["backend"] == "auto"


def test_triton_on_cpu_outside_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setitem(noise._state, "module", object())  # "importable", whatever is installed
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with noise.use_backend("triton"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            noise.filter_noise((2, 3), torch.ones(2), 0)


def test_triton_forced_without_triton_is_an_error(monkeypatch):
    monkeypatch.setitem(noise._state, "module", None)
    with noise.use_backend("triton"), pytest.raises(RuntimeError, match="does not import"):
        noise.add_filter_noise(torch.zeros(2, 3), torch.ones(2), 0)


class _FailingKernel:
    calls = 0

    def probe(self, device):
        type(self).calls += 1
        raise RuntimeError("no driver")


def test_auto_on_cuda_falls_back_once_and_for_good_when_the_kernel_fails(monkeypatch):
    """A kernel that cannot run (no driver, no compiler) warns once and leaves the device on torch for the
    whole process: forward and backward of a step never draw with different generators."""
    monkeypatch.setitem(noise._state, "module", _FailingKernel())
    with pytest.warns(UserWarning, match="failed on cuda:0"):
        assert noise.backend_for("cuda:0", torch.bfloat16) == "torch"
    assert noise.backend_for("cuda:0") == "torch" and _FailingKernel.calls == 1  # probed once
    assert noise._state["probed"] == {"cuda:0": False}


def test_dtypes_the_kernel_does_not_write_stay_on_torch(monkeypatch):
    monkeypatch.setitem(noise._state, "module", object())
    monkeypatch.setitem(noise._state, "probed", {"cuda:0": True})
    assert noise.backend_for("cuda:0", torch.bfloat16) == "triton"
    assert noise.backend_for("cuda:0", torch.float8_e4m3fn) == "torch"
    assert noise.backend_for("cpu", torch.float32) == "torch"  # auto: CUDA only


def test_environment_variable_sets_the_default():
    import subprocess
    import sys

    code = "from flatlora import noise; print(noise._state['backend'])"
    env = {**os.environ, "FLATLORA_NOISE_BACKEND": "torch"}
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "torch"
    env["FLATLORA_NOISE_BACKEND"] = "curand"
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert got.returncode != 0 and "FLATLORA_NOISE_BACKEND='curand'" in got.stderr
