"""LLaMA-Factory's SFT/DPO/... training with Flat-LoRA: ``llamafactory-cli train``, plus the ``flat_lora_*`` keys.

    python examples/llamafactory_train.py examples/llamafactory_lora_sft.yaml
    python examples/llamafactory_train.py examples/llamafactory_lora_sft.yaml flat_lora_rho=0.1 max_steps=50
    torchrun --nproc_per_node 2 examples/llamafactory_train.py examples/llamafactory_lora_sft.yaml   # several GPUs

The arguments are read as ``llamafactory-cli train`` reads them (a YAML or JSON file and ``key=value``
overrides, or ``--key value`` flags). The ``flat_lora_*`` keys (every `flatlora.FlatLoraArguments` field:
``flat_lora_rho``, ``flat_lora_seed``, ``flat_lora_target_modules``, ...) are taken out before LLaMA-Factory
validates the rest, and become a `FlatLoraCallback` handed to ``llamafactory.train.tuner.run_exp(args,
callbacks=[...])``; ``use_unsloth: true`` adds `flatlora.integrations.unsloth.PrepareCallback` (Unsloth's fused
LoRA kernels would bypass the noise). Unlike ``llamafactory-cli``, this script does not re-launch itself under
torchrun on a multi-GPU machine: start it with torchrun. Needs ``pip install llamafactory``; a bad ``flat_lora_*``
key or value prints one line and exits with status 2. docs/stacks.md has the details.
"""

from __future__ import annotations

import sys


def main() -> int:
    from flatlora.integrations import llamafactory

    try:
        args, callbacks = llamafactory.prepare()  # reads sys.argv as llamafactory-cli train does
    except (ImportError, ValueError) as exc:
        print(f"llamafactory_train.py: {exc}", file=sys.stderr)
        return 2
    from llamafactory.train.tuner import run_exp

    run_exp(args=args, callbacks=callbacks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
