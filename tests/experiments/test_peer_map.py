"""The pre-registered peer map (docs/experiments.md): its preset runs exactly the pre-registered runs, with the
map's vision settings, and its dry-run plan says so."""

import pytest

from flatlora.experiments import preset
from flatlora.experiments.config import PRESETS

PEERS = ["lora", "flat-lora", "lora-sam", "sam-w", "bi-lora", "eflat-lora", "alora", "alora+flat"]


def test_peer_map_preset_is_the_map_vision_regime_with_every_peer():
    cfg, vision = preset("peer-map-vision"), preset("map-vision")
    # in run order: every method of seed 0, then of seed 1, ... (a cut-short study holds complete seeds)
    assert [lab[3] for lab in cfg.run_labels()] == [f"{m}/seed{s}" for s in range(5) for m in PEERS]
    assert cfg.flat_rhos() == [0.15] and [lab[4] for lab in cfg.run_labels()] == [0.15] * 40
    same = {k: v for k, v in vision.to_dict().items() if k not in ("name", "preset", "methods", "rho", "also_against")}
    assert {k: cfg.to_dict()[k] for k in same} == same  # every other setting is the map's
    assert cfg.also_against == ["lora", "flat-lora"]  # report only: P2 pairs every peer against Flat-LoRA too
    # the peers at the config's defaults (their papers' settings), not tuned for this regime
    assert not {"sam_rho", "sam_w_rho", "bi_lora_rho", "bi_lora_norm", "eflat_rho", "eflat_schedule", "eflat_norm",
                "eflat_beta"} & set(PRESETS["peer-map-vision"])


def test_peer_map_dry_run_plan_lists_exactly_the_pre_registered_runs(capsys):
    pytest.importorskip("efficientnet_lite_pytorch")
    from flatlora.cli import main
    from flatlora.experiments.tasks.vision import data_dir

    if not data_dir().is_dir():
        pytest.skip("Fashion-MNIST missing: bash scripts/install_assets.sh")
    assert main(["compare", "--preset", "peer-map-vision", "--dry-run"]) == 0
    out = capsys.readouterr()
    plan = out.out + out.err
    assert f"methods {', '.join(PEERS)} x ranks [8] x seeds [0, 1, 2, 3, 4] = 40 runs; flat-lora rho 0.15" in plan
    assert "512 training examples, 240 steps of batch 32 (15 epochs), test 2000, OOD 6000 over 15 set(s)" in plan
    assert "bi-lora rho 0.05 (scaled norm)" in plan
    assert "eflat-lora rho 0.05 (inv-sqrt, layer norm), beta 0.5" in plan
    assert "8 reallocation round(s) after steps 16, 20, 24, 28, 32, 36, 40, 44" in plan  # K1 16 steps, K2 4
