#!/usr/bin/env bash
# One short script for a lent GPU (the device tool runs one command): the CUDA-only figures
# the issues ask for, most wanted first, each with its own timeout so the whole stays under
# ~9 minutes; every log is copied to $OUT (or bench/gpu-out).
#
#   1. bench/spec_cost_model.py                  the speculative cost model vs measured speed-up on a
#                                                ~1.3B teacher, at acceptance rates set by an oracle
#   2. bench/decode_speed.py                     bf16 vs bitsandbytes int8 / NF4 decode tok/s (1.7B)
#   3. bench/kd_step.py --preset h100            KD step: naive, chunked, cached (8 x 1024)
#   4. bench/sparse24_speed.py                   2:4 semi-structured matmul and prefill speed-up
#   5. bench/w8a8_gpu.py                         FP8/int8 GEMMs vs slimforge's W8A8 emulation
#
# The lent machine has torch, transformers and accelerate but no bitsandbytes. Wheels found in
# $WHEELS (default .whl; see docs/benchmarks.md for the pip download line) are installed into
# /tmp/site first, so the transformers version there can match the one the tests ran with.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/gpu-out}"
WHEELS="${WHEELS:-.whl}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl > "$OUT/wheels.log" 2>&1 && export PYTHONPATH="/tmp/site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS CMD...: run with a timeout, keep the log, never stop the script
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date +%T))" | tee -a "$OUT/summary.txt"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local code=$?
  tail -n 40 "$OUT/$name.log" >> "$OUT/summary.txt"
  echo "-- $name: exit $code" | tee -a "$OUT/summary.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
"$PY" -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())" \
  >> "$OUT/gpu.txt" 2>&1
"$PY" -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" >> "$OUT/gpu.txt" 2>&1
tee -a "$OUT/summary.txt" < "$OUT/gpu.txt"

step spec_cost_model 120 "$PY" bench/spec_cost_model.py --new-tokens 96 --k 1 2 4 --accept 0.5 0.8 1.0
if "$PY" -c "import bitsandbytes" 2>/dev/null; then
  step decode 170 "$PY" bench/decode_speed.py --new-tokens 64
else
  echo "== decode: skipped, bitsandbytes is not installed and no wheel in $WHEELS" | tee -a "$OUT/summary.txt"
fi
step kd_step_8x1024 150 "$PY" bench/kd_step.py --preset h100
step sparse24 80 "$PY" bench/sparse24_speed.py
step w8a8 50 "$PY" bench/w8a8_gpu.py
echo "== done ($(date +%T))" | tee -a "$OUT/summary.txt"
