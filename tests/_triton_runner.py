"""Runs flatlora's Triton noise kernel on a file of jobs and writes what it produced (for test_triton_noise.py).

    TRITON_INTERPRET=1 python tests/_triton_runner.py jobs.pt outputs.pt

On CPU the kernel runs only under Triton's interpreter, and ``TRITON_INTERPRET=1`` must be set before triton is
first imported (triton's own ``randn4x`` is decorated at import), which a pytest process that has compiled
anything with inductor has already done: hence a process of its own. On a GPU the tests call `run` directly.
Nothing is checked here; the tests compare the outputs with independent references.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F


def _layout(w: torch.Tensor, layout: str) -> torch.Tensor:
    """The same logical values in another memory layout."""
    if layout == "contiguous":
        return w.clone()
    if layout == "transposed":  # GPT-2 Conv1D: stored (in, out), logical view (out, in)
        return w.t().contiguous().t()
    if layout == "strided":  # a column slice of a wider tensor, inside a frame (masking must not touch it)
        m, n = w.shape
        big = torch.full((m + 4, 2 * n + 3), 7.0, dtype=w.dtype, device=w.device)
        view = big[2:2 + m, 1:1 + 2 * n:2]
        view.copy_(w)
        return view
    if layout == "channels_last":
        return w.contiguous(memory_format=torch.channels_last)
    raise ValueError(layout)


def _cast_bf16(x: torch.Tensor) -> torch.Tensor:
    """The kernel's fp32 -> bf16 rounding (`flatlora._triton_noise._cast`) applied to ``x`` (1-D)."""
    import triton
    import triton.language as tl

    from flatlora._triton_noise import _cast

    globals()["_cast"] = _cast  # a kernel resolves the functions it calls among its module's globals

    @triton.jit
    def kernel(x_ptr, o_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(o_ptr + i, _cast(tl.load(x_ptr + i, mask=i < n), tl.bfloat16), mask=i < n)

    out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    return out


def _run(job: dict, device: str):
    from flatlora import _triton_noise, noise
    from flatlora.exact import Op, perturbed_op, perturbed_op_compiled

    kind = job["kind"]
    scale = job["scale"].to(device) if "scale" in job else None
    if kind == "cast_bf16":
        return _cast_bf16(job["x"].to(device)).cpu()
    if kind == "noise":
        return noise.filter_noise(job["shape"], scale, job["seed"], job["dtype"]).cpu()
    if kind == "add":
        layout = job.get("layout", "contiguous")
        w = _layout(job["w"].to(device), layout)
        frame = w._base.clone() if layout == "strided" else None
        out = noise.add_filter_noise(w, scale, job["seed"], subtract=job["subtract"], inplace=job["inplace"])
        res = {"out": out.cpu(), "same_object": out is w, "stride": list(out.stride()),
               "w_stride": list(w.stride())}
        if frame is not None:  # the whole storage after the op: the frame must be untouched
            res["frame_before"], res["frame_after"] = frame.cpu(), w._base.cpu()
        return res
    if kind == "tiles":  # the same draw with other tile shapes: the numbers must not depend on them
        outs = []
        for tile in job["tiles"]:
            before = _triton_noise.ROW_TILE
            _triton_noise.ROW_TILE = tuple(tile)
            try:
                outs.append(noise.add_filter_noise(job["w"].to(device), scale, job["seed"]).cpu())
            finally:
                _triton_noise.ROW_TILE = before
        return outs
    if kind == "exact":  # PerturbedOp (eager) and flatlora::perturbed (compiled) on a linear layer
        x = job["x"].to(device).requires_grad_(True)
        w, b, g = job["w"].to(device), job["b"].to(device), job["g"].to(device)
        spec = noise.NoiseSpec(job["seed"], scale, tuple(w.shape))
        op = Op("linear", torch.nn.Linear(1, 1))
        e = spec.sample(w.dtype)  # materialised E from the kernel's E-only path
        res = {"e": e.cpu()}
        y = perturbed_op(x, w, b, spec, op)
        (gx,) = torch.autograd.grad(y, x, g)
        res["eager"] = (y.detach().cpu(), gx.cpu())
        if job.get("compiled"):
            fn = torch.compile(lambda x, seed: perturbed_op_compiled(x, w, b, seed, scale, tuple(w.shape), op),
                               backend="aot_eager", fullgraph=True)
            y = fn(x, torch.tensor(job["seed"], dtype=torch.int64))
            (gx,) = torch.autograd.grad(y, x, g)
            res["compiled"] = (y.detach().cpu(), gx.cpu())
        w_noisy = w + e  # the op folds a linear input to 2-D; so does the reference
        x2, g2 = x.detach().reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
        res["reference"] = (F.linear(x2, w_noisy, b).view(y.shape).cpu(), g2.matmul(w_noisy).view(x.shape).cpu())
        return res
    raise ValueError(kind)


def run(jobs: dict, device: str = "cpu") -> dict:
    """Every job's output, with the noise backend forced to the Triton kernel."""
    from flatlora import noise

    with noise.use_backend("triton"):
        return {name: _run(job, device) for name, job in jobs.items()}


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.save(run(torch.load(sys.argv[1])), sys.argv[2])
