"""A reopened ALoRA rank's Adam updates equal a fresh Adam's on that slice (bias correction included), whatever
the tensor's step count; the other slices are untouched by the correction."""

import pytest
import torch

from flatlora.alora.restart import restart_slice

pytestmark = pytest.mark.usefixtures("one_thread")


def _grads(n, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(n)]


def _adamw(params, start=0, **kw):
    opt = torch.optim.AdamW(params, lr=0.01, weight_decay=0.1, **kw)
    # the learning rate changes every step, and the scheduler steps after the optimizer, as in the harness
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + 0.05 * (i + start)))


@pytest.mark.parametrize("reopened_at", [10, 200])
@pytest.mark.parametrize("where", ["row", "col"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_a_reopened_slice_steps_as_a_fresh_adam(reopened_at, where, amsgrad):
    after = 6
    grads = _grads(reopened_at + after, (5, 4), seed=reopened_at)
    w = torch.nn.Parameter(torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    untouched = torch.nn.Parameter(w.detach().clone())  # the same tensor, never reopened
    opt, sched = _adamw([w], amsgrad=amsgrad)
    opt2, sched2 = _adamw([untouched], amsgrad=amsgrad)
    index = 2 if where == "row" else (slice(None), 2)
    for t, g in enumerate(grads, start=1):
        if t == reopened_at + 1:  # reopen after step reopened_at: a fresh Adam takes over the slice from here
            restart_slice(opt, w, index)
            fresh = torch.nn.Parameter(w.detach()[index].clone())
            ref, ref_sched = _adamw([fresh], amsgrad=amsgrad, start=reopened_at)  # the same lr from here on
        for p, o, s in ((w, opt, sched), (untouched, opt2, sched2)):
            p.grad = g.clone()
            o.step()
            s.step()
        if t > reopened_at:
            fresh.grad = g[index].clone()
            ref.step()
            ref_sched.step()
            torch.testing.assert_close(w.detach()[index], fresh.detach(), rtol=1e-12, atol=1e-14)
    others = torch.ones(5, 4, dtype=torch.bool)
    others[index] = False
    assert torch.equal(w.detach()[others], untouched.detach()[others])


def test_without_the_correction_the_first_update_is_off_by_the_bias_corrections():
    """What the correction removes (the module docstring's numbers): with the moments zeroed only, a slice
    reopened after step T0 moves (1 - b1) / (1 - b1^T) / sqrt((1 - b2) / (1 - b2^T)) times as far as a fresh
    rank in its first update (T = T0 + 1; eps off); with restart_slice it moves as far (lr * sign(g))."""
    b1, b2 = 0.9, 0.999
    for reopened_at in (10, 200, 1000):
        moved = {}
        for corrected in (False, True):
            w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
            opt = torch.optim.Adam([w], lr=1.0, betas=(b1, b2), eps=0.0)
            for g in _grads(reopened_at, (3,), seed=0):
                w.grad = g
                opt.step()
            if corrected:
                restart_slice(opt, w, slice(None))
            else:
                for value in opt.state[w].values():
                    if value.shape == w.shape:
                        value.zero_()
            before = w.detach().clone()
            w.grad = torch.ones(3, dtype=torch.float64)
            opt.step()
            moved[corrected] = (before - w.detach()).tolist()
        t = reopened_at + 1
        closed = (1 - b1) / (1 - b1 ** t) / ((1 - b2) / (1 - b2 ** t)) ** 0.5
        assert moved[False] == pytest.approx([closed] * 3, rel=1e-9)  # 0.482, 1.350, 2.515
        assert moved[True] == pytest.approx([1.0] * 3, rel=1e-9)
