#!/usr/bin/env bash
# GPU checks for packing + attention (on a CUDA machine with requirements-gpu.txt installed):
# bf16 parity tests, the attention kernel table, and train.py end to end.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
python -m pytest -q -m gpu tests/test_attention.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
python benchmarks/attention.py --seq-lens 4096 8192 16384 --out "$OUT/attention.md" 2>&1 | tail -22
common="--model llama3.2-1b --seq-len 4096 --max-steps 30 --log-every 10 --eval-exact-match 16 --lr 1e-4 --warmup-steps 5"
for attn in flash flex sdpa; do
  python train.py $common --packing --micro-batch-size 2 --attn $attn --output-dir "$OUT/runs/packed-$attn" 2>&1 | tail -4
done
python train.py $common --micro-batch-size 64 --attn sdpa --output-dir "$OUT/runs/padded-sdpa" 2>&1 | tail -4
python benchmarks/e2e_table.py "$OUT"/runs/* | tee "$OUT/e2e.md"
cp "$OUT"/runs/packed-flash/metrics.jsonl "$OUT/metrics-packed-flash.jsonl" 2>/dev/null
rm -rf "$OUT"/runs/*/final "$OUT"/runs/*/checkpoints
tar -C "$OUT" -czf "$OUT/runs.tgz" runs && rm -rf "$OUT/runs"
