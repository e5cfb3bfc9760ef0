#!/usr/bin/env bash
# Issue 12 on the largest multi-GPU H200 kind lent (nvidia-h200-x2 / x4 / x8), N = every GPU it has:
#  1. tests/test_sequence_parallel.py -m gpu: train.py with --cp N, Ulysses (sdpa fp32, flash bf16, flex
#     bf16) and ring (fp32, bf16) on packed rows of the embedded data == one GPU on the same documents,
#     3 steps + validation (fp32: 1e-4 relative, bf16: 2e-2).                 (TESTS_S, default 420 s)
#  2. benchmarks/sequence_parallel.py: the longest one-document sequence that trains in one step,
#     Llama-3.1-8B shape + LoRA r=16, --alst --cp N --fsdp: Ulysses with --attn flash (FlashAttention-4)
#     + --liger (80% of BUDGET_S), then ring (20%). Each try predicts its time from the last one
#     (quadratic) or, first, from one H200's 633 s at 512K / N, and is not started if it cannot end in
#     the row's share; --offload-keep-gib is planned per try so pinned host memory fits the RAM / N.
# A step at these lengths outlasts one 10-minute call, so the script runs detached (setsid) and is
# polled, as benchmarks/gpu_long_record.sh. Install the
# requirements first. Then, the same on 2, 4 or 8 GPUs (the script counts them):
#
#   call 1:  setsid bash benchmarks/gpu_sp.sh /tmp/sp > /dev/null 2>&1 < /dev/null & sleep 5; bash benchmarks/gpu_sp.sh --wait /tmp/sp
#   call 2+: bash benchmarks/gpu_sp.sh --wait /tmp/sp
#
# --wait polls until DONE or ~9.5 minutes, prints the progress and copies the folder to $OUT (it comes
# back with the call). Default budget: tests <= 7 min + search 15 min (BUDGET_S=900) + start-ups: about
# 23 minutes in all. TESTS_S=0 skips the tests;
# SP_ARGS passes flags to sequence_parallel.py (e.g. "--rows ulysses"). Folder: sp-tests.log, sp.md (the
# table), sp.jsonl (every try), sp.log, runs/<try>/{cmd.txt,log.txt,out/}, gpus.txt, host.txt, DONE.
set -uo pipefail
if [ "${1:-}" = --wait ]; then
  dir=$2; for _ in $(seq 570); do [ -f "$dir/DONE" ] && break; sleep 1; done
  grep -hE "GPUs: losses|passed|failed|error" "$dir/sp-tests.log" 2>/dev/null | tail -12
  tail -n 4 "$dir/sp.jsonl" 2>/dev/null | cut -c1-400; cat "$dir/sp.md" 2>/dev/null
  [ -f "$dir/DONE" ] && echo "DONE" || echo "still running"
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader; free -g | head -2
  if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && cp -r "$dir"/. "$OUT"/ 2>/dev/null; fi
  exit 0
fi
dir=${1:-/tmp/sp}; mkdir -p "$dir"; rm -f "$dir/DONE"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # NVLink multicast stays off
GPUS=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$dir/gpus.txt" 2>&1
free -g > "$dir/host.txt" 2>&1
if [ "${TESTS_S:-420}" != 0 ]; then
  # its own process group, so that running out of time also ends the torchrun workers it started
  setsid python -m pytest -q -s -m gpu tests/test_sequence_parallel.py > "$dir/sp-tests.log" 2>&1 &
  pid=$!; (sleep "${TESTS_S:-420}"; kill -TERM -- "-$pid" 2>/dev/null; sleep 20; kill -KILL -- "-$pid" 2>/dev/null) &
  watcher=$!; wait "$pid"; rc=$?; kill "$watcher" 2>/dev/null
  echo "GPU tests ($GPUS GPUs vs 1): exit $rc (0 = all passed, 143 = out of time)" >> "$dir/sp-tests.log"
fi
python benchmarks/sequence_parallel.py --gpus "$GPUS" --budget-s "${BUDGET_S:-900}" --out "$dir/sp.md" \
  --logs "$dir/sp.jsonl" --keep-runs "$dir/runs" ${SP_ARGS:-} > "$dir/sp.log" 2>&1
echo "sequence_parallel.py exit $?" >> "$dir/sp.log"
touch "$dir/DONE"
