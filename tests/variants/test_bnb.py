"""bitsandbytes 4-bit (QLoRA) and 8-bit bases on CPU: exact mode adds op(x, E) beside the quantized layer, the
noise scale comes from the dequantized weight plus the adapter's delta, inplace mode is refused.

A 4-bit weight is tested in both of bitsandbytes' CPU layouts, on every machine: ``plain`` (the layer is told
never to repack, so no forward changes the layout mid-test) and ``packed`` (bitsandbytes' own conversion, the
one ``Linear4bit.forward`` runs in place on a CPU with AVX-512 BF16, is applied up front). Only a forward
through a packed layer needs that CPU (bitsandbytes has no other kernel for the layout); those tests skip
with the reason where it is missing. Shapes are multiples of the 4-bit blocksize (64), which packing needs.
"""

import copy

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import _convert_weight_packed_for_cpu, dequantize_4bit, has_avx512bf16
from peft import LoraConfig, get_peft_model
from torch import nn

from flatlora import FlatLora, FlatLoraConfig
from flatlora._quantized import dequantize_packed_4bit
from kit.adapters import randomize_adapters
from kit.checks import check_variant
from kit.compare import assert_grads_close, assert_same_state, state_without_adapters, step_grads
from kit.models import lm_batch
from kit.references import cosine_sigma, row_std

T = 10
TARGETS = ["q_proj", "v_proj", "down_proj"]
BLOCK = 64  # BitsAndBytesConfig's default 4-bit blocksize
pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt")
# (bits, 4-bit layout)
CASES = [(4, "plain"), (4, "packed"), (8, None)]
CASE_IDS = ["4bit-plain", "4bit-packed", "8bit"]


def _need_packed_kernel(layout: str | None) -> None:
    if layout == "packed" and not has_avx512bf16():
        pytest.skip("this CPU lacks AVX-512 BF16, and bitsandbytes has no other kernel that computes with its packed "
                    "4-bit layout (the decoding of that layout is tested on every CPU)")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A 1-layer Llama saved from a config (fp32), to be loaded quantized like a hub checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    path = tmp_path_factory.mktemp("llama")
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return path, originals


def _absmax_used(qs) -> torch.Tensor:
    """The fp32 per-block scales of a plain-layout 4-bit state (nested ones dequantized by bitsandbytes)."""
    if qs.nested:
        return (bnb.functional.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).float()
    return qs.absmax.float()


def _reference_4bit(layer: nn.Module, packed: bool) -> torch.Tensor:
    """bitsandbytes' own dequantization of the plain layout; for ``packed``, with the block scales rounded to
    bf16 as its packing does (``code[q] * bf16(absmax)``, the weight the packed kernel computes with)."""
    w = layer.weight
    qs = copy.copy(w.quant_state)
    qs.absmax, qs.nested = _absmax_used(w.quant_state), False
    if packed:
        qs.absmax = qs.absmax.bfloat16().float()
    return dequantize_4bit(w.data, qs).float()


def _set_layout(model: nn.Module, layout: str | None) -> None:
    """Put every 4-bit layer in ``layout``; record its reference weight (taken before any repacking)."""
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.reference_weight = _reference_4bit(m, packed=layout == "packed")
            m.support_avx512bf16_for_cpu = layout == "packed"  # plain: no forward may repack it
            if layout == "packed":  # what Linear4bit.forward does in place on an AVX-512 BF16 CPU
                m.weight.data, _ = _convert_weight_packed_for_cpu(m.weight.data, m.weight.quant_state)
                assert m.weight.quant_state.packing_format_for_cpu


def _quantized(llama_dir, bits: int, layout: str | None = "plain", double_quant: bool = False, **lora_kwargs):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    q = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                            bnb_4bit_use_double_quant=double_quant)
         if bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
    base = LlamaForCausalLM.from_pretrained(llama_dir[0], quantization_config=q, device_map="cpu")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM",
                                            **lora_kwargs))
    randomize_adapters(model, 0)
    _set_layout(model, layout if bits == 4 else None)
    return model.eval()


def _dequantized(layer: nn.Module) -> torch.Tensor:
    """4-bit: the reference recorded before any repacking; 8-bit: LLM.int8's closed form W = int8 * SCB / 127."""
    w = layer.weight
    if type(w).__name__ == "Params4bit":
        return layer.reference_weight
    scb = w.SCB if getattr(w, "SCB", None) is not None else layer.state.SCB
    return w.data.float() * scb.float().view(-1, 1) / 127.0


def _quantization_bound(layer: nn.Module, original: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |dequantized - original| from the quantizer itself.

    4-bit: a value is rounded to the nearest code of its block, so the error is at most half the widest gap of
    the code table times the block's absmax, plus the error of the scale used (bf16 rounding when packed:
    2^-8 relative, since |code| <= 1). 8-bit (row-wise absmax ``SCB``): half a step, SCB / 127 / 2, of the fp16
    weight that LLM.int8 quantizes, plus that fp16 rounding.
    """
    w = layer.weight
    if type(w).__name__ == "Params4bit":
        code = w.quant_state.code.float().sort().values
        half_gap = (code[1:] - code[:-1]).max() / 2
        packed = getattr(w.quant_state, "packing_format_for_cpu", False)
        blocks = original.reshape(-1, BLOCK).abs().amax(dim=1, keepdim=True)
        bound = blocks * (half_gap + (2.0**-8 if packed else 0.0))
        return bound.expand(-1, BLOCK).reshape(original.shape) + 1e-6
    scb = w.SCB if getattr(w, "SCB", None) is not None else layer.state.SCB
    return scb.float().view(-1, 1) / 254.0 + (original.half().float() - original).abs() + 1e-7


def _true_weights(model, names) -> dict:
    """dequantized W_base + s * B @ A (or DoRA's m * (.) / ||.||_row), computed here from the parameters."""
    out = {}
    for name in names:
        m = model.get_submodule(name)
        w = _dequantized(m.base_layer) + m.scaling["default"] * (
            m.lora_B["default"].weight @ m.lora_A["default"].weight).detach()
        if m.lora_magnitude_vector:
            mag = m.lora_magnitude_vector["default"].weight.detach()
            w = w * (mag / w.norm(dim=1)).view(-1, 1)
        out[name] = w
    return out


@pytest.mark.parametrize("bits,layout", CASES, ids=CASE_IDS)
def test_noise_scale_comes_from_the_dequantized_weight(llama_dir, bits, layout):
    model = _quantized(llama_dir, bits, layout)
    before = state_without_adapters(model)
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)
    assert len(flat.targets) == 3 and all(t.quantized for t in flat.target_layers)
    true_w = _true_weights(model, flat.targets)
    sigma = cosine_sigma(T, T, 0.5)
    for target, spec in flat.noise_specs(T):
        torch.testing.assert_close(spec.scale, row_std(true_w[target.name], sigma), rtol=1e-5, atol=0)
        # sanity: the reference is the checkpoint's weight up to the quantizer's own error bound
        layer = target.module.base_layer
        original = llama_dir[1][target.name.split("base_model.model.")[1]]
        assert ((_dequantized(layer) - original).abs() <= _quantization_bound(layer, original)).all()
        # and the integer storage could not give the norms
        assert layer.weight.dtype in (torch.uint8, torch.int8)
    # reading the weights wrote nothing: the bytes, scales and layout flag are as they were
    assert_same_state(before, state_without_adapters(model))


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax-fp32", "absmax-nested"])
@pytest.mark.parametrize("shape", [(64, 128), (96, 320)])
def test_packed_decoding_equals_bitsandbytes_dequantization(shape, double_quant):
    """The packed layout decoded from its bytes equals bitsandbytes' dequantization of the plain layout with
    the scales its packing keeps (bf16), bit for bit; the packed tensors are left untouched."""
    torch.manual_seed(1)
    layer = bnb.nn.Linear4bit(shape[1], shape[0], bias=False, quant_type="nf4", compress_statistics=double_quant,
                              compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(torch.randn(shape) * 0.02, requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant, module=layer)
    layer = layer.to("cpu")  # quantizes
    want = _reference_4bit(layer, packed=True)
    data, qs = _convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
    data_before, absmax_before = data.clone(), qs.absmax.clone()
    got = dequantize_packed_4bit(data, qs)
    assert got.shape == shape and got.dtype == torch.float32
    assert torch.equal(got, want)
    assert torch.equal(data, data_before) and torch.equal(qs.absmax, absmax_before) and qs.packing_format_for_cpu
    # the layout is not the plain one read as is: bitsandbytes' plain dequantization of these bytes differs
    assert not torch.allclose(got, want.roll(1, dims=0))


def test_packed_layout_with_wrong_sizes_is_refused():
    layer = bnb.nn.Linear4bit(128, 64, bias=False, quant_type="nf4", compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, quant_type="nf4", module=layer)
    layer = layer.to("cpu")
    data, qs = _convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
    with pytest.raises(ValueError, match=r"marked packed for CPU.*exclude_modules"):
        dequantize_packed_4bit(data[:32], qs)


def test_an_eval_forward_that_repacks_the_weight_keeps_the_noise_scale_right(llama_dir):
    """The real trigger: with the AVX-512 BF16 flag set, bitsandbytes repacks at an eval forward without grad.
    The packed kernel computes with the weight recorded before (scales in bf16, up to its bf16 rounding of x
    and of the output), and Flat-LoRA's row norms come from that same weight."""
    _need_packed_kernel("packed")
    model = _quantized(llama_dir, 4, "plain")
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    lora = model.get_submodule(name)
    q = lora.base_layer
    w = _reference_4bit(q, packed=True)  # taken while the layout is still plain
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))
        assert q.weight.quant_state.packing_format_for_cpu
        y = q(x)
    exact = x @ w.T
    bound = 2.0**-8 * 1.01 * (x.abs() @ w.abs().T + exact.abs()) + 1e-6
    assert ((y - exact).abs() <= bound).all(), (y - exact).abs().max()
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)
    spec = {t.name: s for t, s in flat.noise_specs(T)}[name]
    merged = w + lora.scaling["default"] * (lora.lora_B["default"].weight @ lora.lora_A["default"].weight).detach()
    torch.testing.assert_close(spec.scale, row_std(merged, cosine_sigma(T, T, 0.5)), rtol=1e-5, atol=0)


@pytest.mark.parametrize("bits,layout", CASES, ids=CASE_IDS)
@pytest.mark.filterwarnings("ignore:.*an autograd kernel was not registered")  # see below
def test_gradients_match_the_reference_and_training_steps_run(llama_dir, bits, layout):
    # packed: bitsandbytes' packed kernel has no backward, so no gradient reaches x through a packed base (torch
    # warns); the reference shares that base, and the adapter gradients are still compared exactly.
    # the reference adds x @ E.T beside the quantized layer; the training steps include the second forward,
    # which breaks if the dequantization disturbs the 8-bit layer's state or the packed 4-bit layout
    _need_packed_kernel(layout)
    check_variant(_quantized(llama_dir, bits, layout), lm_batch(), modes=("exact",), reference="output",
                  merged=_true_weights)


def test_4bit_equals_an_fp32_model_at_the_dequantized_weight_plus_noise(llama_dir):
    # plain layout: its kernel computes in fp32 here, as the fp32 twin does (the packed kernel rounds to bf16)
    model = _quantized(llama_dir, 4, "plain")
    flat = FlatLora(model, FlatLoraConfig(rho=0.5, seed=2), total_steps=T)
    noise = flat.noise(T)
    twin = copy.deepcopy(model)  # the same adapters on fp32 nn.Linear bases holding dequant(W) + E
    for name, e in noise.items():
        layer = twin.get_submodule(name)
        q = layer.base_layer
        dense = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
        with torch.no_grad():
            dense.weight.copy_(_dequantized(q) + e)
            if q.bias is not None:
                dense.bias.copy_(q.bias)
        dense.requires_grad_(False)
        layer.base_layer = dense
    batch = lm_batch()
    _, clean = step_grads(model, batch)
    want_loss, want = step_grads(twin, batch)
    loss, got = step_grads(model, batch, flat.perturbed(T))
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    assert_grads_close(got, want, clean, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("bits,layout", CASES, ids=CASE_IDS)
def test_inplace_mode_is_refused_and_nothing_is_touched(llama_dir, bits, layout):
    model = _quantized(llama_dir, bits, layout)
    before = state_without_adapters(model)
    kind = "Params4bit" if bits == 4 else "Int8Params"
    with pytest.raises(ValueError, match=rf"quantized \({kind}\).*mode='exact'"):
        FlatLora(model, FlatLoraConfig(mode="inplace"), total_steps=T)
    assert_same_state(before, state_without_adapters(model))


def test_qdora_on_a_4bit_base(llama_dir):
    model = _quantized(llama_dir, 4, "plain", use_dora=True)
    assert all(m.lora_magnitude_vector for n, m in model.named_modules() if n.endswith(tuple(TARGETS)))
    check_variant(model, lm_batch(), modes=("exact",), reference="output", merged=_true_weights)
