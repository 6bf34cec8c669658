"""The CPU noise of flatlora.noise (blocks continuing one generator) against one-piece references.

On CPU the rows of ``E`` are drawn in cache-sized blocks that continue one generator seeded with ``seed``.
The reference here is the textbook draw ``torch.randn(shape, generator) * scale`` and the plain ``W + E`` /
``W += E`` on the materialised ``E``: bit-identical results are required for every thread count and block
policy, at shapes that cross block boundaries, leave a short tail, are not multiples of 16, or are
conv-shaped.
"""

import math
import threading

import pytest
import torch

import flatlora.noise as noise
from flatlora.noise import NoiseSpec, _block_rows, add_filter_noise, filter_noise

SHAPES = [(384, 384), (1000, 77), (4097, 17), (300, 3, 7, 7), (2 * 32752 + 5, 1), (17, 5), (0, 5), (600, 500),
          (3, 40000)]


@pytest.fixture(autouse=True, params=[(1, "as-configured"), (2, "as-configured"), (3, "as-configured"),
                                      (1, "blocks-always")], ids=lambda p: f"{p[0]}thr-{p[1]}")
def threads_and_policy(request, monkeypatch):
    """Every thread count gives the same E; with one thread draws up to 2^18 elements run in one piece,
    so also force blocks for every size."""
    threads, policy = request.param
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    if policy == "blocks-always":
        monkeypatch.setattr(noise, "_ONE_PIECE", 0)
    yield request.param
    torch.set_num_threads(before)


def _reference(shape, scale, seed):
    """One torch.randn of the whole shape from a fresh generator seeded with ``seed``, times the row std."""
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return z * scale.view(-1, *([1] * (len(shape) - 1)))


@pytest.mark.parametrize("shape", SHAPES)
def test_blocks_partition_the_rows(shape):
    blocks = _block_rows(shape)
    row = math.prod(shape[1:])
    assert sum(blocks) == shape[0]
    if shape == (600, 500):
        assert len(blocks) > 1  # large: drawn in blocks
    if len(blocks) > 1:  # multiples of 16 elements: consecutive blocks continue one draw
        assert all(b * row % 16 == 0 for b in blocks[:-1]) and blocks[-1] * row >= 16
        assert max(blocks) * row <= max(noise._BLOCK, row)


@pytest.mark.parametrize("shape", SHAPES)
def test_noise_is_the_one_piece_reference(shape):
    scale = torch.rand(shape[0]) + 0.1
    assert torch.equal(filter_noise(shape, scale, seed=77), _reference(shape, scale, 77))


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


def test_draws_on_other_threads_do_not_interfere():
    """Generators are per thread: draws running at the same time on several threads give each its own E."""
    shape, scale = (600, 500), torch.ones(600)
    want = {seed: _reference(shape, scale, seed) for seed in range(4)}
    got, start = {}, threading.Barrier(4)

    def draw(seed):
        start.wait()
        got[seed] = [filter_noise(shape, scale, seed) for _ in range(3)]

    threads = [threading.Thread(target=draw, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(e, want[seed]) for seed, es in got.items() for e in es) and len(got) == 4
