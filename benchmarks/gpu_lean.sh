#!/usr/bin/env bash
# Leanest-memory LoRA / QLoRA rows on the 8B shape (GPU machine, after staging wheels).
set -uo pipefail
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
lean="--attn flash --lora-kernels --ac full --loss chunked --loss-chunk 1024"
python benchmarks/lora.py --skip-peer --model llama3-8b --seq-len 4096 --steps 20 --out "$OUT/lean-lora.md" \
  --rows "$lean" 2>&1 | grep "^|"
python benchmarks/lora.py --skip-peer --qlora --model llama3-8b --seq-len 4096 --steps 20 --out "$OUT/lean-qlora.md" \
  --rows "$lean" 2>&1 | grep "^|"
