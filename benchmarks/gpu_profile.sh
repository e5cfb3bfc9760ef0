#!/usr/bin/env bash
# Profile the 8B-shape LoRA step (GPU machine, after staging wheels): one train.py run per row, steps
# 5-6 under torch.profiler (kernel time by category), then steps 8-14 timed without it.
#   bash benchmarks/gpu_profile.sh "--attn flash --lora-kernels" "--attn flash --lora-kernels --compile"
# Several GPUs (torchrun; NCCL kernels are counted apart, exposed communication too), full fine-tune:
#   NPROC=2 ADAPTER= GA=4 bash benchmarks/gpu_profile.sh "--fsdp" "--fsdp --tp 2"
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
MODEL=${MODEL:-llama3-8b}; SEQ=${SEQ:-4096}; MBS=${MBS:-1}; ADAPTER=${ADAPTER---lora}; GA=${GA:-1}; NPROC=${NPROC:-1}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # NVLink multicast stays off
launch=(python); [ "$NPROC" -gt 1 ] && launch=(torchrun --standalone --nproc_per_node "$NPROC")
rank=(); [ -n "$ADAPTER" ] && rank=(--lora-rank 16)
tmp=$(mktemp -d)   # private: two of these may run side by side, one per GPU
data=$tmp/random.jsonl
python -c "import sys; sys.path.insert(0, 'benchmarks'); from lora import random_text; from pathlib import Path; random_text(Path('$data'), 60 * $GA, $SEQ * $MBS + 64)"
i=0
for row in "$@"; do
  i=$((i+1)); run=$tmp/run$i
  "${launch[@]}" benchmarks/profile_step.py --out "$OUT/profile$i.md" -- --model $MODEL $ADAPTER "${rank[@]}" --precision bf16 \
    --seq-len $SEQ --micro-batch-size $MBS --grad-accum $GA --dataset $data --dataset-format pretrain --val-dataset none --eval-exact-match 0 \
    --max-steps 14 --log-every 7 --warmup-steps 0 --lr 1e-4 --skip-export --output-dir $run $row > "$OUT/run$i.log" 2>&1
  echo "== row $i: $ADAPTER $row (exit $?)"
  grep -E "^per step|^\| (matmul|attention|elementwise|copy|triton|communication|idle)" "$OUT/profile$i.md" 2>/dev/null || tail -5 "$OUT/run$i.log"
  sed -n '/^Where the GPU waited/,$p' "$OUT/profile$i.md" 2>/dev/null | head -8
  python -c "import json; m=[json.loads(l) for l in open('$run/metrics.jsonl')][-1]; print(f\"tokens/s {m['tokens_per_s']:,.0f}  mfu {100*m['mfu']:.1f}%  peak {m['peak_mem_gib']:.1f} GiB  loss {m['loss']:.3f}  grad_norm {m['grad_norm']:.3f}\")" 2>/dev/null
done
