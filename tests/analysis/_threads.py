"""One intra-op thread while the analysis tests run (restored afterwards).

The test models are tiny: their many small ops (double backward above all) gain nothing from a second
thread, and on a busy 2-core machine the OpenMP hand-offs made them up to ~70x slower (measured: a 4-step
Lanczos on the toy MLP took 0.05 s with 1 thread and 3.1 s with 2 while other jobs ran).
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
