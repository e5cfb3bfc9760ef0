#!/usr/bin/env bash
# The longest sequence that trains on one GPU: Llama-3.1-8B shape (llama3-8b preset, random weights) +
# LoRA r=16, micro-batch 1, one full-length row. One CUDA GPU, requirements.txt and requirements-gpu.txt
# installed. Output under $OUT (default /tmp/out).
#
#   bash benchmarks/gpu_long_context.sh SUB-COMMAND [ARGS...]   e.g. bash benchmarks/gpu_long_context.sh search
#
#   search [ARGS]  the GPU tests of the memory features (CPU offload, fused losses, Liger; at most 150 s,
#                  SKIP_TESTS=1 skips them), then the longest trainable length, the baseline vs nanotune
#                  adding one memory feature a row (long_context.py, under BUDGET seconds, default 380);
#                  ARGS go to long_context.py. Table: $OUT/long_context.md, printed last.
#   record [DIR]   one training step at LENGTH tokens (default 524288) with --alst + --liger +
#                  --lora-kernels + --attn flash (without --liger if that fails for another reason than
#                  memory), sized by two probes (long_context.py --record); GPU_GIB (128) and HOST_GIB (80)
#                  bound the plan; KEEP_GIB sets the block inputs kept on the GPU and PROBE=0 skips the
#                  probes. A step at these lengths runs for many minutes (attention is quadratic), so start
#                  it detached and poll it:
#                    setsid bash benchmarks/gpu_long_context.sh record /tmp/lc > /dev/null 2>&1 < /dev/null &
#                    bash benchmarks/gpu_long_context.sh wait /tmp/lc
#                  DIR (default /tmp/lc): record.log, record.jsonl, record.md (the table), gpu.txt,
#                  host.txt, DONE when over.
#   wait [DIR]     poll a detached record until DONE or about 9.5 minutes, print its progress and table,
#                  and copy DIR to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
sub=${1:-}; shift || true

case $sub in
search)
  mkdir -p "$OUT"
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
  ;;
record)
  dir=${1:-/tmp/lc}; mkdir -p "$dir"; rm -f "$dir/DONE"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$dir/gpu.txt" 2>&1
  free -g > "$dir/host.txt" 2>&1
  # --lora-kernels: the adapters' low-rank path in bf16 inside fused Functions, so no fp32 copy of each
  # projection's input is saved (8 of the ~16 hidden-size vectors a token that peft's LoRA saves per block)
  for flags in "--alst --liger --lora-kernels --attn flash" "--alst --lora-kernels --attn flash"; do
    python benchmarks/long_context.py --record "${LENGTH:-524288}" --flags="$flags" --gpu-gib "${GPU_GIB:-128}" \
      --host-gib "${HOST_GIB:-80}" ${KEEP_GIB:+--keep-gib "$KEEP_GIB"} ${PROBE:+--probe "$PROBE"} --logs "$dir/record.jsonl" \
      --out "$dir/record.md" >> "$dir/record.log" 2>&1
    tail -n 1 "$dir/record.jsonl" 2>/dev/null | grep -q '"status": "\(ok\|oom\)"' && break  # else: the next flags
  done
  touch "$dir/DONE"
  ;;
wait)
  dir=${1:-/tmp/lc}
  for _ in $(seq 570); do [ -f "$dir/DONE" ] && break; sleep 1; done
  tail -n 5 "$dir/record.log"; cat "$dir/record.md" 2>/dev/null
  [ -f "$dir/DONE" ] && echo "DONE" || echo "still running"
  nvidia-smi --query-gpu=memory.used --format=csv
  if [ "$(realpath -m "$dir")" != "$(realpath -m "$OUT")" ]; then mkdir -p "$OUT" && cp -r "$dir"/. "$OUT"/ 2>/dev/null; fi
  ;;
*)
  sed -n '2,/^set -uo/p' "$0" | grep '^#' | cut -c3-
  exit 2
  ;;
esac
