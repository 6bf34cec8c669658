"""A planted task where only some LoRA modules matter.

``Branches``: four linear layers ``l1..l4`` on four disjoint slices of the input, ``y = sum_k tanh(l_k(x_k))``.
The teacher is the same network with rank-4 changes to ``l1`` and ``l3`` only; a student LoRA on all four
layers (r = 4, 2 ranks open in each: budget 8) fits the teacher's outputs. At the optimum ``l2`` and ``l4`` need
no change (their inputs are independent of the planted ones), so their ranks should go to ``l1`` and ``l3``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

D = 8
RELEVANT, IRRELEVANT = ("l1", "l3"), ("l2", "l4")


class Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3, self.l4 = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict:
        parts = x.split(D, dim=-1)
        h = sum(torch.tanh(layer(p)) for layer, p in zip((self.l1, self.l2, self.l3, self.l4), parts))
        out = {"pred": h}
        if y is not None:
            out["loss"] = F.mse_loss(h, y)
        return out


def planted(seed: int = 0, r: int = 4):
    """(student PEFT model at rank ``r``, a function drawing ``n`` teacher-labelled examples)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = Branches()
    teacher = Branches()
    teacher.load_state_dict(base.state_dict())
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for name in RELEVANT:
            u, v = torch.randn(D, 4, generator=gen), torch.randn(4, D, generator=gen)
            getattr(teacher, name).weight.add_(0.25 * u @ v)
    data_gen = torch.Generator().manual_seed(7 + seed)

    def data(n: int) -> dict:
        x = torch.randn(n, 4 * D, generator=data_gen)
        with torch.no_grad():
            return {"x": x, "y": teacher(x)["pred"]}

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1000 + seed)
        model = get_peft_model(base, LoraConfig(r=r, lora_alpha=r, target_modules=["l1", "l2", "l3", "l4"]))
    return model, data


def short(name: str) -> str:
    return name.rsplit(".", 1)[-1]
