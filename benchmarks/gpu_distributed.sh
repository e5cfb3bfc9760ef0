#!/usr/bin/env bash
# 1-GPU check of the sharding engines: FSDP2 (world size 1, under torchrun and as a plain
# process), QLoRA + FSDP2, FSDP2 CPU offload and DeepSpeed ZeRO 1/2/3 (+ offload) train the same
# small model on the same batches as the plain single-process run; prints their losses side by side.
#
#   OUT=/tmp/out bash benchmarks/gpu_distributed.sh          # logs + table under $OUT
#
# Model: the llama3.2-1b preset (random weights, embedded tokenizer and data), packed 1024-token
# rows, bf16-mixed, 30 steps. Expect FSDP2 and ZeRO within bf16 noise of the plain run (FSDP2's
# MixedPrecisionPolicy runs the norms on bf16 params where plain autocast keeps them fp32).
set -uo pipefail
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled OMP_NUM_THREADS=4
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/gpu_distributed}
mkdir -p "$OUT"
common="--model llama3.2-1b --packing --seq-len 1024 --micro-batch-size 4 --grad-accum 2 --max-steps 30
        --log-every 1 --eval-exact-match 0 --val-size 64 --warmup-steps 5 --lr 3e-4 --seed 1 --skip-export"
port=29700

_run() {  # name, launcher (plain | torchrun), extra flags...
  local name=$1 launcher=$2; shift 2
  port=$((port + 1))
  echo "== $name"
  if [ "$launcher" = plain ]; then
    python train.py $common --output-dir "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  else
    python -m torch.distributed.run --nproc_per_node 1 --master_port $port train.py $common \
      --output-dir "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  fi
  echo "   exit $? ($(tail -n 1 "$OUT/$name.log"))"
}

rm -rf "${OUT:?}"/*/
RUNS=${RUNS:-all}  # e.g. RUNS="plain zero2 zero3" runs only those (the baselines plain and qlora included)
run() { case " $RUNS " in *" $1 "*|" all ") _run "$@" ;; esac; }
run plain          plain
run fsdp           torchrun --fsdp
run fsdp-noenv     plain    --fsdp
run fsdp-gathered  torchrun --fsdp --fsdp-keep-gathered
run fsdp-offload   torchrun --fsdp --fsdp-cpu-offload
run zero1          torchrun --deepspeed zero1
run zero2          torchrun --deepspeed zero2
run zero3          torchrun --deepspeed zero3
run zero3-offload  torchrun --deepspeed zero3 --ds-offload
run qlora          plain    --qlora --precision bf16
run qlora-fsdp     torchrun --qlora --precision bf16 --fsdp

python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
def metrics(name):
    f = out / name / "metrics.jsonl"
    return {m["step"]: m for m in map(json.loads, f.read_text().splitlines())} if f.is_file() else {}
base = {"plain": metrics("plain"), "qlora": metrics("qlora")}
print("| run | loss@1 | loss@10 | loss@30 | max abs diff vs baseline | tok/s (last) | peak mem GiB |")
print("|---|---|---|---|---|---|---|")
names = ["plain", "fsdp", "fsdp-noenv", "fsdp-gathered", "fsdp-offload", "zero1", "zero2", "zero3",
         "zero3-offload", "qlora", "qlora-fsdp"]
for name in names:
    m = metrics(name)
    if not (out / f"{name}.log").is_file():  # not in RUNS
        continue
    if not m or 30 not in m:
        print(f"| {name} | failed: see {name}.log | | | | | |")
        continue
    ref = base["qlora" if name.startswith("qlora") else "plain"]
    steps = [s for s in range(1, 31) if s in m and s in ref]
    diff = max(abs(m[s]["loss"] - ref[s]["loss"]) for s in steps) if steps else float("nan")
    last = m[30]
    print(f"| {name} | {m[1]['loss']:.4f} | {m[10]['loss']:.4f} | {last['loss']:.4f} | {diff:.2e} | "
          f"{last.get('tokens_per_s') or 0:,.0f} | {last.get('peak_mem_gib') or 0:.2f} |")
EOF
