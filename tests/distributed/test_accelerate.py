"""``accelerate launch`` smoke test of examples/ddp_train.py with 2 CPU processes (gloo)."""

from __future__ import annotations

import math
import re

import pytest

from _dist_common import ROOT, accelerate_launch

pytestmark = pytest.mark.distributed

LINE = re.compile(r"rank (\d)/(\d)  steps (\d+)/(\d+)  sigma_T (\S+) \(rho (\S+)\)  noise_rank (\d)  last_loss (\S+)  "
                  r"adapters (\w+)  base (\w+)  base_unchanged (True|False)")


def test_accelerate_launch_two_processes():
    examples, batch, accum, epochs = 32, 4, 2, 2
    proc = accelerate_launch(ROOT / "examples" / "ddp_train.py", f"--examples={examples}", f"--batch-size={batch}",
                             f"--accum={accum}", f"--epochs={epochs}", "--rho=0.05")
    found = sorted(m.groups() for m in LINE.finditer(proc.stdout))
    assert [g[:2] for g in found] == [("0", "2"), ("1", "2")], proc.stdout
    want_steps = epochs * math.ceil(math.ceil(examples / (2 * batch)) / accum)
    for rank, _, t, total, sigma, rho, noise_rank, loss, adapters, base, unchanged in found:
        assert int(t) == int(total) == want_steps  # t counts optimizer steps over all ranks' data
        assert float(sigma) == float(rho) == 0.05
        assert noise_rank == rank  # default: each rank its own draw
        assert math.isfinite(float(loss)) and unchanged == "True"
    assert found[0][8] == found[1][8] and found[0][9] == found[1][9]  # adapters and base equal on both ranks
