"""The weight spaces against independent references: the loss at W + D against a merged copy of the model
whose weight was overwritten with W + D, dL/dW against the gradient of a trainable base weight, H v against
central differences of gradients, the LoRA space against a copy with A + dA, B + dB written in, and the
expected-sharpness noise against the core engine's own noise."""

import copy

import pytest
import torch
from torch import nn

from _threads import single_thread  # noqa: F401  (autouse: one thread per test module)
from flatlora import FlatLora, FlatLoraConfig
from flatlora.analysis import flat_lora_noise, hessian_vector_product
from flatlora.analysis._space import Objective, Space
from kit.models import MODELS, batch_for, loss_of


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x, labels=None):
        logits = self.head(torch.tanh(self.conv(x)).mean((2, 3)))
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class EmbedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.fc = nn.Linear(8, 4)

    def forward(self, input_ids, labels=None):
        logits = self.fc(torch.tanh(self.emb(input_ids)).mean(1))
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def _peft(base: nn.Module, seed: int = 0, **cfg) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, **cfg))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def _case(kind: str):
    """(model in fp64, batch) for the conftest models and the conv / embedding / DoRA toys."""
    gen = torch.Generator().manual_seed(5)
    if kind == "conv":
        model = _peft(ConvNet(), target_modules=["conv", "head"])
        batch = {"x": torch.randn(3, 3, 5, 5, generator=gen), "labels": torch.tensor([0, 1, 3])}
    elif kind == "embedding":
        model = _peft(EmbedNet(), target_modules=["emb", "fc"])
        batch = {"input_ids": torch.randint(0, 20, (3, 6), generator=gen), "labels": torch.tensor([0, 1, 3])}
    elif kind == "dora":
        model = MODELS["mlp"](use_dora=True)
        batch = batch_for("mlp")
    else:
        model = MODELS[kind]()
        batch = batch_for(kind)
    model = model.double()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    return model.eval(), batch


CASES = sorted(MODELS) + ["conv", "embedding", "dora"]


def _merged_reference(model: nn.Module, offsets: dict[str, torch.Tensor]) -> nn.Module:
    """A copy merged by PEFT (``merge_and_unload``), whose plain weights are then overwritten with W + D."""
    ref = copy.deepcopy(model).merge_and_unload()
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for name, d in offsets.items():
            layer = modules[name.removeprefix("base_model.model.")]
            w = layer.weight
            w.add_(d.t() if type(layer).__name__ == "Conv1D" else d)
    return ref


def _random_offset(space: Space, seed: int, size: float = 0.05) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [size * torch.randn(tuple(s), generator=gen, dtype=torch.float64) for s in space.shapes()]


@pytest.mark.parametrize("kind", CASES)
def test_loss_at_w_plus_d_equals_a_merged_copy_with_w_plus_d_written(kind):
    model, batch = _case(kind)
    space = Space(model, "full")
    d = _random_offset(space, 1)
    with torch.no_grad():
        got = float(space.loss(loss_of, batch, d))
        ref = _merged_reference(model, dict(zip(space.names, d)))
        want = float(loss_of(ref, batch))
        unperturbed = float(loss_of(model, batch))
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12)
    assert abs(got - unperturbed) > 1e-6  # the offset did change the loss: the comparison is not vacuous


@pytest.mark.parametrize("kind", ["mlp", "gpt2", "conv"])
def test_gradient_in_the_full_space_equals_the_gradient_of_a_trainable_base_weight(kind):
    """W = W_base + delta, so dL/dW = dL/dW_base: computed here by plain autograd on the stored weight."""
    model, batch = _case(kind)
    space = Space(model, "full")
    _, grad = Objective(space, loss_of, [batch]).value_and_grad()
    ref = copy.deepcopy(model)
    bases = [dict(ref.named_modules())[t.name].get_base_layer() for t in space.targets]
    for b in bases:
        b.weight.requires_grad_(True)
    loss_of(ref, batch).backward()
    for g, b, t in zip(grad, bases, space.targets):
        want = b.weight.grad.t() if t.transposed else b.weight.grad
        torch.testing.assert_close(g, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind,space_kind", [("mlp", "full"), ("mlp", "lora"), ("bert", "full"), ("bert", "lora"),
                                             ("dora", "full")])
def test_hvp_equals_central_differences_of_the_gradient(kind, space_kind):
    """(Not DoRA's LoRA space: PEFT detaches DoRA's weight norm in backward, DoRA paper Sec. 4.3, so autograd
    there differentiates PEFT's training gradient, not the loss; the full space is exact for DoRA too.)"""
    model, batch = _case(kind)
    space = Space(model, space_kind)
    obj = Objective(space, loss_of, [batch])
    v = _random_offset(space, 2, 1.0)
    hv = hessian_vector_product(model, loss_of, [batch], v, space=space_kind)
    eps = 1e-5

    def grad_at(offset):  # the gradient at offset, by autograd on an offset leaf (independent of hvp)
        z = [o.clone().requires_grad_(True) for o in offset]
        return torch.autograd.grad(space.loss(loss_of, batch, z), z, allow_unused=True)

    with torch.enable_grad():
        gp = grad_at([eps * x for x in v])
        gm = grad_at([-eps * x for x in v])
    for h, a, b in zip(hv, gp, gm):
        if a is None:
            continue
        torch.testing.assert_close(h, (a - b) / (2 * eps), rtol=1e-5, atol=1e-7)
    assert any(float(h.abs().max()) > 1e-4 for h in hv)
    with torch.no_grad():
        assert obj.value() == pytest.approx(float(loss_of(model, batch)), rel=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "bert", "conv"])
def test_central_difference_hvp_in_fp32_matches_the_exact_double_backward_product(kind):
    """`Objective.hvp_central` (what the experiments use: two backward passes) against the exact ``H v`` of
    double backward in fp64, on the fp32 model with the step `top_hessian_eigenvalue` takes."""
    from flatlora.analysis.hessian import CENTRAL_REL_EPS
    from flatlora.analysis._space import norm

    model, batch = _case(kind)
    v = _random_offset(Space(model, "full"), 3, 1.0)
    want = hessian_vector_product(model, loss_of, [batch], v)  # fp64, exact
    model32 = copy.deepcopy(model).float()
    batch32 = {k: x.float() if x.is_floating_point() else x for k, x in batch.items()}
    space = Space(model32, "full")
    got = Objective(space, loss_of, [batch32]).hvp_central([x.float() for x in v],
                                                           CENTRAL_REL_EPS * norm(space.values()))
    err = sum(float((g.double() - w).pow(2).sum()) for g, w in zip(got, want)) ** 0.5
    size = sum(float(w.pow(2).sum()) for w in want) ** 0.5
    assert size > 1e-3 and err <= 2e-3 * size


@pytest.mark.parametrize("kind", ["mlp", "gpt2", "conv"])
def test_top_eigenvalue_from_central_differences_matches_the_exact_one(kind):
    """fp32 central differences against fp64 double backward. (Where the curvature is tiny next to the gradient,
    fp32 rounding, of order u ||g|| / eps, dominates: on the `bert` toy, top eigenvalue 4e-4, it is 0.25%.)"""
    from flatlora.analysis import top_hessian_eigenvalue

    model, batch = _case(kind)
    exact = top_hessian_eigenvalue(model, loss_of, [batch], iters=12, tol=1e-8, progress=False)
    model32 = copy.deepcopy(model).float()
    batch32 = {k: x.float() if x.is_floating_point() else x for k, x in batch.items()}
    central = top_hessian_eigenvalue(model32, loss_of, [batch32], iters=12, tol=1e-8, progress=False, hvp="central")
    assert exact.value > 0.1 and central.value == pytest.approx(exact.value, rel=1e-3)
    with pytest.raises(ValueError, match="hvp='forward'"):
        top_hessian_eigenvalue(model, loss_of, [batch], hvp="forward")


@pytest.mark.parametrize("kind", ["mlp", "dora", "gpt2"])
def test_lora_space_offset_equals_a_copy_with_the_adapter_parameters_written(kind):
    model, batch = _case(kind)
    space = Space(model, "lora")
    assert space.names and all("lora_" in n for n in space.names)
    if kind == "dora":
        assert any("lora_magnitude_vector" in n for n in space.names)
    d = _random_offset(space, 3, 0.1)
    with torch.no_grad():
        got = float(space.loss(loss_of, batch, d))
        ref = copy.deepcopy(model)
        params = dict(ref.named_parameters())
        for name, x in zip(space.names, d):
            params[name].add_(x)
        want = float(loss_of(ref, batch))
    assert got == pytest.approx(want, rel=1e-12)
    assert got != pytest.approx(float(loss_of(model, batch)), rel=1e-6)


def test_expected_sharpness_noise_is_flat_loras_noise_of_a_constant_schedule():
    model = MODELS["llama"]()
    rho, seed, k = 0.07, 3, 4
    ours = flat_lora_noise(model, rho, sample=k, seed=seed)
    flat = FlatLora(model, FlatLoraConfig(rho=rho, seed=seed, schedule="constant"), total_steps=8)
    core = flat.noise(k)
    assert list(ours) == list(core)
    for name in core:
        assert torch.equal(ours[name], core[name])
    # and its row std is rho ||W_i|| / sqrt(n) of the merged weight (the paper's noise)
    target = flat.target_layers[0]
    w = target.merged_weight()
    e = torch.stack([flat_lora_noise(model, rho, sample=s, seed=seed)[target.name] for s in range(1, 41)])
    std = e.std(dim=(0, 2))
    want = rho * w.norm(dim=1) / w.shape[1] ** 0.5
    torch.testing.assert_close(std, want, rtol=0.12, atol=0)


@pytest.mark.parametrize("space_kind", ["full", "lora"])
def test_sam_sharpness_of_a_non_quadratic_loss_matches_its_second_order_closed_form(space_kind):
    """s(rho) = rho ||g|| + rho^2/2 u^T H u + O(rho^3), u = g/||g||, H v from `hessian_vector_product`."""
    from flatlora.analysis import sam_sharpness

    model, batch = _case("mlp")
    batches = [batch, {k: v.flip(0) * (1.5 if v.is_floating_point() else 1) for k, v in batch.items()}]
    space = Space(model, space_kind)
    _, g = Objective(space, loss_of, batches).value_and_grad()
    gn = sum(float(x.pow(2).sum()) for x in g) ** 0.5
    u = [x / gn for x in g]
    curv = sum(float((a * b).sum()) for a, b in zip(u, hessian_vector_product(model, loss_of, batches, u,
                                                                              space=space_kind)))
    errors = []
    for rho in (0.02, 0.01):
        s = sam_sharpness(model, loss_of, batches, rho=rho, space=space_kind, progress=False).sharpness
        second = rho * gn + 0.5 * rho**2 * curv
        errors.append(abs(s - second))
        assert abs(s - second) < 0.05 * abs(0.5 * rho**2 * curv)  # the second-order term is resolved
    assert 5.0 < errors[0] / errors[1] < 11.0  # the remainder is third order: halving rho divides it by ~8
