#!/usr/bin/env bash
# Issue 5 on one H100 (after staging wheels to /tmp/site): the GPU tests of the memory features, then the
# longest trainable sequence, Llama-3.1-8B shape + LoRA r=16, peer vs nanotune one feature at a time.
# Whole script < 10 minutes: tests under 150 s, the search under $BUDGET s (default 380). Table printed last.
# SKIP_TESTS=1 BUDGET=540 gives the search the whole 10 minutes; extra arguments go to long_context.py.
set -uo pipefail
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/long_context_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout 150 python -m pytest -q -m gpu tests/test_offload.py tests/test_fused_loss.py tests/test_liger.py \
    > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests (rc $?): $(tail -1 "$OUT/gpu_tests.log")"
fi
python benchmarks/long_context.py --budget-s "${BUDGET:-380}" --logs "$OUT/long_context.jsonl" \
  --out "$OUT/long_context.md" "$@" > "$OUT/long_context.log" 2>&1
echo "long_context.py rc $?"
cat "$OUT/long_context.md" 2>/dev/null || tail -20 "$OUT/long_context.log"
