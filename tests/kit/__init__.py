"""The test reference kit: what the test suites (tests/*.py, tests/analysis, tests/variants, tests/distributed
and its torchrun workers) share, so each toy model, adapter convention and reference exists once.

* ``models``: tiny models built from configs (no downloads) with PEFT adapters, their batches, ``loss_of``;
* ``adapters``: seeded randomisation of adapter factors, and a model's LoRA layers;
* ``references``: the answers the library must reproduce, computed without flatlora: merged weights, the
  closed-form row std, models at ``W + E``;
* ``compare``: gradients and frozen state of a model, and the assertions that compare them;
* ``checks``: ``check_variant`` and the other end-to-end checks a LoRA variant must pass (these drive flatlora).

Import it as ``kit.<module>``: pytest puts ``tests/`` on ``sys.path`` (tests/conftest.py lives there), and
``tests/distributed/_dist_common.py`` does the same for the workers that torchrun starts as scripts.
"""
