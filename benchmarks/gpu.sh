#!/usr/bin/env bash
# Every GPU figure of issue #12 in one run (< 6 minutes on one H100/H200): training tok/s + MFU (ours, HF,
# nanoGPT), run_train.py end to end, decoding (eager, CUDA graph, HF). Writes benchmarks/results/gpu.json
# (or $OUT/gpu.json when OUT is set) and prints the tables for benchmarks/RESULTS.md.
#   benchmarks/gpu.sh                 # on the GPU machine, after benchmarks/gpu_prepare.sh here
#   benchmarks/gpu.sh --tiny --device cpu   # the same plumbing on tiny shapes, no GPU needed
# Extra arguments go to benchmarks/gpu_suite.py (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .gpu/whl ] && ! python3 -c "import hydra, omegaconf" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-site .gpu/whl/*.whl
  export PYTHONPATH=/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -z "${NANOGPT_DIR:-}" ] && [ -f .gpu/nanogpt/model.py ]; then export NANOGPT_DIR=$PWD/.gpu/nanogpt; fi
mkdir -p "${OUT:-benchmarks/results}"
args=()
if [ -n "${OUT:-}" ]; then args+=(--out "$OUT/gpu.json"); fi
python3 benchmarks/gpu_suite.py "${args[@]}" "$@" 2>&1 | tee "${OUT:-benchmarks/results}/gpu.log"
