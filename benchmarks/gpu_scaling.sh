#!/usr/bin/env bash
# Issue 11 on a multi-GPU H200 box (nvidia-h200-x2 / x4 / x8): benchmarks/scaling.py, strategies x
# world sizes 1, 2, ... N (every GPU) on the Llama-3.1-8B shape, seq 4096, one global batch of 8
# sequences, 8 steps; the Markdown table is printed last and written to $OUT. The requirements first
# (requirements.txt, requirements-gpu.txt); this script installs nothing. One call per row
# selection, each inside one 10-minute call (BUDGET_S=540 of runs; the 1-GPU baselines are reused from
# $LOGS by later calls on the same warm machine):
#
#   ROWS=fsdp-gathered-full,fsdp-full,peer-full bash benchmarks/gpu_scaling.sh   # call 1 (the >= 90% goal row)
#   ROWS=fsdp-gathered-compiled,hsdp-full bash benchmarks/gpu_scaling.sh        # call 2
#   (the rest, in order: benchmarks/scaling.py's docstring)
#   WORLDS=1,2 ROWS=zero3-full,tp-lora bash benchmarks/gpu_scaling.sh --steps 6   # a 2-GPU box
#
# Extra arguments go to scaling.py (e.g. --extra="--attn flash" --steps 6). Folder $OUT: scaling-*.md
# (the table), scaling.log (plan, progress, table), logs/ (every run's log, command and metrics).
set -uo pipefail
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # NVLink multicast stays off
OUT=${OUT:-/tmp/gpu_scaling}
LOGS=${LOGS:-/tmp/scaling_logs}
ROWS=${ROWS:-fsdp-full,fsdp-lora}
mkdir -p "$OUT" "$LOGS"
md="$OUT/scaling-$(date +%F)-${ROWS//,/_}.md"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpus.txt" 2>&1
worlds=()
[ -n "${WORLDS:-}" ] && worlds=(--worlds "$WORLDS")
python benchmarks/scaling.py --model "${MODEL:-llama3-8b}" --seq-len "${SEQ_LEN:-4096}" --rows "$ROWS" \
  "${worlds[@]}" --budget-s "${BUDGET_S:-540}" --logs "$LOGS" \
  --out "$md" "$@" 2>&1 | tee "$OUT/scaling.log" | grep -v '^|'
status=${PIPESTATUS[0]}
mkdir -p "$OUT/logs"
for f in "$LOGS"/*.log "$LOGS"/*.cmd; do [ -f "$f" ] && cp "$f" "$OUT/logs/"; done
for d in "$LOGS"/*/; do
  [ -f "$d/metrics.jsonl" ] && mkdir -p "$OUT/logs/$(basename "$d")" && cp "$d"/metrics.jsonl "$d"/run.json "$OUT/logs/$(basename "$d")/" 2>/dev/null
done
echo "scaling.py exit $status"
cat "$md" 2>/dev/null   # the table, last
