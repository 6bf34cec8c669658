"""The exact mode under torch.compile: the same losses and gradients as the eager model, clean base weights,
one compilation for all steps (the seed and row std are graph inputs), and the custom ops pass opcheck."""

import copy

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

from flatlora import FlatLora, FlatLoraConfig
from flatlora._compiled import perturbed as _perturbed, perturbed_input_grad as _perturbed_input_grad
from flatlora.exact import Op, perturbed_op, perturbed_op_compiled
from flatlora.noise import NoiseSpec, row_scale
from kit.adapters import randomize_lora
from kit.compare import base_state, lora_grads
from kit.models import batch_for, gpt2_model, loss_of, toy_model

T = 4
pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # every test counts graphs from zero (tests/conftest.py)


class ConvNet(nn.Module):
    """conv (with bias) -> gelu -> linear head; returns {'loss', 'logits'}."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict:
        logits = self.fc(nn.functional.gelu(self.conv(x)).flatten(1))
        return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)}


def _lora_model(net: type[nn.Module], targets: list[str]) -> nn.Module:
    """``net()`` built under seed 0 with a rank-2 PEFT LoRA on ``targets``, adapters randomised (seed 0)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(net(), LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    randomize_lora(model, 0)
    return model


def conv_model() -> nn.Module:
    return _lora_model(ConvNet, ["conv", "fc"])


def conv_batch(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(4, 3, 8, 8, generator=gen), "labels": torch.randint(0, 3, (4,), generator=gen)}


class EmbedNet(nn.Module):
    """embedding -> mean over tokens -> linear head; returns {'loss', 'logits'}."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> dict:
        logits = self.fc(self.emb(ids).mean(1))
        return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)}


def embed_model() -> nn.Module:
    return _lora_model(EmbedNet, ["emb", "fc"])


def embed_batch(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"ids": torch.randint(0, 20, (4, 5), generator=gen), "labels": torch.randint(0, 3, (4,), generator=gen)}


MODELS = {"mlp": (toy_model, lambda seed: batch_for("mlp", seed)), "conv": (conv_model, conv_batch),
          "embed": (embed_model, embed_batch),
          # DoRA: the noise added beside the layer by a forward hook (the noise-only op)
          "dora": (lambda: toy_model(use_dora=True), lambda seed: batch_for("mlp", seed))}
PEFT_GRAPH_BREAKS = {"dora"}  # PEFT's DoRA forward breaks the graph itself (also without Flat-LoRA)


def _step(model: nn.Module, flat: FlatLora, t: int, batch: dict) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    with flat.perturbed(t):
        loss = loss_of(model, batch)
        loss.backward()
    return loss.detach(), lora_grads(getattr(model, "_orig_mod", model))  # a compiled model's own names


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _compare(got: tuple, want: tuple) -> None:
    (loss, grads), (ref_loss, ref_grads) = got, want
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-6)


def _run_compiled_against_eager(kind: str, backend: str) -> None:
    """Steps 1..T, a clean forward after each: compiled vs eager (same seeds), graphs counted after step 1."""
    build, batch_of = MODELS[kind]
    model = build().eval()
    ref = copy.deepcopy(model)
    cfg = FlatLoraConfig(rho=0.5, seed=7)  # cosine: a different sigma (and seed) at every step
    flat, flat_ref = FlatLora(model, cfg, total_steps=T), FlatLora(ref, cfg, total_steps=T)
    compiled = torch.compile(model, backend=backend)
    clean = base_state(model)
    graphs = None
    for t in range(1, T + 1):
        batch = batch_of(t)
        _compare(_step(compiled, flat, t, batch), _step(ref, flat_ref, t, batch))
        with torch.no_grad():  # outside perturbed(): the clean model (may compile one more graph, once)
            torch.testing.assert_close(loss_of(compiled, batch), loss_of(ref, batch), rtol=1e-5, atol=1e-6)
        if t == 1:
            graphs = _graphs()
            assert graphs > 0
        assert _graphs() == graphs, f"step {t} compiled new graphs: {_graphs()} > {graphs}"
    assert not counters["recompiles"], dict(counters["recompiles"])
    if kind not in PEFT_GRAPH_BREAKS:  # the perturbed layers are one opaque op each: no graph break
        assert not counters["graph_break"], dict(counters["graph_break"])
    now = base_state(model)
    assert all(torch.equal(clean[k], now[k]) for k in clean)  # bit for bit
    assert not any("forward" in m.__dict__ or m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_steps_match_eager_without_recompiling(kind, backend):
    _run_compiled_against_eager(kind, backend)


def test_gpt2_conv1d_layers_under_compile_match_eager():
    """GPT-2's Conv1D (stored (in, out)): the op takes the transposed view of the weight."""
    model = gpt2_model().eval()
    ref = copy.deepcopy(model)
    cfg = FlatLoraConfig(rho=0.5, seed=7)
    flat, flat_ref = FlatLora(model, cfg, total_steps=T), FlatLora(ref, cfg, total_steps=T)
    compiled = torch.compile(model, backend="eager")
    graphs = None
    for t in (1, 2, 3):
        batch = batch_for("gpt2", t)
        _compare(_step(compiled, flat, t, batch), _step(ref, flat_ref, t, batch))
        graphs = graphs or _graphs()
        assert _graphs() == graphs
    assert not counters["recompiles"], dict(counters["recompiles"])


def test_inductor_steps_match_eager_without_recompiling():
    _run_compiled_against_eager("mlp", "inductor")


def test_the_noise_moves_the_compiled_gradients():
    """Guard for the tests above: the perturbed gradients differ from the clean ones well beyond tolerance."""
    model = toy_model().eval()
    flat = FlatLora(model, FlatLoraConfig(rho=0.5, seed=7), total_steps=T)
    compiled = torch.compile(model, backend="eager")
    batch = batch_for("mlp", T)
    _, noisy = _step(compiled, flat, T, batch)
    model.zero_grad(set_to_none=True)
    loss_of(compiled, batch).backward()
    clean = lora_grads(model)  # the compiled wrapper shares the model's parameters
    assert max(((noisy[k] - clean[k]).norm() / clean[k].norm()).item() for k in clean) > 1e-2


def test_trainable_base_weight_falls_back_to_the_eager_op_under_compile():
    """A trainable base weight is outside the custom op: PerturbedOp runs in a graph break, same numbers."""
    model = toy_model().eval()
    model.base_model.model.fc1.base_layer.weight.requires_grad_(True)
    ref = copy.deepcopy(model)
    cfg = FlatLoraConfig(rho=0.5, seed=7)
    flat, flat_ref = FlatLora(model, cfg, total_steps=T), FlatLora(ref, cfg, total_steps=T)
    compiled = torch.compile(model, backend="aot_eager")
    for t in (2, 3):
        batch = batch_for("mlp", t)
        _compare(_step(compiled, flat, t, batch), _step(ref, flat_ref, t, batch))
        w, w_ref = model.base_model.model.fc1.base_layer.weight, ref.base_model.model.fc1.base_layer.weight
        torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-6)


def test_autocast_under_compile_matches_eager():
    model = toy_model().eval()
    ref = copy.deepcopy(model)
    cfg = FlatLoraConfig(rho=0.5, seed=7)
    flat, flat_ref = FlatLora(model, cfg, total_steps=T), FlatLora(ref, cfg, total_steps=T)
    compiled = torch.compile(model, backend="aot_eager")
    batch = batch_for("mlp", 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = _step(compiled, flat, T, batch), _step(ref, flat_ref, T, batch)
    _compare(got, want)


def _spec_args(weight: torch.Tensor, seed: int = 123456789012345) -> tuple:
    scale = row_scale(weight.detach().reshape(weight.shape[0], -1), 0.3)
    return torch.tensor(seed, dtype=torch.int64), scale, tuple(weight.shape)


def test_compiled_op_equals_perturbed_op_when_called_eagerly():
    """Eagerly, the custom op gives PerturbedOp's numbers bit for bit (forward and input/bias gradients)."""
    torch.manual_seed(0)
    cases = ((nn.Linear(6, 5), (2, 3, 6), "linear"), (nn.Conv2d(3, 4, 3, padding=1), (2, 3, 5, 5), "conv"))
    for layer, x_shape, kind in cases:
        layer.weight.requires_grad_(False)
        seed, scale, shape = _spec_args(layer.weight)
        op = Op(kind, layer)
        x = torch.randn(x_shape, requires_grad=True)
        for weight, bias in ((layer.weight, layer.bias), (None, None)):
            want = perturbed_op(x, weight, bias, NoiseSpec(int(seed), scale, shape), op)
            got = perturbed_op_compiled(x, weight, bias, seed, scale, shape, op)
            assert torch.equal(got, want)
            wrt = [x] + ([bias] if bias is not None else [])
            g = torch.randn_like(want)
            for a, b in zip(torch.autograd.grad(got, wrt, g), torch.autograd.grad(want, wrt, g)):
                assert torch.equal(a, b)


def test_custom_ops_pass_opcheck():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    emb = nn.Embedding(10, 4)
    for m in (lin, conv, emb):
        m.weight.requires_grad_(False)
    x = torch.randn(4, 6, requires_grad=True)
    xc = torch.randn(2, 3, 7, 7, requires_grad=True)
    ids = torch.tensor([[1, 2, 0], [3, 3, 9]])
    for layer, inp, kind in ((lin, x, "linear"), (conv, xc, "conv"), (emb, ids, "embedding")):
        seed, scale, shape = _spec_args(layer.weight)
        rest = (scale, seed, list(shape), kind, Op(kind, layer).params(), None)
        torch.library.opcheck(_perturbed, (inp, layer.weight, getattr(layer, "bias", None), *rest))
        torch.library.opcheck(_perturbed, (inp, None, None, *rest))
    seed, scale, shape = _spec_args(conv.weight)
    g = torch.randn(2, 4, 4, 4)
    torch.library.opcheck(_perturbed_input_grad, (g, conv.weight, scale, seed, list(shape), [2, 3, 7, 7],
                                                  torch.float32, "conv", Op("conv", conv).params()))


@pytest.mark.skipif(not hasattr(torch.Tag, "cudagraph_unsafe"), reason="this torch has no cudagraph_unsafe tag")
def test_custom_ops_are_kept_out_of_cuda_graphs():
    """Each op reads its seed back as a Python int: a captured CUDA graph would replay one step's seed. Tagged
    ``cudagraph_unsafe``, and inductor's own test for a node (what decides partitions and cudagraph skips)
    agrees."""
    from torch._inductor.utils import is_cudagraph_unsafe_fx_node

    graph = torch.fx.Graph()
    for op in (torch.ops.flatlora.perturbed.default, torch.ops.flatlora.perturbed_input_grad.default):
        assert torch.Tag.cudagraph_unsafe in op.tags
        assert is_cudagraph_unsafe_fx_node(graph.call_function(op, ()))
    assert not is_cudagraph_unsafe_fx_node(graph.call_function(torch.ops.aten.mm.default, ()))


def test_spec_taken_at_the_first_forward_under_compile(monkeypatch):
    """Under FSDP2 the spec is taken at the layer's first forward of the step (weights whole there), in a graph
    break; simulated here by reporting every layer as sharded. Same numbers, no new graph after step 1."""
    import flatlora._sharding

    monkeypatch.setattr(flatlora._sharding, "sharded", lambda target: True)
    model = toy_model().eval()
    ref = copy.deepcopy(model)
    cfg = FlatLoraConfig(rho=0.5, seed=7)
    flat, flat_ref = FlatLora(model, cfg, total_steps=T), FlatLora(ref, cfg, total_steps=T)
    compiled = torch.compile(model, backend="aot_eager")
    graphs = None
    for t in range(1, T + 1):
        batch = batch_for("mlp", t)
        got = _step(compiled, flat, t, batch)
        assert not any(layer.ready for layer in flat._exact_layers.values())  # end() reset them
        _compare(got, _step(ref, flat_ref, t, batch))
        graphs = graphs or _graphs()
        assert _graphs() == graphs
    assert counters["graph_break"]  # the spec was taken in the compiled forward, outside the graph


def test_trainer_with_torch_compile_trains_the_same_adapters(tmp_path):
    """Trainer(torch_compile=True) + FlatLoraCallback: after 4 optimizer steps (2 micro-batches each) the
    adapters equal those of the same run without compile."""
    from transformers import Trainer, TrainingArguments

    from flatlora import FlatLoraCallback

    gen = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(32, 16, generator=gen), torch.randint(0, 4, (32,), generator=gen)
    data = [{"x": xs[i], "labels": ys[i]} for i in range(32)]
    trained = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model = toy_model()
        args = TrainingArguments(
            output_dir=str(tmp_path / str(compiled)), per_device_train_batch_size=4, gradient_accumulation_steps=2,
            max_steps=4, learning_rate=5e-2, use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
            remove_unused_columns=False, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
            torch_compile=compiled, torch_compile_backend="aot_eager" if compiled else None)
        Trainer(model=model, args=args, train_dataset=data, callbacks=[FlatLoraCallback(rho=0.5)]).train()
        trained[compiled] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert _graphs() == 1 and not counters["recompiles"]  # one graph for 4 steps x 2 micro-batches
    start = {n: p for n, p in toy_model().named_parameters() if "lora_" in n}
    assert max((trained[False][n] - start[n]).abs().max().item() for n in start) > 1e-2  # it trained
    for n in start:
        torch.testing.assert_close(trained[True][n], trained[False][n], rtol=1e-5, atol=1e-6)
