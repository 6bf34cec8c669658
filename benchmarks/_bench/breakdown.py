"""Where Flat-LoRA's extra time goes: its pieces timed in isolation on the model's real layers.

Per perturbed layer and optimizer step (one micro-batch; the exact mode repeats the draws per micro-batch):

* ``norms``: the merged weight and its fp32 row norms, once per step (``Target.merged_weight`` + ``row_scale``);
* ``draw``: generating ``E`` from its seed (randn + row scaling; ``flatlora.noise.filter_noise``), twice per
  step in both modes (exact: forward and backward; inplace: add and subtract);
* ``apply``: putting ``E`` on the weight: exact builds ``W + E`` twice (``NoiseSpec.add_to``), inplace adds
  and subtracts in place; measured as (draw and apply together) minus the draws;
* ``matmuls`` (for scale): the layer's own forward ``F.linear(x, W)`` plus its input gradient ``g @ W`` at
  the batch's token count, which every variant pays.

Layers of one shape cost the same, so each distinct shape is timed once and multiplied by its count.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F

from flatlora import FlatLora, row_scale
from flatlora.noise import filter_noise

from .timing import time_call


def layer_costs(flat: FlatLora, t: int, tokens: int, *, repeats: int, device: torch.device) -> list[dict]:
    """Per distinct layer shape: count and the seconds of each piece (one call each), for step ``t``."""
    sigma = flat.sigma(t)
    specs = flat.noise_specs(t)
    shapes = Counter(spec.shape for _, spec in specs)
    out = []
    for shape, count in shapes.items():
        target, spec = next((tg, sp) for tg, sp in specs if sp.shape == shape)
        w = target.base_weight().detach()
        clone = w.clone()
        x = torch.randn(tokens, *shape[1:2], device=w.device, dtype=w.dtype)
        g = torch.randn(tokens, shape[0], device=w.device, dtype=w.dtype)

        def inplace_pair() -> None:
            spec.add_to(clone, inplace=True)
            spec.add_to(clone, subtract=True, inplace=True)

        costs = {
            "norms": time_call(lambda: row_scale(target.merged_weight(), sigma), repeats=repeats, device=device),
            "draw": time_call(lambda: filter_noise(shape, spec.scale, spec.seed), repeats=repeats, device=device),
            "exact_w_plus_e": time_call(lambda: spec.add_to(w), repeats=repeats, device=device),
            "inplace_add_sub": time_call(inplace_pair, repeats=repeats, device=device),
        }
        if len(shape) == 2:  # linear layers: the matmuls every variant runs
            costs["matmuls"] = (time_call(lambda: F.linear(x, w), repeats=repeats, device=device)
                                + time_call(lambda: g.matmul(w), repeats=repeats, device=device))
        out.append({"shape": list(shape), "count": count, "seconds": costs})
    return out


def per_step(costs: list[dict], micro_batches: int = 1) -> dict[str, dict[str, float]]:
    """Milliseconds per optimizer step of each piece, for the exact and the in-place mode."""
    def total(key: str, factor: float = 1.0) -> float:
        return 1e3 * factor * sum(c["count"] * c["seconds"].get(key, 0.0) for c in costs)

    draw = total("draw")
    exact = {"norms": total("norms"), "draw": 2 * micro_batches * draw,
             "apply": 2 * micro_batches * (total("exact_w_plus_e") - draw)}
    inplace = {"norms": total("norms"), "draw": 2 * draw, "apply": total("inplace_add_sub") - 2 * draw}
    for d in (exact, inplace):
        d["total"] = d["norms"] + d["draw"] + d["apply"]
    return {"flat-exact": exact, "flat-inplace": inplace, "matmuls": {"total": total("matmuls")}}
