#!/usr/bin/env bash
# Performance tables of 2026-11-25 (GPU machine, after staging wheels): part 1 = full fine-tuning of the
# 1B shape and the leanest LoRA/QLoRA rows; part 2 = real-length documents.
#   bash benchmarks/gpu_perf.sh 1 ; bash benchmarks/gpu_perf.sh 2
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
lean="--attn flash --lora-kernels --ac full --offload cpu --offload-embeddings --loss chunked"
if [ "${1:-1}" = 1 ]; then
  python benchmarks/lora.py --full --model llama3.2-1b --seq-len 4096 --steps 20 --out "$OUT/full-1b.md" \
    --peer-rows "--liger --micro-batch-size 4" \
    --rows "--attn flash --compile --micro-batch-size 4 --loss cce" "--attn flash --compile --micro-batch-size 8 --loss cce" \
           "--attn flash --compile --micro-batch-size 4 --loss liger" 2>&1 | grep "^|"
  python benchmarks/lora.py --skip-peer --model llama3-8b --seq-len 4096 --steps 20 --out "$OUT/lean-lora.md" \
    --rows "$lean --loss-chunk 256" 2>&1 | grep "^| nanotune"
  python benchmarks/lora.py --skip-peer --qlora --model llama3-8b --seq-len 4096 --steps 20 --out "$OUT/lean-qlora.md" \
    --rows "$lean --loss-chunk 256" 2>&1 | grep "^| nanotune"
else
  python benchmarks/real_length.py --model llama3-8b --steps 20 --out "$OUT/real-length.md" 2>&1 | grep -E "^(\||documents)"
fi
