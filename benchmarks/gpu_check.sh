#!/usr/bin/env bash
# Issue 15's GPU check, ready to run the moment a CUDA GPU is at hand (~5 minutes on one H100/H200):
#   1. the Triton noise kernel's tests, compiled on the GPU (tests/test_triton_noise.py, ~1 min);
#   2. benchmarks/gpu_overhead.py: a 1.24B Llama (Llama 3.2 1B's shape, random weights, bf16 base), LoRA r 16
#      on all linear layers; micro-batches of 2048 and 8192 tokens x 1 and 4 micro-batches per step; LoRA,
#      Flat-LoRA exact with the kernel, exact with torch's generator, LoRA-SAM; paired step-time ratios with
#      95% intervals, peak memory, and the noise timed alone per backend.
#
#   bash benchmarks/gpu_check.sh [more flags for gpu_overhead.py]
#
# Python: $PY if set, else .venv/bin/python or python3, whichever has a CUDA torch (the device machine's python3
# has torch, triton, transformers and peft; flatlora is taken from src/). Results go to $OUT when it is set (the
# device tool brings that folder back), else to benchmarks/results: gpu-overhead-cuda.{json,md}, tests.log.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  for c in .venv/bin/python python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
      PY=$c; break
    fi
  done
fi
[ -n "${PY:-}" ] || { echo "gpu_check: no python with a CUDA torch found (set PY=...)" >&2; exit 2; }
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
DEST=${OUT:-benchmarks/results}
mkdir -p "$DEST"
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
timeout 180 "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_noise.py tests/test_noise_backend.py 2>&1 | tee "$DEST/tests.log"
tests=${PIPESTATUS[0]}
timeout 390 "$PY" benchmarks/gpu_overhead.py --out "$DEST" "$@"
bench=$?
echo "gpu_check: tests exit $tests, benchmark exit $bench"
exit $(( tests != 0 || bench != 0 ))
