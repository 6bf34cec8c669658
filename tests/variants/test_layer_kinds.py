"""Layer kinds: nn.Linear, GPT-2 Conv1D (fan_in_fan_out, stored (in, out)), Conv2d (rows = output channels,
n = in * kh * kw), Embedding (a LoRA embedding is a LoRA layer; a plain one is opt-in via target_modules), and
a layer subclass with its own forward (kept: the noise is added beside it)."""

import math

import pytest
import torch
from torch import nn

from flatlora import FlatLora, FlatLoraConfig
from kit.checks import assert_scales_match, check_variant
from kit.compare import assert_grads_close, assert_same_state, state_without_adapters, step_grads
from kit.models import conv_batch, conv_model, embed_batch, embed_model, gpt2, lm_batch, loss_of, mlp_batch, toy
from kit.references import PREFIX, cosine_sigma, merged_by_peft, with_base_at, with_output_plus

T = 10


def test_linear():
    model = toy().eval()
    flat = FlatLora(model, FlatLoraConfig(), total_steps=T)
    assert [(t.kind, t.transposed) for t in flat.target_layers] == [("linear", False)] * 2
    check_variant(model, mlp_batch())


def test_gpt2_conv1d_rows_are_output_columns_of_the_stored_weight():
    model = gpt2().eval()
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)
    sigma = cosine_sigma(T, T, 0.5)
    for target, spec in flat.noise_specs(T):
        assert target.kind == "linear" and target.transposed
        stored = target.module.base_layer.weight.detach()  # (in, out)
        w = stored + target.module.get_delta_weight("default").detach()  # PEFT's delta in the stored layout too
        assert spec.shape == (stored.shape[1], stored.shape[0])
        want = sigma * w.norm(dim=0) / math.sqrt(stored.shape[0])  # per output = per stored column
        torch.testing.assert_close(spec.scale, want, rtol=1e-5, atol=0)
    check_variant(model, lm_batch())


def test_conv2d_rows_are_output_channels_and_n_is_in_kh_kw():
    model = conv_model().eval()
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)
    sigma = cosine_sigma(T, T, 0.5)
    for target, spec in flat.noise_specs(T):
        conv = target.module.base_layer
        out_c, in_c, kh, kw = conv.weight.shape
        assert target.kind == "conv" and spec.shape == (out_c, in_c, kh, kw)
        w = conv.weight.detach() + target.module.get_delta_weight("default").detach()
        norms = torch.stack([w[o].norm() for o in range(out_c)])  # one filter per output channel
        torch.testing.assert_close(spec.scale, sigma * norms / math.sqrt(in_c * kh * kw), rtol=1e-5, atol=0)
    check_variant(model, conv_batch())


def test_a_lora_embedding_is_a_perturbed_lora_layer_with_token_rows():
    model = embed_model().eval()
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=T)
    assert flat.targets == [PREFIX + "emb", PREFIX + "fc"]
    emb_target, spec = flat.noise_specs(T)[0]
    assert emb_target.kind == "embedding" and spec.shape == (20, 8)  # one row per token, n = embedding dim
    results = check_variant(model, embed_batch())
    assert any("lora_embedding_A" in k for k in results["exact"][1])


def test_a_plain_embedding_is_perturbed_only_when_target_modules_names_it():
    model = embed_model(target_modules=["fc"]).eval()  # LoRA on fc only
    assert FlatLora(model, FlatLoraConfig(), total_steps=T).targets == [PREFIX + "fc"]
    opted = FlatLora(model, FlatLoraConfig(target_modules=[r"\.emb$", r"\.fc$"]), total_steps=T)
    assert opted.targets == [PREFIX + "emb", PREFIX + "fc"]
    assert not opted.target_layers[0].is_lora and opted.target_layers[0].kind == "embedding"
    with_emb = FlatLoraConfig(target_modules=[r"\.emb$", r"\.fc$"])
    # check_variant builds its FlatLora with the default targets: drive the opted-in one by hand here
    for mode in ("exact", "inplace"):
        flat = FlatLora(model, with_emb.replace(rho=0.5, mode=mode, seed=1), total_steps=T)
        assert_scales_match(flat, T, merged_by_peft(model, flat.targets), 0.5, T)
        before = state_without_adapters(model)
        noise = flat.noise(T)
        batch = embed_batch()
        _, clean = step_grads(model, batch)
        ref_loss, want = step_grads(with_base_at(model, noise), batch)
        loss, got = step_grads(model, batch, flat.perturbed(T))
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        assert_grads_close(got, want, clean)
        assert_same_state(before, state_without_adapters(model), atol=0 if mode == "exact" else 1e-6)


class ScaledEmbedding(nn.Embedding):
    """An embedding whose class forward does more than F.embedding (as Gemma's scaled word embeddings do)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * 3.0


@pytest.mark.parametrize("lora_on_it", [True, False])
def test_a_layer_subclass_with_its_own_forward_keeps_it(lora_on_it):
    targets = ["emb", "fc"] if lora_on_it else ["fc"]
    torch.manual_seed(0)
    model = embed_model(embedding=ScaledEmbedding(20, 8), target_modules=targets).eval()
    cfg = FlatLoraConfig(rho=0.5, seed=3, target_modules=None if lora_on_it else [r"\.emb$", r"\.fc$"])
    flat = FlatLora(model, cfg, total_steps=T)
    assert flat.targets[0] == PREFIX + "emb"
    batch = embed_batch()
    ref = with_output_plus(model, flat.noise(T))  # the subclass's own output (x 3) plus E[ids]
    with flat.perturbed(T):
        got = loss_of(model, batch)
    torch.testing.assert_close(got, loss_of(ref, batch), rtol=1e-5, atol=1e-6)
