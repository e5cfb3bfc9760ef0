#!/usr/bin/env bash
# Single-GPU throughput and memory: nanotune rows beside the Hugging Face Trainer + peft baseline
# (benchmarks/README.md), each row its own process on the same GPU. One CUDA GPU, requirements.txt and
# requirements-gpu.txt installed. Tables, logs and run folders go under $OUT (default /tmp/out).
#
#   bash benchmarks/gpu_speed.sh SUB-COMMAND [ARGS...]        e.g. bash benchmarks/gpu_speed.sh lora
#
# Shapes: "8B" is the llama3-8b preset, "1B" llama3.2-1b (random weights), seq 4096; "fast" below is
# --attn flash --lora-kernels --compile.
#   defaults       the three tables below in a row: one command per shape, each row its own process (defaults.py);
#                  Unsloth's rows need unsloth installed
#   defaults-lora  8B LoRA: the baseline at its best micro-batch (4), Unsloth, no tuning flag, --fp8-base
#   defaults-qlora 8B QLoRA: the baseline at micro-batch 2, Unsloth, the headline command line, the headline
#                  with --fp8-base
#   defaults-full  1B full fine-tune: the baseline at micro-batch 8, no tuning flag, and FP8 + CCE at 8 x 1 with
#                  adamw-sr (the baseline's memory or less), with fp32 masters, and with adamw-sr at 16 x 1
#   small DIR      small-lora DIR and small-full DIR in a row: a small real checkpoint (DIR, Hugging Face format)
#                  on chats of instruction-tuning lengths (defaults.py --lengths instruction), LoRA or a full
#                  fine-tune: the baseline padded and padding-free at micro-batch 16 and 32, each with and
#                  without SDPA's cuDNN backend (slow on new lengths), beside nanotune with no tuning flag (LoRA
#                  under 0.75B parameters: CUDA graphs) and with --compile-mode default; first the compile GPU tests
#   graphs DIR     CUDA graphs by model size (the rule behind --compile-mode auto): LoRA with no tuning flag beside
#                  --compile-mode reduce-overhead and --compile-mode default, on DIR (a small real checkpoint) and
#                  random shapes of 360M and 0.5B parameters built with DIR's tokenizer (random_shape.py), on
#                  chats of instruction-tuning lengths; then the 1B and 3B presets, LoRA, on 4,096-token chats
#   lora           8B LoRA: fast at micro-batch 2 and 4 vs the baseline with Liger, with and without
#                  gradient checkpointing (lora.py)
#   qlora          8B QLoRA: fast at micro-batch 2 and 4 vs the baseline with Liger, no kbit preparation
#   lora-variants  8B LoRA, fast at micro-batch 4, nanotune rows only: the loss (chunked, cce, ce) and
#                  max-autotune GEMMs (--compile-mode max-autotune-no-cudagraphs)
#   full           1B full fine-tune vs the baseline with Liger at micro-batch 4 and 8: flash + compile at
#                  micro-batch 4, 8, 16 with the cce loss, and at 4 with the liger loss
#   full-variants  1B full fine-tune at micro-batch 16 vs the baseline at 8: sdpa vs flash attention, the
#                  loss (cce, chunked, the default), FP8 tensorwise
#   lean           the least memory for 8B LoRA and QLoRA (nanotune rows only): flash + LoRA kernels + full
#                  activation checkpointing + chunked loss, then with CPU offload of activations and
#                  embeddings; QLoRA also without checkpointing
#   real-length    real-length instruction documents, real tokens only: 8B LoRA packed at micro-batch 2 and
#                  4 vs the baseline padded, length-grouped and padding-free (real_length.py)
#   attention      packing + attention: GPU tests (attention, LoRA, LoRA kernels), attention kernels per
#                  backend at 4K/8K/16K (attention.py), and train.py end to end on 1B, packed with flash,
#                  flex and sdpa vs padded sdpa (e2e_table.py; runs in $OUT/runs.tgz)
#   fp8            bf16 vs FP8 tensorwise vs FP8 rowwise, full fine-tune of the 8B shape's 32 blocks, at
#                  micro-batch 2 and 4 (fp8.py)
#   fp8-base [DIR] --fp8-base under LoRA: 8B speed beside the bf16 base and the baseline (fp8_base.py
#                  speed), then, given DIR (a real checkpoint in Hugging Face format), its 200-step LoRA
#                  loss curve with and without --fp8-base (fp8_base.py curve): on the demo data, then on
#                  docstrings for LoRA and for QLoRA (the NF4 base against the NF4 base in FP8)
#   quant          GPU tests (FP8 loss parity incl. one-rank FSDP2 with FP8 all-gather, QAT on CUDA, LoRA on
#                  a GPTQ checkpoint), then bf16 vs FP8 on a stack of LAYERS blocks (default 8; SEQ 4096,
#                  MBS 2, STEPS 60, EXTRA "--attn flash")
#   fp8-parity     how far FP8's 1B loss curve lies from bf16's beside how far bf16's own curve moves with
#                  the optimizer's precision or eager kernels: test_fp8's run (40 steps, seq 1024, 4 x 4) at
#                  lr 3e-4 and 1e-4, plain bf16 / bf16-mixed / adamw-sr, each with and without --fp8
#                  tensorwise, three runs at a time; losses every 5 steps in $OUT/fp8-parity.txt
#   profile [ROW...]  where a step's GPU time goes (profile_step.py): one train.py run per ROW (its flags),
#                  steps 5-6 under torch.profiler (kernel time by category, idle gaps), steps 8-14 timed
#                  without it; MODEL (llama3-8b), SEQ (4096), MBS (1), ADAPTER (--lora; --qlora; empty: full
#                  fine-tune), GA (1), NPROC (1; more: torchrun over that many GPUs, NCCL time apart).
#                  No ROW: the fastest rows of the defaults tables, 8B LoRA and QLoRA with --fp8-base at
#                  2 x 4, 1B full with adamw-sr, CCE and FP8 at 8 x 1.
# ARGS of the defaults sub-commands, lora, qlora, lora-variants, full, full-variants, lean and real-length go
# to each harness call (a later --rows, --peer-rows or --steps wins over the driver's), e.g.
#   bash benchmarks/gpu_speed.sh lora --steps 10
#   MBS=2 bash benchmarks/gpu_speed.sh profile "--attn flash --lora-kernels --compile"
#   NPROC=2 ADAPTER= GA=4 bash benchmarks/gpu_speed.sh profile "--fsdp" "--fsdp --tp 2"
# Two sub-commands run side by side on two GPUs with CUDA_VISIBLE_DEVICES and their own OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
fast="--attn flash --lora-kernels --compile"
sub=${1:-}; shift || true
case " defaults defaults-lora defaults-qlora defaults-full small small-lora small-full graphs lora qlora lora-variants full full-variants lean real-length attention fp8 fp8-base quant fp8-parity profile " in
  *" $sub "*) ;;
  *) sed -n '2,/^set -uo/p' "$0" | grep '^#' | cut -c3-; exit 2 ;;
esac
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  >> "$OUT/gpu.txt" 2>&1

if [[ $sub == small* ]]; then   # small, small-lora, small-full: DIR first
  small_dir=${1:?$sub: give a checkpoint directory}; shift
  small_rows="--rows baseline defaults --lengths instruction --samples 3000 --baseline-micro-batch 16 32"
  set -- --baseline-with "--micro-batch-size 16 --no-cudnn-sdpa" "--micro-batch-size 32 --no-cudnn-sdpa" \
    "--micro-batch-size 16 --padding-free" "--micro-batch-size 32 --padding-free" \
    "--micro-batch-size 16 --padding-free --no-cudnn-sdpa" "--micro-batch-size 32 --padding-free --no-cudnn-sdpa" \
    --defaults-with " --compile-mode default" "$@"
  python -m pytest -q -m gpu tests/test_compile.py -p no:warnings 2>&1 | tail -3 | tee "$OUT/gpu_tests.txt"
fi

table() {  # NAME COMMAND...: output in $OUT/NAME.log, then the table $OUT/NAME.md (or the log's tail)
  local name=$1; shift
  rm -f "$OUT/$name.md"
  "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: exit $?"
  cat "$OUT/$name.md" 2>/dev/null || tail -n 20 "$OUT/$name.log"
}

fp8_parity() {  # the fp8-parity runs, three at a time (two bf16-mixed runs beside a third fill an 80 GB card)
  local base="--model llama3.2-1b --packing --seq-len 1024 --micro-batch-size 4 --max-steps 40 --log-every 5
    --val-dataset none --skip-export"
  local hi="--compile --lr 3e-4 --warmup-steps 5" lo="--compile --lr 1e-4 --warmup-steps 10"
  local runs=("bf16|--precision bf16 $hi" "mixed|--precision bf16-mixed $hi" "sr|--precision bf16 --optimizer adamw-sr $hi"
    "fp8|--precision bf16 --fp8 tensorwise $hi" "fp8-mixed|--precision bf16-mixed --fp8 tensorwise $hi"
    "fp8-sr|--precision bf16 --optimizer adamw-sr --fp8 tensorwise $hi" "bf16-eager|--precision bf16 ${hi/--compile/--no-compile}"
    "mixed-eager|--precision bf16-mixed ${hi/--compile/--no-compile}" "lo|--precision bf16 $lo"
    "lo-eager|--precision bf16 ${lo/--compile/--no-compile}" "fp8-lo|--precision bf16 --fp8 tensorwise $lo"
    "mixed-lo|--precision bf16-mixed $lo")
  local i=0 run
  for run in "${runs[@]}"; do
    # shellcheck disable=SC2086  # word-split the flags
    python train.py $base ${run#*|} --output-dir "$OUT/fp8-parity/${run%%|*}" > "$OUT/fp8-parity-${run%%|*}.log" 2>&1 &
    (( ++i % 3 )) || wait
  done
  wait
  python - "$OUT/fp8-parity" "${runs[@]%%|*}" <<'PY' | tee "$OUT/fp8-parity.txt"
import json, sys
for name in sys.argv[2:]:
    try:
        records = [json.loads(line) for line in open(f"{sys.argv[1]}/{name}/metrics.jsonl")]
        print(f"{name:12s}", " ".join(f"{r['loss']:.3f}" for r in records if "loss" in r))
    except OSError:
        print(f"{name:12s} failed: see fp8-parity-{name}.log")
PY
}

profile() {  # ROW...: one profiled train.py run per ROW; MODEL SEQ MBS ADAPTER GA NPROC as above
  local model=${MODEL:-llama3-8b} seq=${SEQ:-4096} mbs=${MBS:-1} adapter=${ADAPTER---lora} ga=${GA:-1}
  local nproc=${NPROC:-1} tmp i=0 row run
  mkdir -p "$OUT"
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # NVLink multicast off
  local launch=(python); [ "$nproc" -gt 1 ] && launch=(torchrun --standalone --nproc_per_node "$nproc")
  local rank=(); [ -n "$adapter" ] && rank=(--lora-rank 16)
  tmp=$(mktemp -d)   # private: two of these may run side by side, one per GPU
  local data=$tmp/random.jsonl
  python -c "import sys; sys.path.insert(0, 'benchmarks'); from lora import random_text; from pathlib import Path; random_text(Path('$data'), 60 * $ga, $seq * $mbs + 64)"
  for row in "$@"; do
    i=$((i+1)); run=$tmp/run$i
    "${launch[@]}" benchmarks/profile_step.py --out "$OUT/profile$i.md" -- --model $model $adapter "${rank[@]}" --precision bf16 \
      --seq-len $seq --micro-batch-size $mbs --grad-accum $ga --dataset $data --dataset-format pretrain --val-dataset none --eval-exact-match 0 \
      --max-steps 14 --log-every 7 --warmup-steps 0 --lr 1e-4 --skip-export --output-dir $run $row > "$OUT/run$i.log" 2>&1
    echo "== row $i: $model $adapter micro-batch $mbs $row (exit $?)"
    grep -E "^per step|^\| (matmul|attention|fused loss|elementwise|copy|triton|communication|idle)" "$OUT/profile$i.md" 2>/dev/null || tail -5 "$OUT/run$i.log"
    sed -n '/^Where the GPU waited/,/^Idle time by gap length/p' "$OUT/profile$i.md" 2>/dev/null | grep '^|' | head -6
    sed -n '/^Idle time by gap length/,$p' "$OUT/profile$i.md" 2>/dev/null | grep '^|' | grep -v '^| gap length\|^| kernel after\|^| host op\|^|---' | head -24
    python -c "import json; m=[json.loads(l) for l in open('$run/metrics.jsonl')][-1]; print(f\"tokens/s {m['tokens_per_s']:,.0f}  mfu {100*m['mfu']:.1f}%  peak {m['peak_mem_gib']:.1f} GiB  loss {m['loss']:.3f}  grad_norm {m['grad_norm']:.3f}\")" 2>/dev/null
  done
}

case $sub in
defaults-lora|defaults)
  table defaults-lora-8b python benchmarks/defaults.py --model llama3-8b --method lora \
    --rows baseline unsloth defaults fp8-base --baseline-micro-batch 4 \
    --logs "$OUT/defaults-lora-8b" --out "$OUT/defaults-lora-8b.md" "$@"
  ;;&
defaults-qlora|defaults)
  table defaults-qlora-8b python benchmarks/defaults.py --model llama3-8b --method qlora \
    --rows baseline unsloth headline --baseline-micro-batch 2 --headline-with " --fp8-base" \
    --logs "$OUT/defaults-qlora-8b" --out "$OUT/defaults-qlora-8b.md" "$@"
  ;;&
defaults-full|defaults)
  fp8_cce="--loss cce --fp8 tensorwise --grad-accum 1"
  table defaults-full-1b python benchmarks/defaults.py --model llama3.2-1b --method full --rows baseline defaults \
    --baseline-micro-batch 8 --defaults-with "--optimizer adamw-sr $fp8_cce --micro-batch-size 8" \
    "$fp8_cce --micro-batch-size 8" "--optimizer adamw-sr $fp8_cce --micro-batch-size 16" \
    --logs "$OUT/defaults-full-1b" --out "$OUT/defaults-full-1b.md" "$@"
  ;;
small-lora|small)
  table small-lora python benchmarks/defaults.py --model "$small_dir" --method lora $small_rows \
    --logs "$OUT/small-lora" --out "$OUT/small-lora.md" "$@"
  ;;&
small-full|small)
  table small-full python benchmarks/defaults.py --model "$small_dir" --method full $small_rows \
    --logs "$OUT/small-full" --out "$OUT/small-full.md" "$@"
  ;;
graphs)
  dir=${1:?graphs: give a small checkpoint directory}; shift
  both=(--defaults-with " --compile-mode reduce-overhead" " --compile-mode default")
  weights=$(mktemp -d)   # the random checkpoints: not results
  for shape in smollm2-360m qwen2.5-0.5b; do
    python benchmarks/random_shape.py --shape $shape --tokenizer "$dir" --out "$weights/$shape"
  done
  for m in "$dir" "$weights/smollm2-360m" "$weights/qwen2.5-0.5b"; do
    name=graphs-$(basename "$m")
    table "$name" python benchmarks/defaults.py --model "$m" --method lora --rows defaults --lengths instruction \
      --samples 3000 "${both[@]}" --logs "$OUT/$name" --out "$OUT/$name.md" "$@"
  done
  for m in llama3.2-1b llama3.2-3b; do
    table graphs-$m python benchmarks/defaults.py --model $m --method lora --rows defaults "${both[@]}" \
      --logs "$OUT/graphs-$m" --out "$OUT/graphs-$m.md" "$@"
  done
  ;;
lora)
  table lora-8b python benchmarks/lora.py --model llama3-8b --steps 20 --out "$OUT/lora-8b.md" \
    --peer-rows "--liger --micro-batch-size 2" "--gradient-checkpointing --liger --micro-batch-size 2" \
    --rows "$fast --micro-batch-size 2" "$fast --micro-batch-size 4" "$@"
  ;;
qlora)
  table qlora-8b python benchmarks/lora.py --qlora --model llama3-8b --steps 20 --out "$OUT/qlora-8b.md" \
    --peer-rows "--liger --micro-batch-size 2 --no-kbit-prep" \
    --rows "$fast --micro-batch-size 2" "$fast --micro-batch-size 4" "$@"
  ;;
lora-variants)
  table lora-8b-variants python benchmarks/lora.py --skip-peer --model llama3-8b --steps 20 --out "$OUT/lora-8b-variants.md" \
    --rows "$fast --micro-batch-size 4 --loss chunked" "$fast --micro-batch-size 4 --loss cce" \
    "$fast --micro-batch-size 4 --loss ce" "$fast --micro-batch-size 4 --compile-mode max-autotune-no-cudagraphs" "$@"
  ;;
full)
  table full-1b python benchmarks/lora.py --full --model llama3.2-1b --seq-len 4096 --steps 20 --out "$OUT/full-1b.md" \
    --peer-rows "--liger --micro-batch-size 4" "--liger --micro-batch-size 8" \
    --rows "--attn flash --compile --micro-batch-size 4 --loss cce" "--attn flash --compile --micro-batch-size 8 --loss cce" \
    "--attn flash --compile --micro-batch-size 16 --loss cce" "--attn flash --compile --micro-batch-size 4 --loss liger" "$@"
  ;;
full-variants)
  table full-1b-variants python benchmarks/lora.py --full --model llama3.2-1b --steps 20 --out "$OUT/full-1b-variants.md" \
    --peer-rows "--liger --micro-batch-size 8" \
    --rows "--attn flash --compile --micro-batch-size 16 --loss cce" "--attn sdpa --compile --micro-batch-size 16 --loss cce" \
    "--attn flash --compile --micro-batch-size 16 --loss chunked" "--attn flash --compile --micro-batch-size 16" \
    "--attn flash --compile --micro-batch-size 16 --loss cce --fp8 tensorwise" "$@"
  ;;
lean)
  lean="--attn flash --lora-kernels --ac full --loss chunked --loss-chunk 1024"
  offload="--attn flash --lora-kernels --ac full --offload cpu --offload-embeddings --loss chunked --loss-chunk 256"
  table lean-lora python benchmarks/lora.py --skip-peer --model llama3-8b --seq-len 4096 --steps 20 --out "$OUT/lean-lora.md" \
    --rows "$lean" "$offload" "$@"
  table lean-qlora python benchmarks/lora.py --skip-peer --qlora --model llama3-8b --seq-len 4096 --steps 20 \
    --out "$OUT/lean-qlora.md" --rows "$lean" "--attn flash --lora-kernels" "$offload" "$@"
  ;;
real-length)
  table real-length python benchmarks/real_length.py --model llama3-8b --steps 20 --out "$OUT/real-length.md" \
    --rows "--packing $fast --micro-batch-size 2" "--packing $fast --micro-batch-size 4" "$@"
  ;;
attention)
  python -m pytest -q -m gpu tests/test_attention.py tests/test_lora.py tests/test_lora_kernels.py -p no:warnings 2>&1 \
    | tail -15 | tee "$OUT/gpu_tests.txt"
  python benchmarks/attention.py --seq-lens 4096 8192 16384 --out "$OUT/attention.md" 2>&1 | tail -22
  rm -rf "$OUT/runs"; mkdir -p "$OUT/runs"   # train.py refuses a directory that holds an earlier run
  common="--model llama3.2-1b --seq-len 4096 --max-steps 30 --log-every 10 --eval-exact-match 16 --lr 1e-4 --warmup-steps 5"
  for attn in flash flex sdpa; do
    python train.py $common --packing --micro-batch-size 2 --attn $attn --output-dir "$OUT/runs/packed-$attn" \
      > "$OUT/runs/packed-$attn.log" 2>&1
    tail -4 "$OUT/runs/packed-$attn.log"
  done
  python train.py $common --micro-batch-size 64 --attn sdpa --output-dir "$OUT/runs/padded-sdpa" > "$OUT/runs/padded-sdpa.log" 2>&1
  tail -4 "$OUT/runs/padded-sdpa.log"
  python benchmarks/e2e_table.py "$OUT"/runs/*/ | tee "$OUT/e2e.md"
  cp "$OUT"/runs/packed-flash/metrics.jsonl "$OUT/metrics-packed-flash.jsonl" 2>/dev/null
  rm -rf "$OUT"/runs/*/final "$OUT"/runs/*/checkpoints
  tar -C "$OUT" -czf "$OUT/runs.tgz" runs && rm -rf "$OUT/runs"
  ;;
fp8)
  for mbs in 2 4; do
    steps=40 warmup=15; [ $mbs = 4 ] && steps=30 warmup=12
    python benchmarks/fp8.py --layers 32 --micro-batch-size $mbs --steps $steps --warmup $warmup \
      --rows bf16 'fp8 tensorwise' 'fp8 rowwise' --extra '--attn flash' --out "$OUT/fp8-32-mbs$mbs-runs" \
      > "$OUT/fp8-32-mbs$mbs.md" 2> "$OUT/fp8-32-mbs$mbs.log"
    echo "== fp8-32-mbs$mbs: exit $?"
    rm -rf "$OUT"/fp8-32-mbs$mbs-runs/*/checkpoints
    cat "$OUT/fp8-32-mbs$mbs.md"
  done
  ;;
fp8-base)
  table fp8-base-8b python benchmarks/fp8_base.py speed --model llama3-8b --logs "$OUT/fp8-base-8b-runs" \
    --out "$OUT/fp8-base-8b.md"
  # 512-token rows: 200 steps of the default 4,096 would see the short demo samples ten times over
  [ -z "${1:-}" ] && exit 0
  table fp8-base-curve python benchmarks/fp8_base.py curve --model "$1" --steps 200 --seq-len 512 \
    --logs "$OUT/fp8-base-curve-runs" --out "$OUT/fp8-base-curve.md"
  for method in lora qlora; do  # English text, where the loss stays near 2.5
    table "fp8-base-curve-docstrings-$method" python benchmarks/fp8_base.py curve --model "$1" --steps 200 \
      --seq-len 512 --data docstrings --micro-batch-size 1 --method $method \
      --logs "$OUT/fp8-base-curve-docstrings-$method-runs" --out "$OUT/fp8-base-curve-docstrings-$method.md"
  done
  ;;
quant)
  LAYERS=${LAYERS:-8}; SEQ=${SEQ:-4096}; MBS=${MBS:-2}; STEPS=${STEPS:-60}; EXTRA=${EXTRA:---attn flash}
  python -c "import torchao; print('torchao', torchao.__version__)" >> "$OUT/gpu.txt" 2>&1
  python -m pytest -q -s -m gpu tests/test_fp8.py tests/test_qat.py tests/test_gptq.py > "$OUT/gpu_tests.txt" 2>&1
  grep -E "^(bf16|fp8)|passed|failed|error" "$OUT/gpu_tests.txt" | tail -12
  python benchmarks/fp8.py --layers "$LAYERS" --seq-len "$SEQ" --micro-batch-size "$MBS" --steps "$STEPS" \
    --extra "$EXTRA" --out "$OUT/fp8-runs" > "$OUT/fp8.md" 2> "$OUT/fp8.err"
  rm -rf "$OUT"/fp8-runs/*/checkpoints
  cat "$OUT/fp8.md"
  ;;
fp8-parity)
  fp8_parity
  ;;
profile)
  if [ $# -gt 0 ]; then
    profile "$@"
  else
    OUT=$OUT/prof-lora-8b MBS=2 GA=4 profile "--fp8-base"
    OUT=$OUT/prof-qlora-8b MBS=2 GA=4 ADAPTER=--qlora profile "--fp8-base"
    OUT=$OUT/prof-full-1b MODEL=llama3.2-1b ADAPTER= MBS=8 profile "--optimizer adamw-sr --loss cce --fp8 tensorwise"
  fi
  ;;
esac
