#!/usr/bin/env bash
# QLoRA leanest row again, with the peak measured from the first training step (GPU machine).
set -uo pipefail
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
lean="--attn flash --lora-kernels --ac full --loss chunked --loss-chunk 1024"
python benchmarks/lora.py --skip-peer --qlora --model llama3-8b --seq-len 4096 --steps 20 --out "$OUT/lean-qlora.md" \
  --rows "$lean" "--attn flash --lora-kernels" 2>&1 | grep "^|"
