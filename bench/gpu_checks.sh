#!/usr/bin/env bash
# One short script for a lent GPU (the device tool runs one command): the CUDA-only figures
# the issues ask for, each with its own timeout, every log copied to $OUT (or bench/gpu-out).
#
#   1. bench/kd_step.py --preset h100            KD step: naive, chunked, cached (8 x 1024)
#   2. bench/kd_step.py --preset h100 16 x 2048  does each variant fit?
#   3. bench/sparse24_speed.py                   2:4 semi-structured matmul and prefill speed-up
#   4. bench/decode_speed.py                     bf16 vs bitsandbytes int8 / NF4 decode tok/s
#   5. bench/w8a8_gpu.py                         FP8/int8 GEMMs vs slimforge's W8A8 emulation: parity and speed
#   6. bench/spec_cost_model.py                  the speculative cost model vs measured speed-up on a
#                                                ~1.3B teacher, at acceptance rates set by an oracle
#
# The lent H100 has torch, transformers and accelerate but no bitsandbytes: put its wheel
# (pip download bitsandbytes==0.50.2 --no-deps -d shared/wheels) where WHEELS points, or step 4
# is skipped with a note. Expected wall time: about 10-12 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/gpu-out}"
WHEELS="${WHEELS:-shared/wheels}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

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
cat "$OUT/gpu.txt" | tee -a "$OUT/summary.txt"

step kd_step_8x1024 240 "$PY" bench/kd_step.py --preset h100
step kd_step_16x2048 180 "$PY" bench/kd_step.py --preset h100 --batch 16 --seq 2048
step sparse24 150 "$PY" bench/sparse24_speed.py

if ! "$PY" -c "import bitsandbytes" 2>/dev/null; then
  ls "$WHEELS"/bitsandbytes-*.whl >/dev/null 2>&1 && "$PY" -m pip install -q --no-deps "$WHEELS"/bitsandbytes-*.whl
fi
if "$PY" -c "import bitsandbytes" 2>/dev/null; then
  step decode 180 "$PY" bench/decode_speed.py
else
  echo "== decode: skipped, bitsandbytes is not installed and no wheel in $WHEELS" | tee -a "$OUT/summary.txt"
fi

step w8a8 150 "$PY" bench/w8a8_gpu.py
step spec_cost_model 240 "$PY" bench/spec_cost_model.py --new-tokens 96 --k 1 2 4 --accept 0.5 0.8
