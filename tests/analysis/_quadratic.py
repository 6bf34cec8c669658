"""A PEFT model whose loss is an exact quadratic in the merged weight, with a known Hessian.

``Probe`` is one bias-free ``nn.Linear(n, m)`` wrapped by PEFT LoRA. Fed the identity, it outputs ``W^T``
(``W`` = the merged weight, ``(m, n)``), so ``quadratic_loss`` reads ``w = vec(W)`` (row-major) and returns

    L_b(W) = 0.5 (w - c_b)^T H_b (w - c_b)

for a batch ``{"H": H_b, "c": c_b}``. The Hessian of the batch mean w.r.t. the merged weight is the mean of
the ``H_b``: every closed form below is computed from these matrices alone, independently of the library.
"""

from __future__ import annotations

import torch
from torch import nn


class Probe(nn.Module):
    def __init__(self, n: int, m: int) -> None:
        super().__init__()
        self.fc = nn.Linear(n, m, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def quadratic_model(n: int = 10, m: int = 8, r: int = 2, seed: int = 0, dtype=torch.float64, **lora) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    gen = torch.Generator().manual_seed(seed)
    base = Probe(n, m).to(dtype)
    with torch.no_grad():
        base.fc.weight.copy_(torch.randn(m, n, generator=gen, dtype=dtype))
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["fc"], **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=dtype))
    return model


def quadratic_batches(dim: int, n_batches: int = 2, seed: int = 1, dtype=torch.float64,
                      top_gap: float = 3.0) -> list[dict]:
    """PSD ``H_b`` (a planted top eigenvalue ``top_gap`` times the next scale) and centres ``c_b``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=dtype))
        eig = torch.rand(dim, generator=gen, dtype=dtype)
        eig[0] = top_gap
        out.append({"H": (q * eig) @ q.T, "c": torch.randn(dim, generator=gen, dtype=dtype)})
    return out


def merged(model: nn.Module) -> torch.Tensor:
    """``W`` read through the model itself (identity input), ``(m, n)``."""
    n = model.base_model.model.fc.in_features
    w = model.base_model.model.fc.base_layer.weight
    with torch.no_grad():
        return model(torch.eye(n, dtype=w.dtype)).T.clone()


def quadratic_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    n = batch["H"].shape[0]
    fc = model.base_model.model.fc.base_layer
    w_t = model(torch.eye(fc.in_features, dtype=batch["H"].dtype))  # (n_in, m) = W^T
    w = w_t.T.reshape(n)
    e = w - batch["c"]
    return 0.5 * e @ batch["H"] @ e


def loss_at(batches: list[dict], w: torch.Tensor) -> float:
    """The same loss evaluated directly on a weight matrix ``w`` (the independent reference)."""
    vals = [0.5 * (w.reshape(-1) - b["c"]) @ b["H"] @ (w.reshape(-1) - b["c"]) for b in batches]
    return float(sum(vals) / len(vals))


def mean_hessian(batches: list[dict]) -> torch.Tensor:
    return sum(b["H"] for b in batches) / len(batches)
