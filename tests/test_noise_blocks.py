"""The block-wise noise of flatlora.noise against one-piece references.

``filter_noise`` and ``add_filter_noise`` draw ``E`` in cache-sized row blocks that continue one generator
stream. The references here are the textbook one-piece draw ``torch.randn(shape, generator) * scale`` and the
plain ``W + E`` / ``W += E`` on the materialised ``E``: bit-identical results are required, at shapes that
cross block boundaries, leave a short tail, are not multiples of 16, or are conv-shaped.
"""

import pytest
import torch

import flatlora.noise as noise
from flatlora.noise import NoiseSpec, _block_rows, add_filter_noise, filter_noise

SHAPES = [(384, 384), (1000, 77), (4097, 17), (300, 3, 7, 7), (2 * 32752 + 5, 1), (17, 5), (0, 5), (600, 500)]


@pytest.fixture(autouse=True, params=["as-configured", "blocks-always"])
def block_policy(request, monkeypatch):
    """With one thread, draws up to 2^18 elements run in one piece: also force blocks for every size."""
    if request.param == "blocks-always":
        monkeypatch.setattr(noise, "_ONE_PIECE", noise._BLOCK)
    return request.param


def _one_piece(shape, scale, seed):
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return z * scale.view(-1, *([1] * (len(shape) - 1)))


@pytest.mark.parametrize("shape", SHAPES)
def test_blocks_are_one_stream(shape):
    blocks = _block_rows(shape, torch.device("cpu"))
    assert sum(blocks) == shape[0]
    if shape == (600, 500):
        assert len(blocks) > 1  # above the one-piece limit: blocks under any policy
    row = 1
    for d in shape[1:]:
        row *= d
    if len(blocks) > 1:
        assert all(b * row % 16 == 0 for b in blocks[:-1]) and blocks[-1] * row >= 16
    scale = torch.rand(shape[0]) + 0.1
    assert torch.equal(filter_noise(shape, scale, seed=77), _one_piece(shape, scale, 77))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_add_equals_adding_the_materialised_noise(shape, dtype):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=gen).to(dtype)
    scale = torch.rand(shape[0], generator=gen) + 0.1
    e = filter_noise(shape, scale, seed=5, dtype=dtype)
    assert torch.equal(add_filter_noise(w, scale, 5), w + e)
    assert torch.equal(add_filter_noise(w, scale, 5, subtract=True), w - e)
    w2 = w.clone()
    assert add_filter_noise(w2, scale, 5, inplace=True) is w2
    assert torch.equal(w2, w + e)
    assert torch.equal(NoiseSpec(5, scale, shape).add_to(w2, subtract=True, inplace=True), (w + e) - e)


def test_transposed_layout_in_place_and_out_of_place():
    """GPT-2 Conv1D / fan_in_fan_out weights are perturbed through their transposed (logical) view."""
    stored = torch.randn(700, 300)  # (in, out) storage: logical (out, in) = stored.t(), not contiguous
    scale = torch.rand(300) + 0.1
    e = filter_noise((300, 700), scale, seed=3)
    out = add_filter_noise(stored.t(), scale, 3)
    assert torch.equal(out, stored.t() + e)
    ref = stored.clone()
    add_filter_noise(stored.t(), scale, 3, inplace=True)
    assert torch.equal(stored.t(), ref.t() + e)
