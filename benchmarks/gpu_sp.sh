#!/usr/bin/env bash
# Sequence parallelism on a multi-GPU machine (issues 6 and 12), for the lead to run on nvidia-h100-x2/x4/x8
# (or h200) after staging the wheels:  bash benchmarks/gpu_sp.sh      (BUDGET_S=420 for the long-context search)
#  1. tests/test_sequence_parallel.py -m gpu: 2 GPUs with --cp 2 (Ulysses on sdpa / flash / flex, ring) vs 1 GPU
#  2. benchmarks/sequence_parallel.py: the longest one-document sequence that trains on all GPUs (8B shape, LoRA)
# Logs go to $OUT; the last thing printed is the Markdown table.
set -uo pipefail
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:${PYTHONPATH:-}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # NVLink multicast stays off
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OUT=${OUT:-/tmp/sp-out}; mkdir -p "$OUT"
GPUS=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.txt"
python -m pytest -q -s -m gpu tests/test_sequence_parallel.py > "$OUT/sp-tests.log" 2>&1
tests_rc=$?
grep -E "GPUs: losses|passed|failed|skipped|Error" "$OUT/sp-tests.log" | tail -12
python benchmarks/sequence_parallel.py --gpus "$GPUS" --budget-s "${BUDGET_S:-420}" --out "$OUT/sp-long-context.md" \
  --logs "$OUT/sp-long-context.jsonl" ${SP_ARGS:-} > "$OUT/sp-long-context.log" 2>&1
echo
echo "GPU tests (2 GPUs vs 1): exit $tests_rc (0 = all passed), log: sp-tests.log"
cat "$OUT/sp-long-context.md"
