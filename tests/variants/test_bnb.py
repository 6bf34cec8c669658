"""bitsandbytes 4-bit (QLoRA) and 8-bit bases on CPU: exact mode adds op(x, E) beside the quantized layer, the
noise scale comes from the dequantized weight plus the adapter's delta, inplace mode is refused."""

import copy

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from _variant_checks import check_variant, lm_batch
from _variant_refs import (assert_grads_close, assert_same_state, cosine_sigma, randomize_adapters, row_std,
                           state_without_adapters, step_grads)
from flatlora import FlatLora, FlatLoraConfig

T = 10
TARGETS = ["q_proj", "v_proj", "down_proj"]
pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A 1-layer Llama saved from a config (fp32), to be loaded quantized like a hub checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    path = tmp_path_factory.mktemp("llama")
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return path, originals


def _quantized(llama_dir, bits: int, **lora_kwargs):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    q = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
         if bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
    base = LlamaForCausalLM.from_pretrained(llama_dir[0], quantization_config=q, device_map="cpu")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM",
                                            **lora_kwargs))
    randomize_adapters(model, 0)
    return model.eval()


def _dequantized(layer: nn.Module) -> torch.Tensor:
    """bitsandbytes' own 4-bit dequantization, or LLM.int8's closed form W = int8 * SCB / 127 (row-wise)."""
    w = layer.weight
    if type(w).__name__ == "Params4bit":
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    scb = w.SCB if getattr(w, "SCB", None) is not None else layer.state.SCB
    return w.data.float() * scb.float().view(-1, 1) / 127.0


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


@pytest.mark.parametrize("bits", [4, 8])
def test_noise_scale_comes_from_the_dequantized_weight(llama_dir, bits):
    model = _quantized(llama_dir, bits)
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)
    assert len(flat.targets) == 3 and all(t.quantized for t in flat.target_layers)
    true_w = _true_weights(model, flat.targets)
    sigma = cosine_sigma(T, T, 0.5)
    for target, spec in flat.noise_specs(T):
        torch.testing.assert_close(spec.scale, row_std(true_w[target.name], sigma), rtol=1e-5, atol=0)
        # sanity: the dequantized weight is the checkpoint's weight up to quantization error
        original = llama_dir[1][target.name.split("base_model.model.")[1]]
        deq = _dequantized(target.module.base_layer)
        assert (deq - original).norm() / original.norm() < (0.15 if bits == 4 else 0.02)
        # and the packed storage could not give the norms
        assert target.module.base_layer.weight.dtype in (torch.uint8, torch.int8)


@pytest.mark.parametrize("bits", [4, 8])
def test_gradients_match_the_reference_and_training_steps_run(llama_dir, bits):
    # the reference adds x @ E.T beside the quantized layer; the training steps include the second forward,
    # which breaks if the dequantization disturbs the 8-bit layer's state
    check_variant(_quantized(llama_dir, bits), lm_batch(), modes=("exact",), reference="output",
                  merged=_true_weights)


def test_4bit_equals_an_fp32_model_at_the_dequantized_weight_plus_noise(llama_dir):
    model = _quantized(llama_dir, 4)
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


@pytest.mark.parametrize("bits", [4, 8])
def test_inplace_mode_is_refused_and_nothing_is_touched(llama_dir, bits):
    model = _quantized(llama_dir, bits)
    before = state_without_adapters(model)
    kind = "Params4bit" if bits == 4 else "Int8Params"
    with pytest.raises(ValueError, match=rf"quantized \({kind}\).*mode='exact'"):
        FlatLora(model, FlatLoraConfig(mode="inplace"), total_steps=T)
    assert_same_state(before, state_without_adapters(model))


def test_qdora_on_a_4bit_base(llama_dir):
    model = _quantized(llama_dir, 4, use_dora=True)
    assert all(m.lora_magnitude_vector for n, m in model.named_modules() if n.endswith(tuple(TARGETS)))
    check_variant(model, lm_batch(), modes=("exact",), reference="output", merged=_true_weights)
