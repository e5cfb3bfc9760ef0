#!/usr/bin/env bash
# GPU re-check after the flex fix: GPU-marked tests (attention, LoRA, fused LoRA kernels) and
# train.py end to end with packing on llama3.2-1b for flash and flex (run after staging wheels).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/runs"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
python -m pytest -q -m gpu tests/test_attention.py tests/test_lora.py tests/test_lora_kernels.py -p no:warnings 2>&1 | tail -6 | tee "$OUT/gpu_tests.txt"
common="--model llama3.2-1b --seq-len 4096 --max-steps 30 --log-every 10 --eval-exact-match 16 --lr 1e-4 --warmup-steps 5 --skip-export"
for attn in flash flex; do
  python train.py $common --packing --micro-batch-size 2 --attn $attn --output-dir "$OUT/runs/packed-$attn" > "$OUT/runs/packed-$attn.log" 2>&1
  tail -3 "$OUT/runs/packed-$attn.log"
done
python benchmarks/e2e_table.py "$OUT"/runs/packed-* | tee "$OUT/e2e.md"
tar -C "$OUT" -czf "$OUT/runs.tgz" runs && rm -rf "$OUT/runs"
