#!/usr/bin/env bash
# Quantization on a GPU (torchao 0.18 installed for --fp8):
#   1. GPU tests: FP8 loss parity with bf16 (tensorwise, rowwise, one-rank FSDP2 with FP8 all-gather;
#      curves printed), QAT on CUDA, LoRA on a GPTQ checkpoint in bf16.
#   2. benchmarks/fp8.py: bf16 vs FP8 tokens/s, full fine-tune of a Llama-3-8B-shaped stack of
#      $LAYERS blocks (default 8 of 32: fits one H100 with AdamW), loss curves side by side.
#   bash benchmarks/gpu_quant.sh            # OUT=/tmp/out, LAYERS=8, SEQ=4096, MBS=2, STEPS=60
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
LAYERS=${LAYERS:-8}; SEQ=${SEQ:-4096}; MBS=${MBS:-2}; STEPS=${STEPS:-60}; EXTRA=${EXTRA:---attn flash}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, torchao, transformers; print('torch', torch.__version__, 'torchao', torchao.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
python -m pytest -q -s -m gpu tests/test_fp8.py tests/test_qat.py tests/test_gptq.py > "$OUT/gpu_tests.txt" 2>&1
grep -E "^(bf16|fp8)|passed|failed|error" "$OUT/gpu_tests.txt" | tail -12
python benchmarks/fp8.py --layers "$LAYERS" --seq-len "$SEQ" --micro-batch-size "$MBS" --steps "$STEPS" \
  --extra "$EXTRA" --out "$OUT/fp8-runs" > "$OUT/fp8.md" 2> "$OUT/fp8.err"
rm -rf "$OUT"/fp8-runs/*/checkpoints
cat "$OUT/fp8.md"
