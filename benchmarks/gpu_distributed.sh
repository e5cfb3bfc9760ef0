#!/usr/bin/env bash
# Distributed training on the GPUs of one host: the sharding engines against the plain run, scaling from
# 1 to N GPUs, tensor-parallel communication, and sequence parallelism. requirements.txt and
# requirements-gpu.txt installed. Output under $OUT (default /tmp/out). NVLink multicast (NVLS) stays off.
#
#   bash benchmarks/gpu_distributed.sh SUB-COMMAND [ARGS...]    e.g. bash benchmarks/gpu_distributed.sh engines
#
#   engines        one GPU: FSDP2 (world size 1, under torchrun and as a plain process; with the weights kept
#                  gathered; with CPU offload), DeepSpeed ZeRO 1/2/3 (+ offload), QLoRA and QLoRA + FSDP2
#                  train the same small model (llama3.2-1b preset, random weights, packed 1024-token rows,
#                  bf16-mixed, 30 steps) on the same batches as the plain single-process run; a table of their
#                  losses, the largest difference to the plain (or plain QLoRA) run, tokens/s and peak memory.
#                  FSDP2 and ZeRO should match the plain run within bf16 noise (FSDP2's
#                  MixedPrecisionPolicy runs the norms on bf16 params where plain autocast keeps them fp32).
#                  RUNS="plain zero2 zero3" runs only those rows (their baselines plain / qlora included).
#                  Logs and runs in $OUT/engines.
#   scaling [ARGS] benchmarks/scaling.py: strategies x world sizes 1, 2, ... N (every GPU; WORLDS=1,2 picks)
#                  on the Llama-3.1-8B shape (MODEL, SEQ_LEN 4096), one global batch of 8 sequences, 8 steps;
#                  ROWS picks the strategies (default fsdp-full,fsdp-lora; the list and a sensible order:
#                  scaling.py's docstring, or ARGS --list), BUDGET_S (540) bounds the runs, and the 1-GPU
#                  baselines in LOGS (/tmp/scaling_logs) are reused by later calls. ARGS go to scaling.py
#                  (e.g. --steps 6, --extra="--attn flash", --global-batch 32). $OUT: scaling-*.md (the table,
#                  printed last), scaling.log, logs/ (every run's log, command and metrics).
#                    ROWS=fsdp-gathered-full,fsdp-full,peer-full bash benchmarks/gpu_distributed.sh scaling
#                    WORLDS=1,2 ROWS=zero3-full,tp-lora bash benchmarks/gpu_distributed.sh scaling --steps 6
#   tp-comm [ARGS] two GPUs: collectives, DTensor ops and step time of --fsdp --tp 2 against plain --fsdp per
#                  optimizer step, at the shape of the scaling tp-full row (benchmarks/tp_comm.py; ARGS go to
#                  it). Tables: $OUT/tp_comm.md.
#   sp [DIR]       every GPU (N) as one sequence-parallel group: (1) tests/test_sequence_parallel.py -m gpu:
#                  train.py with --cp N, Ulysses (sdpa fp32, flash bf16, flex bf16) and ring (fp32, bf16) on
#                  packed rows == one GPU on the same documents, 3 steps + validation (fp32: 1e-4 relative,
#                  bf16: 2e-2), within TESTS_S seconds (default 420; 0 skips them); (2) benchmarks/
#                  sequence_parallel.py: the longest one-document sequence that trains in one step,
#                  Llama-3.1-8B shape + LoRA r=16, --alst --cp N --fsdp: Ulysses with --attn flash + --liger
#                  (80% of BUDGET_S, default 900), then ring (20%); each try predicts its time from the last
#                  one (quadratic) or, first, from one GPU's step at 512K / N, and is not started if it
#                  cannot end in the row's share; --offload-keep-gib is planned per try so pinned host memory
#                  fits the RAM / N. SP_ARGS passes flags to sequence_parallel.py (e.g. "--rows ulysses").
#                  A step at these lengths runs for many minutes, so start it detached and poll it:
#                    setsid bash benchmarks/gpu_distributed.sh sp /tmp/sp > /dev/null 2>&1 < /dev/null &
#                    bash benchmarks/gpu_distributed.sh wait /tmp/sp
#                  DIR (default /tmp/sp): sp-tests.log, sp.md (the table), sp.jsonl (every try), sp.log,
#                  runs/<try>/{cmd.txt,log.txt,out/}, gpus.txt, host.txt, DONE when over.
#   wait [DIR]     poll a detached sp until DONE or about 9.5 minutes, print the test summary, the last tries
#                  and the table, and copy DIR to $OUT.
# Profiles of a step over several GPUs: NPROC=2 bash benchmarks/gpu_speed.sh profile "--fsdp" "--fsdp --tp 2".
set -uo pipefail
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
sub=${1:-}; shift || true

engines() {
  local dir=$OUT/engines port=29700
  mkdir -p "$dir"; rm -rf "${dir:?}"/*/
  export OMP_NUM_THREADS=4
  local common="--model llama3.2-1b --packing --seq-len 1024 --micro-batch-size 4 --grad-accum 2 --max-steps 30
        --log-every 1 --eval-exact-match 0 --val-size 64 --warmup-steps 5 --lr 3e-4 --seed 1 --skip-export"
  _run() {  # name, launcher (plain | torchrun), extra flags...
    local name=$1 launcher=$2; shift 2
    case " ${RUNS:-all} " in *" $name "*|" all ") ;; *) return ;; esac
    port=$((port + 1))
    echo "== $name"
    if [ "$launcher" = plain ]; then
      python train.py $common --output-dir "$dir/$name" "$@" > "$dir/$name.log" 2>&1
    else
      python -m torch.distributed.run --nproc_per_node 1 --master_port $port train.py $common \
        --output-dir "$dir/$name" "$@" > "$dir/$name.log" 2>&1
    fi
    echo "   exit $? ($(tail -n 1 "$dir/$name.log"))"
  }
  _run plain          plain
  _run fsdp           torchrun --fsdp
  _run fsdp-noenv     plain    --fsdp
  _run fsdp-gathered  torchrun --fsdp --fsdp-keep-gathered
  _run fsdp-offload   torchrun --fsdp --fsdp-cpu-offload
  _run zero1          torchrun --deepspeed zero1
  _run zero2          torchrun --deepspeed zero2
  _run zero3          torchrun --deepspeed zero3
  _run zero3-offload  torchrun --deepspeed zero3 --ds-offload
  _run qlora          plain    --qlora --precision bf16
  _run qlora-fsdp     torchrun --qlora --precision bf16 --fsdp
  python - "$dir" <<'EOF' | tee "$dir/engines.md"
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
}

scaling() {
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  local logs=${LOGS:-/tmp/scaling_logs} rows=${ROWS:-fsdp-full,fsdp-lora} md status f d
  mkdir -p "$OUT" "$logs"
  md="$OUT/scaling-$(date +%F)-${rows//,/_}.md"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpus.txt" 2>&1
  local worlds=(); [ -n "${WORLDS:-}" ] && worlds=(--worlds "$WORLDS")
  python benchmarks/scaling.py --model "${MODEL:-llama3-8b}" --seq-len "${SEQ_LEN:-4096}" --rows "$rows" \
    "${worlds[@]}" --budget-s "${BUDGET_S:-540}" --logs "$logs" \
    --out "$md" "$@" 2>&1 | tee "$OUT/scaling.log" | grep -v '^|'
  status=${PIPESTATUS[0]}
  mkdir -p "$OUT/logs"
  for f in "$logs"/*.log "$logs"/*.cmd; do [ -f "$f" ] && cp "$f" "$OUT/logs/"; done
  for d in "$logs"/*/; do
    [ -f "$d/metrics.jsonl" ] && mkdir -p "$OUT/logs/$(basename "$d")" && cp "$d"/metrics.jsonl "$d"/run.json "$OUT/logs/$(basename "$d")/" 2>/dev/null
  done
  echo "scaling.py exit $status"
  cat "$md" 2>/dev/null   # the table, last
}

sp() {
  local dir=${1:-/tmp/sp} gpus pid watcher rc
  mkdir -p "$dir"; rm -f "$dir/DONE"
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  gpus=$(nvidia-smi -L | wc -l)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$dir/gpus.txt" 2>&1
  free -g > "$dir/host.txt" 2>&1
  if [ "${TESTS_S:-420}" != 0 ]; then
    # its own process group, so that running out of time also ends the torchrun workers it started
    setsid python -m pytest -q -s -m gpu tests/test_sequence_parallel.py > "$dir/sp-tests.log" 2>&1 &
    pid=$!; (sleep "${TESTS_S:-420}"; kill -TERM -- "-$pid" 2>/dev/null; sleep 20; kill -KILL -- "-$pid" 2>/dev/null) &
    watcher=$!; wait "$pid"; rc=$?; kill "$watcher" 2>/dev/null
    echo "GPU tests ($gpus GPUs vs 1): exit $rc (0 = all passed, 143 = out of time)" >> "$dir/sp-tests.log"
  fi
  python benchmarks/sequence_parallel.py --gpus "$gpus" --budget-s "${BUDGET_S:-900}" --out "$dir/sp.md" \
    --logs "$dir/sp.jsonl" --keep-runs "$dir/runs" ${SP_ARGS:-} > "$dir/sp.log" 2>&1
  echo "sequence_parallel.py exit $?" >> "$dir/sp.log"
  touch "$dir/DONE"
}

case $sub in
engines) engines ;;
scaling) scaling "$@" ;;
tp-comm)
  mkdir -p "$OUT"
  python benchmarks/tp_comm.py --model llama3-8b --seq-len 4096 --precision bf16 --out "$OUT/tp_comm.md" "$@" \
    > "$OUT/tp_comm.log" 2>&1
  echo "tp_comm.py exit $?"
  cat "$OUT/tp_comm.md" 2>/dev/null || tail -n 20 "$OUT/tp_comm.log"
  ;;
sp) sp "$@" ;;
wait)
  dir=${1:-/tmp/sp}
  for _ in $(seq 570); do [ -f "$dir/DONE" ] && break; sleep 1; done
  grep -hE "GPUs: losses|passed|failed|error" "$dir/sp-tests.log" 2>/dev/null | tail -12
  tail -n 4 "$dir/sp.jsonl" 2>/dev/null | cut -c1-400; cat "$dir/sp.md" 2>/dev/null
  [ -f "$dir/DONE" ] && echo "DONE" || echo "still running"
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader; free -g | head -2
  if [ "$(realpath -m "$dir")" != "$(realpath -m "$OUT")" ]; then mkdir -p "$OUT" && cp -r "$dir"/. "$OUT"/ 2>/dev/null; fi
  ;;
*)
  sed -n '2,/^set -uo/p' "$0" | grep '^#' | cut -c3-
  exit 2
  ;;
esac
