"""PerturbedOp against autograd on the materialised W + E (gradcheck in float64 and explicit formulas)."""

import pytest
import torch
from torch import nn

from flatlora.exact import Op, PerturbedOp, perturbed_op
from flatlora.noise import NoiseSpec, row_scale


def _spec(weight: torch.Tensor, seed: int = 11, sigma: float = 0.3) -> NoiseSpec:
    logical = weight.detach().reshape(weight.shape[0], -1)
    return NoiseSpec(seed, row_scale(logical, sigma).to(weight.device), tuple(weight.shape))


LAYERS = {
    "linear": lambda: nn.Linear(6, 5),
    "conv2d": lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1),
    "conv1d_reflect": lambda: nn.Conv1d(3, 4, 3, padding=1, padding_mode="reflect"),
    "conv2d_same": lambda: nn.Conv2d(3, 4, 3, padding="same"),
}
INPUTS = {"linear": (2, 3, 6), "conv2d": (2, 3, 7, 7), "conv1d_reflect": (2, 3, 9), "conv2d_same": (2, 3, 5, 5)}


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("trainable_base", [False, True])
def test_gradcheck_and_equality_with_the_materialised_weight(name, trainable_base):
    torch.manual_seed(0)
    layer = LAYERS[name]().double()
    layer.weight.requires_grad_(trainable_base)
    kind = "linear" if name == "linear" else "conv"
    op, spec = Op(kind, layer), _spec(layer.weight)
    x = torch.randn(INPUTS[name], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: PerturbedOp.apply(x, w, b, spec, op),
                                    (x, layer.weight, layer.bias))
    # the same numbers as autograd through an explicit W + E
    e = spec.sample(torch.float64)
    y = PerturbedOp.apply(x, layer.weight, layer.bias, spec, op)
    y_ref = op(x, layer.weight + e, layer.bias)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, layer.bias], g)
    want = torch.autograd.grad(y_ref, [x, layer.bias], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_noise_only_term_and_embedding():
    emb = nn.Embedding(10, 4, padding_idx=0)
    spec = _spec(emb.weight)
    ids = torch.tensor([[1, 2, 0], [3, 3, 9]])
    y = PerturbedOp.apply(ids, None, None, spec, Op("embedding", emb))
    torch.testing.assert_close(y, spec.sample()[ids])
    emb.weight.requires_grad_(True)
    y = PerturbedOp.apply(ids, emb.weight, None, spec, Op("embedding", emb))
    y.sum().backward()
    counts = torch.bincount(ids.flatten(), minlength=10).float()
    counts[0] = 0  # padding_idx gets no gradient
    torch.testing.assert_close(emb.weight.grad, counts[:, None].expand(10, 4))


def test_backward_keeps_nothing_but_the_spec():
    """No activation is saved on the frozen fast path: x is not kept, only the weight reference."""
    layer = nn.Linear(8, 8)
    layer.weight.requires_grad_(False)
    saved = []
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        PerturbedOp.apply(x, layer.weight, layer.bias, _spec(layer.weight), Op("linear", layer))
    assert all(t is layer.weight or t is layer.bias for t in saved)


def test_autocast_returns_input_gradients_in_the_input_dtype():
    layer = nn.Linear(8, 8)
    layer.weight.requires_grad_(False)
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = PerturbedOp.apply(x, layer.weight, layer.bias, _spec(layer.weight), Op("linear", layer))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("trainable_base", [False, True])
def test_folded_linear_output_is_not_copied_and_takes_in_place_updates(trainable_base):
    """perturbed_op folds (..., n) inputs to 2-D: the op's output is the matmul's own buffer (no copy), and
    an in-place ``+=`` on the (..., m) result (what PEFT's AdaLoRA does) gives autograd's gradients."""
    torch.manual_seed(1)
    layer = nn.Linear(6, 5).double()
    layer.weight.requires_grad_(trainable_base)
    op, spec = Op("linear", layer), _spec(layer.weight)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    extra = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    y = perturbed_op(x, layer.weight, layer.bias, spec, op)
    assert y.shape == (2, 3, 5) and y._base is not None and y._base.grad_fn.name() == "PerturbedOpBackward"
    y += extra * 2
    w_ref = layer.weight + spec.sample(torch.float64)
    y_ref = nn.functional.linear(x, w_ref, layer.bias) + extra * 2
    torch.testing.assert_close(y, y_ref)
    wrt = [x, extra, layer.bias] + ([layer.weight] if trainable_base else [])
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, wrt, g), torch.autograd.grad(y_ref, wrt, g)):
        torch.testing.assert_close(a, b)
