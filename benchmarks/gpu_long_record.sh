#!/usr/bin/env bash
# The longest-sequence record on one GPU: Llama-3.1-8B shape + LoRA r=16, one training step
# at LENGTH tokens (default 512K) with the --alst recipe + Liger + FlashAttention, sized by two probes
# (benchmarks/long_context.py --record). A step at 512K takes over 10 minutes (attention is quadratic),
# longer than one GPU call, so this is started detached and polled:
#
#   setsid bash benchmarks/gpu_long_record.sh /tmp/lc > /dev/null 2>&1 < /dev/null &   # call 1
#   bash benchmarks/gpu_long_record.sh --wait /tmp/lc                                  # later calls
#
# Logs and the table land in the given folder (record.log, record.jsonl, record.md, DONE when over).
# KEEP_GIB=48 PROBE=0: the 512K record's settings (a given keep budget, no probes); without KEEP_GIB two
# probes plan it (their linear fit under-predicted 512K once: 2026-11-29-long-context-h200.md).
set -uo pipefail
if [ "${1:-}" = --wait ]; then  # poll until DONE or ~9.5 minutes, then show what there is
  dir=$2; for _ in $(seq 570); do [ -f "$dir/DONE" ] && break; sleep 1; done
  tail -n 5 "$dir/record.log"; cat "$dir/record.md" 2>/dev/null; nvidia-smi --query-gpu=memory.used --format=csv
  exit 0
fi
dir=${1:-/tmp/lc}; mkdir -p "$dir"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$dir/gpu.txt" 2>&1
free -g > "$dir/host.txt" 2>&1
# --lora-kernels: the adapters' low-rank path in bf16 inside fused Functions, so no fp32 copy of each
# projection's input is saved (8 of the ~16 hidden-size vectors a token that peft's LoRA saves per block)
for flags in "--alst --liger --lora-kernels --attn flash" "--alst --lora-kernels --attn flash"; do
  python benchmarks/long_context.py --record "${LENGTH:-524288}" --flags="$flags" --gpu-gib "${GPU_GIB:-128}" \
    --host-gib "${HOST_GIB:-80}" ${KEEP_GIB:+--keep-gib "$KEEP_GIB"} ${PROBE:+--probe "$PROBE"} --logs "$dir/record.jsonl" \
    --out "$dir/record.md" >> "$dir/record.log" 2>&1
  tail -n 1 "$dir/record.jsonl" 2>/dev/null | grep -q '"status": "\(ok\|oom\)"' && break  # else: retry the next flags
done
touch "$dir/DONE"
