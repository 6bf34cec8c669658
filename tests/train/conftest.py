"""Session fixtures of the `flatlora train` tests: tiny models and hub-layout datasets, built once (offline)."""

from __future__ import annotations

import pytest

import _train_fixtures as fx


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """Lazily built folders: ``assets("t5")``, ``assets("glue")`` ... (each built once per session)."""
    root = tmp_path_factory.mktemp("train_assets")
    builders = {"t5": fx.tiny_t5, "llama": fx.tiny_llama, "clip": fx.tiny_clip, "glue": fx.glue, "gsm8k": fx.gsm8k,
                "metamath": fx.metamath,
                "codefeedback": lambda p: fx.json_dataset(p, "CodeFeedback-Filtered-Instruction.json",
                                                          fx.CODEFEEDBACK_ROWS),
                "wizardlm": lambda p: fx.json_dataset(p, "wizard_lm.json", fx.WIZARDLM_ROWS),
                "cifar10": fx.cifar, "cifar100": lambda p: fx.cifar(p, fine=True)}
    built: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in built:
            built[name] = str(builders[name](root / name))
        return built[name]

    return get
