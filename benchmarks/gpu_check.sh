#!/usr/bin/env bash
# The first GPU run, in one command under one hard cap (GPU_CHECK_CAP_S, default 360 s, for everything):
#   1. the Triton noise kernel's tests, compiled on the GPU (tests/test_triton_noise.py,
#      tests/test_noise_backend.py), at most GPU_CHECK_TESTS_S (default 120 s) and never the cap's last minute;
#   2. benchmarks/gpu_overhead.py with the time left: a 1.24B Llama (Llama 3.2 1B's shape, random weights, bf16
#      base), LoRA r 16 on all linear layers; the Llama recipe's setting first (2048-token micro-batches x 8,
#      gradient checkpointing), then 2048 x 1, 8192 x 1, 8192 x 4; LoRA, Flat-LoRA exact with the kernel, exact
#      with torch's generator, LoRA-SAM; paired step-time ratios with 95% intervals, draws of E per step,
#      peak memory, the noise timed alone per backend. It refuses (exit 1) when the kernel does not draw.
#
#   bash benchmarks/gpu_check.sh [flags for gpu_overhead.py]   # on a CUDA machine
#   bash benchmarks/gpu_check.sh --device cpu --quick          # the dry run on CPU: same steps, tiny Llama
#
# Python: $PY if set, else the first of .venv/bin/python, python3, python that imports torch, triton,
# transformers, peft and flatlora (from src/) and, for CUDA, sees a GPU. Nothing is installed: with none, the
# script stops at once (exit 2) and says what each candidate lacks. Results go to $OUT when set (the device
# tool brings that folder back), else to benchmarks/results: check.log (this script's lines), tests.log,
# gpu-overhead-<device>[-quick].{json,md} (rewritten after every configuration: a timeout keeps what was
# measured). Exit 0 when the tests pass and the benchmark completes, 1 otherwise, 2 without a usable python.
set -uo pipefail
CAP=${GPU_CHECK_CAP_S:-360}
if [ -z "${GPU_CHECK_CAPPED:-}" ]; then  # the hard cap: timeout signals this script's whole process group
  GPU_CHECK_CAPPED=1 exec timeout -k 15 "$CAP" bash "$0" "$@"
fi
START=$SECONDS
cd "$(dirname "$0")/.."
DEST=${OUT:-benchmarks/results}
mkdir -p "$DEST"
log() { echo "gpu_check: $*" | tee -a "$DEST/check.log" >&2; }
left() { echo $(( CAP - (SECONDS - START) - ${1:-0} )); }

device=cuda
prev=
for a in "$@"; do
  case "$a" in --device=*) device=${a#--device=} ;; esac
  [ "$prev" = --device ] && device=$a
  prev=$a
done

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# one start per candidate: the imports the run needs, then what ran (the first line of stdout)
need='import sys, torch, triton, transformers, peft, flatlora'
[ "$device" = cpu ] || need="$need; torch.cuda.is_available() or sys.exit('torch.cuda.is_available() is False')"
need="$need; print(sys.executable, 'torch', torch.__version__, 'triton', triton.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
if [ -n "${PY:-}" ]; then candidates=$PY; else candidates=".venv/bin/python python3 python"; fi
PYTHON=
for c in $candidates; do
  command -v "$c" >/dev/null 2>&1 || { log "$c: not found"; continue; }
  if what=$("$c" -c "$need" 2>&1); then PYTHON=$c; break; fi
  log "$c ($(command -v "$c")): $(echo "$what" | tail -n 1)"
done
if [ -z "$PYTHON" ]; then
  log "no python with torch, triton, transformers, peft$([ "$device" = cpu ] || echo ' and a CUDA GPU');" \
      "set PY=... (nothing is installed here)"
  exit 2
fi
log "python $PYTHON: $(echo "$what" | tail -n 1)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv >"$DEST/nvidia-smi.txt" 2>&1 || true

tests_cap=$(left 60)  # at least a minute of the cap stays for the benchmark
if [ "$tests_cap" -lt 5 ]; then
  log "tests not run: ${tests_cap} s left for them of GPU_CHECK_CAP_S=$CAP"
  tests=2
elif why=$("$PYTHON" -c 'import pytest, numpy' 2>&1); then
  [ "$tests_cap" -le "${GPU_CHECK_TESTS_S:-120}" ] || tests_cap=${GPU_CHECK_TESTS_S:-120}
  timeout -k 5 "$tests_cap" "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_triton_noise.py \
    tests/test_noise_backend.py 2>&1 | tee "$DEST/tests.log"
  tests=${PIPESTATUS[0]}
else
  log "tests not run: $(echo "$why" | tail -n 1)"
  tests=2
fi
log "tests exit $tests after $(( SECONDS - START )) s"

bench_s=$(left 20)  # room for the lines below
[ "$bench_s" -ge 30 ] || { log "benchmark not run: $bench_s s left of GPU_CHECK_CAP_S=$CAP"; exit 1; }
log "benchmark: $bench_s s"
timeout -k 5 "$bench_s" "$PYTHON" benchmarks/gpu_overhead.py --out "$DEST" --deadline-s $(( bench_s - 10 )) "$@"
bench=$?
log "tests exit $tests, benchmark exit $bench, $(( SECONDS - START )) s of $CAP"
exit $(( tests != 0 || bench != 0 ))
