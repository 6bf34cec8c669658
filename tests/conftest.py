"""Test session set-up and shared fixtures. Models, adapters and references live in the kit (tests/kit/)."""

from __future__ import annotations

import os

import pytest
import torch

from kit.models import MODELS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(params=sorted(MODELS))
def model_kind(request) -> str:
    return request.param


@pytest.fixture
def one_thread():
    """One torch thread for tests of tiny tensors: on a shared 2-core machine two threads spend more time waiting
    than computing. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches and counters empty before and after the test (graph counts start from zero)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()
