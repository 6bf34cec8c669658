"""bitsandbytes bases computed at ``deq(W0) + E`` with one matmul (`flatlora._quantized_op`), on CPU.

The reference is written out here: a dense forward ``F.linear(x, deq(W0) + s * B @ A + E, b)`` with ``deq`` from
bitsandbytes' public ``dequantize_4bit`` (4-bit) or LLM.int8's closed form ``int8 * SCB / 127`` (8-bit) and
``E`` materialised by ``flat.noise(t)``. Besides the numbers: the layer runs one weight-sized matmul in forward
and one in backward (where the noise beside the layer ran two each), keeps nothing weight-sized between them,
never writes the quantized storage (nor lets bitsandbytes repack it), and falls back to the noise beside the
layer where bitsandbytes computes otherwise (the CPU-packed 4-bit layout, 8-bit outside training mode).
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from bitsandbytes.functional import _convert_weight_packed_for_cpu, dequantize_4bit
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from flatlora import FlatLora, FlatLoraConfig
from kit.compare import assert_same_state, state_without_adapters

T = 4
IN, HID, OUT = 128, 192, 64  # multiples of the 4-bit blocksize (64); no activation has a weight's size
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:MatMul8bitLt")]
# (bits, 4-bit quant type, nested absmax)
CASES = [(4, "nf4", False), (4, "nf4", True), (4, "fp4", False), (4, "fp4", True), (8, None, False)]
IDS = ["nf4", "nf4-nested", "fp4", "fp4-nested", "int8"]


class TwoLayers(nn.Module):
    """``fc2(relu(fc1(x)))`` on bitsandbytes layers (fc1 with a bias), quantized from seeded fp32 weights."""

    def __init__(self, bits: int, quant_type: str | None, nested: bool) -> None:
        super().__init__()
        self.is_loaded_in_4bit, self.is_loaded_in_8bit = bits == 4, bits == 8  # what PEFT dispatches on
        gen = torch.Generator().manual_seed(0)
        layers = []
        for n_in, n_out, bias in ((IN, HID, True), (HID, OUT, False)):
            dense = torch.randn(n_out, n_in, generator=gen) * 0.05
            if bits == 4:
                layer = bnb.nn.Linear4bit(n_in, n_out, bias=bias, quant_type=quant_type, compress_statistics=nested,
                                          compute_dtype=torch.float32)
                layer.weight = bnb.nn.Params4bit(dense, requires_grad=False, quant_type=quant_type,
                                                 compress_statistics=nested, module=layer)
            else:
                layer = bnb.nn.Linear8bitLt(n_in, n_out, bias=bias, has_fp16_weights=False)
                layer.weight = bnb.nn.Int8Params(dense, requires_grad=False, has_fp16_weights=False)
            if bias:
                layer.bias = nn.Parameter(torch.randn(n_out, generator=gen) * 0.1, requires_grad=False)
            layers.append(layer.to("cpu"))  # quantizes
        self.fc1, self.fc2 = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _model(bits: int, quant_type: str | None = "nf4", nested: bool = False) -> nn.Module:
    torch.manual_seed(0)  # PEFT initialises A from the global RNG
    model = get_peft_model(TwoLayers(bits, quant_type, nested), LoraConfig(r=4, lora_alpha=8,
                                                                          target_modules=["fc1", "fc2"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B = 0 at init would hide the adapter's part of the merged weight
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False  # no repacking by bitsandbytes' own (reference) forwards
    return model.train()


def _deq(base: nn.Module) -> torch.Tensor:
    w = base.weight
    if type(w).__name__ == "Params4bit":
        return dequantize_4bit(w.data, w.quant_state).float()  # bitsandbytes' own, nested scales included
    scb = w.SCB if getattr(w, "SCB", None) is not None else base.state.SCB
    return w.data.float() * scb.float().view(-1, 1) / 127.0


def _x() -> torch.Tensor:
    return torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(3)).requires_grad_()


def _probe(y: torch.Tensor) -> torch.Tensor:
    return (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(4))).sum()


def _layers(model: nn.Module) -> list[nn.Module]:
    return [model.base_model.model.fc1, model.base_model.model.fc2]


def _reference(model: nn.Module, noise: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """``fc2(relu(fc1(x)))`` with every layer a dense ``F.linear`` at ``deq(W0) + s * B @ A + E``: output and the
    gradients of x and of every A and B (fresh leaves)."""
    x = x.detach().clone().requires_grad_()
    leaves, h = {}, x
    bias = model.base_model.model.fc1.base_layer.bias
    if bias.requires_grad:
        leaves["fc1.bias"] = bias = bias.detach().clone().requires_grad_()
    for name, lora in zip(("fc1", "fc2"), _layers(model)):
        a = lora.lora_A["default"].weight.detach().clone().requires_grad_()
        b = lora.lora_B["default"].weight.detach().clone().requires_grad_()
        leaves.update({f"{name}.A": a, f"{name}.B": b})
        e = next(v for k, v in noise.items() if k.endswith(name))
        w = _deq(lora.base_layer) + lora.scaling["default"] * b @ a + e
        h = F.linear(h, w, bias if name == "fc1" else None)
        if name == "fc1":
            h = torch.relu(h)
    _probe(h).backward()
    return h.detach(), {"x": x.grad, **{k: v.grad for k, v in leaves.items()}}


def _run(model: nn.Module, flat: FlatLora, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    with flat.perturbed(T):
        assert all("forward" in lora.base_layer.__dict__ for lora in _layers(model))  # the fused route
        y = model(x)
        _probe(y).backward()
    grads = {"x": x.grad}
    bias = model.base_model.model.fc1.base_layer.bias
    if bias.requires_grad:
        grads["fc1.bias"] = bias.grad
    for name, lora in zip(("fc1", "fc2"), _layers(model)):
        grads.update({f"{name}.A": lora.lora_A["default"].weight.grad, f"{name}.B": lora.lora_B["default"].weight.grad})
    return y.detach(), grads


@pytest.mark.parametrize("bits,quant_type,nested", CASES, ids=IDS)
def test_output_and_gradients_equal_a_dense_forward_at_the_dequantized_weight_plus_lora_plus_noise(
        bits, quant_type, nested):
    model = _model(bits, quant_type, nested)
    model.base_model.model.fc1.base_layer.bias.requires_grad_(True)  # as with LoraConfig(bias="all")
    flat = FlatLora(model, FlatLoraConfig(rho=0.5, seed=1), total_steps=T)
    noise = flat.noise(T)
    want_y, want = _reference(model, noise, _x())
    got_y, got = _run(model, flat, _x())
    clean_y, _ = _reference(model, {k: torch.zeros_like(v) for k, v in noise.items()}, _x())
    assert (want_y - clean_y).abs().max() > 100 * (got_y - want_y).abs().max()  # the noise is visible
    torch.testing.assert_close(got_y, want_y, rtol=1e-5, atol=1e-5)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16, None], ids=["fp32", "bf16", "unset"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["x-fp32", "x-bf16"])
def test_the_fused_forward_computes_in_the_dtype_bitsandbytes_would(compute, x_dtype):
    """Linear4bit casts the input to its compute dtype, which its first forward switches to an fp32/bf16 input's
    dtype when none was given, and returns the input's dtype: the fused forward does the same without writing
    the layer. Checked against bitsandbytes' own forward plus x @ E.T, to the compute dtype's rounding."""
    from flatlora._quantized_op import fused_linear
    from flatlora.noise import NoiseSpec

    gen = torch.Generator().manual_seed(5)
    layer = bnb.nn.Linear4bit(IN, HID, bias=True, quant_type="nf4", compute_dtype=compute)
    layer.weight = bnb.nn.Params4bit(torch.randn(HID, IN, generator=gen) * 0.05, requires_grad=False,
                                     quant_type="nf4", module=layer)
    layer = layer.to("cpu")
    layer.support_avx512bf16_for_cpu = False
    spec = NoiseSpec(7, torch.full((HID,), 0.01), (HID, IN))
    x = torch.randn(3, IN, generator=gen).to(x_dtype)
    flag = layer.compute_type_is_set
    got = fused_linear(x, layer, spec)
    assert layer.compute_type_is_set == flag and layer.compute_dtype == compute  # nothing set on the layer
    want = layer(x) + F.linear(x.float(), spec.sample()).to(x_dtype)  # bitsandbytes' forward sets them now
    used = layer.compute_dtype if layer.compute_dtype is not None else x_dtype
    assert got.dtype == want.dtype == x_dtype
    tol = 1e-5 if used == torch.float32 and x_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


class _FullMatmuls(TorchDispatchMode):
    """Counts matmuls with a weight-shaped operand (``(out, in)`` of fc1 or fc2, either orientation)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.matmul):
            shapes = {tuple(a.shape) for a in args if isinstance(a, torch.Tensor)}
            self.count += bool(shapes & {(HID, IN), (IN, HID), (OUT, HID), (HID, OUT)})
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("bits", [4, 8])
def test_one_matmul_per_layer_in_forward_and_in_backward_and_nothing_weight_sized_kept(bits):
    model = _model(bits)
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)
    saved: list[int] = []

    def count(keep: bool) -> tuple[int, int]:
        flat.config.keep_noisy_weight = keep
        saved.clear()
        model.zero_grad(set_to_none=True)
        with flat.perturbed(T):
            for lora in _layers(model):  # the base forward is swapped, no hook adds a term beside it
                assert "forward" in lora.base_layer.__dict__ and not lora._forward_hooks
            with _FullMatmuls() as fwd, torch.autograd.graph.saved_tensors_hooks(
                    lambda t: saved.append(t.numel()) or t, lambda t: t):
                y = model(_x())
            with _FullMatmuls() as bwd:
                _probe(y).backward()
        return fwd.count, bwd.count

    assert count(keep=False) == (2, 2)  # two layers: one each way (the weight gradient is never formed)
    assert not {HID * IN, OUT * HID} & set(saved), saved
    redrawn = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # keep_noisy_weight keeps forward's deq(W0) + E for backward instead: the saved sizes show it, and the
    # gradients are those of the redrawn E, bit for bit
    assert count(keep=True) == (2, 2)
    assert {HID * IN, OUT * HID} <= set(saved)
    kept = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert kept.keys() == redrawn.keys() and len(kept) == 4
    assert all(torch.equal(kept[n], redrawn[n]) for n in kept)


@pytest.mark.parametrize("bits,quant_type,nested", CASES, ids=IDS)
def test_the_quantized_storage_is_never_written_nor_repacked(bits, quant_type, nested):
    model = _model(bits, quant_type, nested)
    for m in model.modules():  # what makes bitsandbytes' own eval forward repack a 4-bit weight in place
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True
    before = state_without_adapters(model)
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for t in (1, T):
        with flat.perturbed(t):
            _probe(model(_x())).backward()
        opt.step()
        opt.zero_grad()
    if bits == 4:  # an eval forward without grad inside the step: the swapped forward never repacks
        model.eval()
        with flat.perturbed(T), torch.no_grad():
            for lora in _layers(model):
                assert "forward" in lora.base_layer.__dict__
            model(_x())
    assert_same_state(before, state_without_adapters(model))


def test_layers_bitsandbytes_computes_otherwise_keep_the_noise_beside():
    """A CPU-packed 4-bit weight (bf16 kernel without backward) and an 8-bit layer in eval mode (LLM.int8
    quantizes the activations): the base forward stays bitsandbytes', a hook adds x @ E.T."""
    packed = _model(4)
    base = packed.base_model.model.fc1.base_layer
    base.weight.data, _ = _convert_weight_packed_for_cpu(base.weight.data, base.weight.quant_state)
    assert base.weight.quant_state.packing_format_for_cpu
    eight = _model(8).eval()
    for model, beside in ((packed, ["fc1"]), (eight, ["fc1", "fc2"])):
        flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)
        with flat.perturbed(T):
            for name, lora in zip(("fc1", "fc2"), _layers(model)):
                assert ("forward" in lora.base_layer.__dict__) == (name not in beside), name
                assert bool(lora._forward_hooks) == (name in beside), name
            with torch.no_grad():  # a step runs a forward (an empty perturbed step raises: the bypass guard)
                model(_x().detach())


def test_compiled_model_gives_the_eager_numbers():
    """torch.compile: the fused forward runs outside the graph (a graph break per quantized layer)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _model(4, "nf4", True)
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)
    want_y, want = _run(model, flat, _x())
    compiled = torch.compile(model, backend="eager")
    before = state_without_adapters(model)
    try:
        for _ in range(2):  # the second step reuses the graphs
            got_y, got = _run(compiled, flat, _x())
            torch.testing.assert_close(got_y, want_y, rtol=1e-6, atol=1e-6)
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6, msg=k)
        assert any("disable" in k for k in counters["graph_break"]), dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
    assert_same_state(before, state_without_adapters(model))
