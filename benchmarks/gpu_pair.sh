#!/usr/bin/env bash
# Issues 7 and 8 on a two-GPU box (nvidia-h200-x2, after staging wheels): two single-GPU lanes side by
# side, one per GPU, so one call measures two tables. Each part fits one 600 s call (LANE_S each).
#   PART=A bash benchmarks/gpu_pair.sh   # 8B LoRA vs peer | bf16 vs FP8 tensorwise, 32 blocks
#   PART=B bash benchmarks/gpu_pair.sh   # profiles of the 8B LoRA and 1B full rows | 1B full vs peer
#   PART=C bash benchmarks/gpu_pair.sh   # real-length vs peer | QLoRA vs peer, then FP8 rowwise
#   PART=D bash benchmarks/gpu_pair.sh   # bf16/FP8 tensorwise/rowwise at micro-batch 4 | 8B LoRA loss rows, QLoRA profile
#   PART=E bash benchmarks/gpu_pair.sh   # 1B full: attention and loss variants vs peer | 8B LoRA idle gaps, autotuned GEMMs
#   PART=F LANE_S=200 bash benchmarks/gpu_pair.sh   # the compiled loss (--compile): 8B LoRA | 8B QLoRA, micro-batch 4
#   PART=G bash benchmarks/gpu_pair.sh   # 8B LoRA and QLoRA vs peer in one command | 1B full: FP8 and compiled plain loss vs peer
set -uo pipefail
OUT=${OUT:-/tmp/out}; LANE_S=${LANE_S:-520}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
fast="--attn flash --lora-kernels --compile"

lane() {  # lane GPU NAME COMMAND...: one GPU, its own log, stopped at LANE_S
  local gpu=$1 name=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu timeout -k 15 "$LANE_S" bash -c "$*" > "$OUT/$name.log" 2>&1
  echo "== $name (GPU $gpu) exit $?" >> "$OUT/$name.log"
}

case ${PART:-A} in
A)
  lane 0 lora-8b "python benchmarks/lora.py --model llama3-8b --steps 20 --out $OUT/lora-8b.md \
    --peer-rows '--liger --micro-batch-size 2' '--gradient-checkpointing --liger --micro-batch-size 2' \
    --rows '$fast --micro-batch-size 2' '$fast --micro-batch-size 4'" &
  lane 1 fp8-32 "python benchmarks/fp8.py --layers 32 --micro-batch-size 2 --steps 40 --warmup 15 \
    --rows bf16 'fp8 tensorwise' --extra '--attn flash' --out $OUT/fp8 > $OUT/fp8-32.md" &
  ;;
B)
  lane 0 profiles "OUT=$OUT/prof-8b MBS=2 bash benchmarks/gpu_profile.sh '$fast'; \
    OUT=$OUT/prof-1b MODEL=llama3.2-1b ADAPTER= MBS=8 bash benchmarks/gpu_profile.sh '--attn flash --compile --loss cce'" &
  lane 1 full-1b "python benchmarks/lora.py --full --model llama3.2-1b --steps 20 --out $OUT/full-1b.md \
    --peer-rows '--liger --micro-batch-size 4' '--liger --micro-batch-size 8' \
    --rows '--attn flash --compile --micro-batch-size 8 --loss cce' '--attn flash --compile --micro-batch-size 16 --loss cce'" &
  ;;
C)
  lane 0 real-length "python benchmarks/real_length.py --model llama3-8b --steps 20 --out $OUT/real-length.md \
    --rows '--packing $fast --micro-batch-size 2' '--packing $fast --micro-batch-size 4'" &
  lane 1 qlora-8b "python benchmarks/lora.py --qlora --model llama3-8b --steps 20 --out $OUT/qlora-8b.md \
    --peer-rows '--liger --micro-batch-size 2 --no-kbit-prep' --rows '$fast --micro-batch-size 2'; \
    python benchmarks/fp8.py --layers 32 --micro-batch-size 2 --steps 40 --warmup 15 \
    --rows 'fp8 rowwise' --extra '--attn flash' --out $OUT/fp8r > $OUT/fp8-32-rowwise.md" &
  ;;
D)
  lane 0 fp8-32-mbs4 "python benchmarks/fp8.py --layers 32 --micro-batch-size 4 --steps 30 --warmup 12 \
    --rows bf16 'fp8 tensorwise' 'fp8 rowwise' --extra '--attn flash' --out $OUT/fp8 > $OUT/fp8-32-mbs4.md" &
  lane 1 lora-8b-loss "python benchmarks/lora.py --skip-peer --model llama3-8b --steps 20 --out $OUT/lora-8b-loss.md \
    --rows '$fast --micro-batch-size 4 --loss chunked' '$fast --micro-batch-size 4 --loss cce'; \
    OUT=$OUT/prof-qlora MBS=2 ADAPTER=--qlora bash benchmarks/gpu_profile.sh '$fast'" &
  ;;
E)
  lane 0 full-1b-variants "python benchmarks/lora.py --full --model llama3.2-1b --steps 20 --out $OUT/full-1b-variants.md \
    --peer-rows '--liger --micro-batch-size 8' --rows '--attn flash --compile --micro-batch-size 16 --loss cce' \
    '--attn sdpa --compile --micro-batch-size 16 --loss cce' '--attn flash --compile --micro-batch-size 16 --loss chunked'" &
  lane 1 lora-8b-gaps "OUT=$OUT/prof-8b MBS=4 bash benchmarks/gpu_profile.sh '$fast'; \
    python benchmarks/lora.py --skip-peer --model llama3-8b --steps 20 --out $OUT/lora-8b-autotune.md \
    --rows '$fast --micro-batch-size 4 --compile-mode max-autotune-no-cudagraphs'" &
  ;;
F)
  lane 0 lora-8b-ce "python benchmarks/lora.py --skip-peer --model llama3-8b --steps 20 --out $OUT/lora-8b-ce.md \
    --rows '$fast --micro-batch-size 4'" &
  lane 1 qlora-8b-ce "python benchmarks/lora.py --skip-peer --qlora --model llama3-8b --steps 20 --out $OUT/qlora-8b-ce.md \
    --rows '$fast --micro-batch-size 4'" &
  ;;
G)
  lane 0 lora-qlora-8b "python benchmarks/lora.py --model llama3-8b --steps 20 --out $OUT/lora-8b.md \
    --peer-rows '--liger --micro-batch-size 2' --rows '$fast --micro-batch-size 4'; \
    python benchmarks/lora.py --qlora --model llama3-8b --steps 20 --out $OUT/qlora-8b.md \
    --peer-rows '--liger --micro-batch-size 2 --no-kbit-prep' --rows '$fast --micro-batch-size 4'" &
  lane 1 full-1b-fp8 "python benchmarks/lora.py --full --model llama3.2-1b --steps 20 --out $OUT/full-1b-fp8.md \
    --peer-rows '--liger --micro-batch-size 8' --rows '--attn flash --compile --micro-batch-size 16 --loss cce' \
    '--attn flash --compile --micro-batch-size 16 --loss cce --fp8 tensorwise' \
    '--attn flash --compile --micro-batch-size 16'" &
  ;;
esac
wait
for f in "$OUT"/*.md "$OUT"/prof-*/profile*.md; do [ -f "$f" ] && { echo "## $f"; cat "$f"; }; done
grep -h "^== \|^tokens/s\|Error\|error" "$OUT"/*.log "$OUT"/prof-*/*.log 2>/dev/null | tail -40
tar -czf "$OUT/logs-${PART:-A}.tgz" -C "$OUT" --exclude='*.tgz' . 2>/dev/null
