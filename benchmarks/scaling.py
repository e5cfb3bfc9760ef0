"""Scaling from 1 to N GPUs: each strategy at each world size, on one global batch.

    # an 8-GPU H200 box with the requirements installed; one run (<= 10 min) per row selection, in
    # the order to run them:
    ROWS=fsdp-gathered-full,fsdp-full,peer-full bash benchmarks/gpu_distributed.sh scaling  # 1: >= 90% goal row + peer
    ROWS=fsdp-gathered-compiled,hsdp-full bash benchmarks/gpu_distributed.sh scaling       # 2: compiled; HSDP 2 x N/2
    LOGS=/tmp/scaling_gb32 ROWS=fsdp-gathered-full bash benchmarks/gpu_distributed.sh scaling --global-batch 32  # 3
    ROWS=fsdp-gathered-lora,zero3-lora,peer-lora bash benchmarks/gpu_distributed.sh scaling  # 4: LoRA under each
    ROWS=zero3-full,tp-full bash benchmarks/gpu_distributed.sh scaling                     # 5 (1-GPU baselines reused)
    ROWS=fp8-fsdp-gathered,zero2-full bash benchmarks/gpu_distributed.sh scaling  # 6 (FP8 all-gather once a step)
    WORLDS=1,2 ROWS=... bash benchmarks/gpu_distributed.sh scaling                         # a 2-GPU box: 1 and 2 only
    # i.e. python benchmarks/scaling.py --model llama3-8b --seq-len 4096 --rows fsdp-full,fsdp-lora \
    #          --logs $OUT/scaling --out $OUT/scaling.md --budget-s 540
    # CPU (the proof that the harness works; tests/test_scaling_bench.py):
    python benchmarks/scaling.py --model tiny-llama --device cpu --worlds 1,2 --seq-len 128 \
        --global-batch 4 --steps 3 --warmup 1 --rows fsdp-full,ddp-full,zero2-full --logs /tmp/scaling

Every run is `torchrun --standalone --nproc_per_node N train.py ...` (or benchmarks/peer_fsdp.py for
the peer rows) with the same data, seed and global batch: --micro-batch-size x --grad-accum x
data-parallel ranks is --global-batch sequences of --seq-len tokens at every N (grad-accum is
adjusted; tp ranks share a batch). Data: random lower-case letters (about one token each) in
--dataset-format pretrain blocks, so every row is full and the loss moves (from ~ln(vocab) towards
ln(27)) within a few steps. Baselines: each training mode (full, lora, fp8) runs once as the plain
single-process run on 1 GPU (`single-<mode>`); a strategy's rows at N GPUs are compared with it:
    tokens/s per GPU   tokens/s over the steps after --warmup (all ranks' tokens) / N
    scaling eff.       (tokens/s at N) / (N x tokens/s of the 1-GPU run)
    peak GiB / GPU     rank 0's peak allocated CUDA memory (on CPU: rank 0's peak RSS)
    max |dloss|        the largest per-step loss difference to the 1-GPU run over all steps
    ok                 max |dloss| <= --tol (default 0.05 in bf16 / fp8, 1e-4 in fp32)
The peer rows (HF Trainer + accelerate FSDP2, benchmarks/peer_fsdp.py) have their own 1-GPU run
as the baseline (same shape, seq, global batch; random token ids, not the same data as nanotune).
Rows (--rows, comma-separated; --list prints them with their flags): see ROWS below; a row that
cannot run at some N (below 2 GPUs, fp8 without CUDA, a global batch that does not
divide) is one table line that says so. Every failure or timeout is one table line with the last
error line of its log (--logs DIR/<run>.log), never a crash of the harness.

Time: --budget-s is shared over the runs not yet started in proportion to 1 + 1/N (start-up, about
the 1-GPU compute of the default settings, plus compute / N), so a fast run leaves its time to the
later ones; a run over its share is killed (its process group) and reported as a timeout. The plan (runs, flags, time
per run) is printed first, the Markdown table last (and written to --out). --reuse takes a run's
metrics from --logs when its command is unchanged and it finished (a timed-out run's partial steps
run again), so a later call with other --rows reuses the 1-GPU baselines of an earlier call on the
same machine.
"""

import argparse
import dataclasses
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class Row:
    mode: str        # full | lora | fp8: the 1-GPU baseline it is compared with
    flags: str       # train.py flags of the strategy (peer rows: peer_fsdp.py flags)
    min_world: int = 2
    tp: int = 1      # tensor-parallel ranks: they share one batch (data-parallel ranks = N / tp)
    cuda: bool = False
    peer: bool = False


MODES = {"full": "", "lora": "--lora --lora-rank 16", "fp8": "--fp8 tensorwise --compile", "compiled": "--compile"}
ROWS = {
    "fsdp-full": Row("full", "--fsdp"),
    "fsdp-gathered-full": Row("full", "--fsdp --fsdp-keep-gathered"),
    "fsdp-gathered-compiled": Row("compiled", "--fsdp --fsdp-keep-gathered"),
    "fsdp-lora": Row("lora", "--fsdp"),
    "fsdp-gathered-lora": Row("lora", "--fsdp --fsdp-keep-gathered"),
    # 2 replicas x N/2 shards; at N = 2 one shard each: FSDP2's replicate all-reduce alone (2 x 2 needs 4 GPUs)
    "hsdp-full": Row("full", "--fsdp --dp-replicate 2"),
    "zero2-full": Row("full", "--deepspeed zero2"),
    "zero3-full": Row("full", "--deepspeed zero3"),
    "zero2-lora": Row("lora", "--deepspeed zero2"),
    "zero3-lora": Row("lora", "--deepspeed zero3"),
    "tp-full": Row("full", "--fsdp --tp 2", tp=2),
    "tp-lora": Row("lora", "--fsdp --tp 2", tp=2),
    "tp-compiled": Row("compiled", "--fsdp --tp 2", tp=2),
    "fp8-fsdp": Row("fp8", "--fsdp", cuda=True),
    "fp8-fsdp-gathered": Row("fp8", "--fsdp --fsdp-keep-gathered", cuda=True),
    "ddp-full": Row("full", "--ddp"),
    "ddp-lora": Row("lora", "--ddp"),
    "peer-full": Row("full", "--full", min_world=1, peer=True),
    "peer-lora": Row("lora", "", min_world=1, peer=True),
}
DEFAULT_ROWS = ("fsdp-full,fsdp-gathered-full,fsdp-lora,hsdp-full,zero2-full,zero3-full,zero3-lora,tp-full,tp-lora,"
                "fp8-fsdp,fp8-fsdp-gathered,peer-full,peer-lora")


@dataclasses.dataclass
class Run:
    name: str
    row: str          # ROWS key, or single-<mode> for a baseline
    world: int
    cmd: list[str] | None = None
    skip: str | None = None     # why it does not run (one table line)
    result: dict | None = None


def random_letters(path: Path, blocks: int, seq_len: int) -> Path:
    """Documents of random letters (~1 token each) for at least `blocks` pretrain blocks of seq_len."""
    rng = random.Random(0)
    letters = seq_len * 4
    docs = blocks // 4 + 2 + blocks * 3 // 10  # 30% margin for tokens merged across letters
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=letters))})
                            + "\n" for _ in range(docs)))
    return path


def train_cmd(args, mode: str, flags: str, world: int, accum: int, data: Path, out: Path) -> list[str]:
    train = ["--model", args.model, "--dataset", str(data), "--dataset-format", "pretrain", "--val-dataset", "none",
             "--seq-len", str(args.seq_len), "--micro-batch-size", str(args.micro_batch_size),
             "--grad-accum", str(accum), "--max-steps", str(args.steps), "--log-every", "1",
             "--warmup-steps", "2", "--lr", str(args.lr), "--seed", "1", "--eval-exact-match", "0",
             "--skip-export", "--precision", args.precision, "--device", args.device, "--output-dir", str(out),
             *MODES[mode].split(), *flags.split(), *args.extra.split()]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
            str(ROOT / "train.py"), *train]


def peer_cmd(args, row: Row, world: int, accum: int, out: Path) -> list[str]:
    peer = ["--model", args.model, "--seq-len", str(args.seq_len), "--micro-batch-size", str(args.micro_batch_size),
            "--grad-accum", str(accum), "--steps", str(args.steps), "--lr", str(args.lr), "--device", args.device,
            "--precision", args.precision, "--out-dir", str(out), *row.flags.split(), *args.peer_extra.split()]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
            str(ROOT / "benchmarks" / "peer_fsdp.py"), *peer]


def weight(run: Run) -> float:
    """A run's share of the time left: start-up (~ the 1-GPU compute of these settings) + compute / N."""
    return 1 + 1 / run.world


def plan(args, rows: list[str], data: Path) -> list[Run]:
    """The baselines first (one per mode the rows need), then each row at each world size."""
    logs, runs = Path(args.logs), []

    def accum_for(world: int, tp: int) -> tuple[int | None, str | None]:
        dp = world // tp
        if args.global_batch % (args.micro_batch_size * dp):
            return None, (f"--global-batch {args.global_batch} does not divide into {dp} dp ranks "
                          f"x mbs {args.micro_batch_size}")
        return args.global_batch // (args.micro_batch_size * dp), None

    for mode in dict.fromkeys(ROWS[r].mode for r in rows if not ROWS[r].peer):
        run = Run(f"single-{mode}-n1", f"single-{mode}", 1)
        if mode == "fp8" and args.device == "cpu":
            run.skip = "skipped: --fp8 needs CUDA (compute capability >= 8.9)"
        else:
            run.cmd = train_cmd(args, mode, "", 1, accum_for(1, 1)[0], data, logs / run.name)
        runs.append(run)
    for name in rows:
        row = ROWS[name]
        for world in args.worlds:
            if world < row.min_world:
                continue
            run = Run(f"{name}-n{world}", name, world)
            accum, why = accum_for(world, row.tp)
            if row.cuda and args.device == "cpu":
                run.skip = "skipped: needs CUDA"
            elif why:
                run.skip = f"skipped: {why}"
            elif row.peer:
                run.cmd = peer_cmd(args, row, world, accum, logs / run.name)
            else:
                run.cmd = train_cmd(args, row.mode, row.flags, world, accum, data, logs / run.name)
            runs.append(run)
    return runs


def last_error(log: Path) -> str:
    """The last line of a log that names an error (torchrun's own summary lines left out)."""
    lines = ([line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
             if log.is_file() else [])
    noise = ("ChildFailedError", "torch.distributed.elastic", "traceback :", "error_file", "To enable traceback",
             "Root Cause", "Failures:", "<NO_OTHER_FAILURES>", "[W", "warnings.warn")
    errors = [line for line in lines
              if re.search(r"Error|error:|Exception|Killed|OOM", line) and not any(n in line for n in noise)]
    return ((errors or lines or ["no output"])[-1])[:160].replace("|", "/")


def read_metrics(run_dir: Path, warmup: int) -> dict:
    """Per-step losses, throughput over the steps after `warmup`, peak memory and MFU from metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = sorted((m for m in records if "loss" in m and m.get("step", 0) > 0), key=lambda m: m["step"])
    if not steps:
        raise ValueError("metrics.jsonl has no training steps")
    prev, timed_tokens, timed_s, mfus = 0, 0.0, 0.0, []
    for m in steps:
        tokens = m["tokens"] - prev
        prev = m["tokens"]
        if m["step"] > warmup and m.get("tokens_per_s"):
            timed_tokens, timed_s = timed_tokens + tokens, timed_s + tokens / m["tokens_per_s"]
            if m.get("mfu") is not None:
                mfus.append(m["mfu"])
    if timed_s == 0:  # fewer steps than --warmup: the last record's window
        timed_tokens, timed_s = 1.0, 1.0 / steps[-1]["tokens_per_s"]
    return {"loss": {m["step"]: m["loss"] for m in steps}, "tokens_per_s": timed_tokens / timed_s,
            "peak_gib": max(m.get("peak_mem_gib") or 0 for m in steps),
            "mfu": sum(mfus) / len(mfus) if mfus else None,
            "unsharded": any(m.get("fsdp2") is False for m in steps)}  # the peer's FSDP2 was not applied


def execute(run: Run, args, timeout: float) -> dict:
    """One run under a time limit: its metrics, or {'error': ...}. Never raises."""
    logs = Path(args.logs)
    log, cmd_file, out = logs / f"{run.name}.log", logs / f"{run.name}.cmd", logs / run.name
    done = logs / f"{run.name}.done"  # the command of the last run that finished: a killed one leaves partial metrics
    cmd_text = shlex.join(run.cmd)
    if args.reuse and done.is_file() and done.read_text() == cmd_text and (out / "metrics.jsonl").is_file():
        try:
            return read_metrics(out, args.warmup) | {"reused": True}
        except (ValueError, KeyError, json.JSONDecodeError):
            pass
    done.unlink(missing_ok=True)
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)])
    cmd_file.write_text(cmd_text)
    t0 = time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    with open(log, "w") as f:
        f.write(f"$ {cmd_text}\n")
        f.flush()
        # its own process group: on timeout the whole torchrun tree (this run's processes only) is killed
        proc = subprocess.Popen(run.cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"error": f"timeout after {timeout:.0f} s ({last_error(log)})", "wall_s": time.time() - t0}
    wall = time.time() - t0
    if rc != 0:
        return {"error": f"exit {rc}: {last_error(log)}", "wall_s": wall}
    try:
        metrics = read_metrics(out, args.warmup) | {"wall_s": wall}
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        return {"error": f"no metrics: {type(e).__name__}: {e}"[:160], "wall_s": wall}
    done.write_text(cmd_text)
    return metrics


def baseline_of(run: Run, runs: list[Run]) -> Run | None:
    if run.row.startswith("single-"):
        return None
    row = ROWS[run.row]
    if row.peer:  # the peer's own 1-GPU run
        return next((r for r in runs if r.row == run.row and r.world == 1), None)
    return next((r for r in runs if r.row == f"single-{row.mode}"), None)


def table(runs: list[Run], args) -> str:
    lines = [f"Model {args.model}, seq {args.seq_len}, global batch {args.global_batch} x {args.seq_len} tokens, "
             f"{args.steps} steps (throughput over steps {args.warmup + 1}-{args.steps}), {args.precision}, "
             f"tolerance {args.tol:g} on the per-step loss.", "",
             "| row | GPUs | grad accum | tokens/s per GPU | scaling eff. | peak GiB / GPU | MFU | "
             "max abs dloss vs 1 GPU | within tol | loss first -> last | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        accum = re.search(r"--grad-accum (\d+)", shlex.join(run.cmd or []))
        r = run.result or {"error": run.skip or "not run"}
        note = " (FSDP2 not applied: DDP / one process)" if r.get("unsharded") else ""
        head = f"| {run.row}{note} | {run.world} | {accum.group(1) if accum else ''} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | | | | | | {r.get('wall_s', 0):.0f} |")
            continue
        base = baseline_of(run, runs)
        b = base.result if base and base.result and "error" not in base.result else None
        if base is None or base is run:
            eff, diff, ok = "100.0%", "(baseline)", ""
        elif b is None:
            eff, diff, ok = "n/a", "n/a (no 1-GPU run)", ""
        else:
            common = sorted(set(r["loss"]) & set(b["loss"]))
            d = max(abs(r["loss"][s] - b["loss"][s]) for s in common) if common else float("nan")
            eff = f"{100 * r['tokens_per_s'] / (run.world * b['tokens_per_s']):.1f}%"
            diff, ok = f"{d:.2e}", "yes" if d <= args.tol else "NO"
        first, last = r["loss"][min(r["loss"])], r["loss"][max(r["loss"])]
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        wall = "reused" if r.get("reused") else f"{r.get('wall_s', 0):.0f}"
        lines.append(f"{head} {r['tokens_per_s'] / run.world:,.1f} | {eff} | {r['peak_gib']:.2f} | {mfu} | {diff} | "
                     f"{ok} | {first:.4f} -> {last:.4f} | {wall} |")
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated, of: {', '.join(ROWS)}")
    p.add_argument("--worlds", default=None,
                   help="world sizes, e.g. 1,2,4,8 (default: powers of two up to the GPU count; CPU: 1,2)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step, at every world size")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the throughput")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when visible")
    p.add_argument("--precision", default=None, help="default: bf16 on CUDA (8B full FT fits one H200), fp32 on CPU")
    p.add_argument("--tol", type=float, default=None, help="max per-step |loss diff| (default: 0.05 bf16, 1e-4 fp32)")
    p.add_argument("--extra", default="",
                   help="more train.py flags for every nanotune run, e.g. --extra='--attn flash --ac full'")
    p.add_argument("--peer-extra", default="",
                   help="more benchmarks/peer_fsdp.py flags for the peer runs, "
                        "e.g. --peer-extra=--gradient-checkpointing")
    p.add_argument("--budget-s", type=float, default=540, help="wall-clock seconds for the whole matrix")
    p.add_argument("--logs", default="/tmp/scaling", help="run directories, <run>.log and <run>.cmd")
    p.add_argument("--out", default=None, help="also write the table here")
    p.add_argument("--reuse", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse a finished run's metrics under --logs when its command is unchanged")
    p.add_argument("--list", action="store_true", help="print the rows and their flags, then exit")
    p.add_argument("--dry-run", action="store_true", help="print the plan only")
    args = p.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    args.device = args.device or ("cuda" if cuda else "cpu")
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    args.tol = args.tol if args.tol is not None else (1e-4 if args.precision == "fp32" else 0.05)
    if args.worlds:
        args.worlds = sorted({int(w) for w in args.worlds.split(",")})
    else:
        n = torch.cuda.device_count() if args.device == "cuda" else 2
        args.worlds = [w for w in (1, 2, 4, 8, 16, 32, 64) if w <= max(n, 1)]
    bad = [r for r in args.rows.split(",") if r not in ROWS]
    if bad:
        p.error(f"--rows: unknown {', '.join(bad)}; choose from {', '.join(ROWS)}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.list:
        for name, row in ROWS.items():
            print(f"{name:22s} mode {row.mode:8s} flags: "
                  f"{(row.flags if row.peer else MODES[row.mode] + ' ' + row.flags).strip()}"
                  f"{' (peer_fsdp.py)' if row.peer else ''}; N >= {row.min_world}{', CUDA' if row.cuda else ''}")
        return 0
    rows = args.rows.split(",")
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    blocks = args.global_batch * (args.steps + 1)
    data = logs / f"letters-{args.seq_len}-{blocks}.jsonl"
    if not data.is_file():
        random_letters(data, blocks, args.seq_len)
    runs = plan(args, rows, data)
    todo = [r for r in runs if r.cmd]
    total = sum(map(weight, todo)) or 1
    print(f"plan: {len(todo)} runs ({len(runs) - len(todo)} skipped), budget {args.budget_s:.0f} s, shared as "
          f"start-up + compute / N (time a run leaves unused goes to the later ones); logs in {logs}", flush=True)
    for run in runs:
        share = f"<= {args.budget_s * weight(run) / total:4.0f} s  " if run.cmd else ""
        print(f"  {run.name:22s} {share}" + (run.skip or shlex.join(run.cmd[run.cmd.index('--nproc_per_node'):])),
              flush=True)
    if todo and not args.model.startswith("tiny") and args.budget_s * min(map(weight, todo)) / total < 50:
        print("warning: some runs get under 50 s (a large model's start-up alone takes ~30-60 s); select fewer "
              "--rows or --worlds per call, or raise --budget-s", flush=True)
    if args.dry_run:
        return 0
    deadline = time.time() + args.budget_s
    for i, run in enumerate(todo):
        timeout = (deadline - time.time()) * weight(run) / sum(map(weight, todo[i:]))
        if timeout < 5:
            run.result = {"error": "skipped: out of --budget-s"}
            continue
        try:
            run.result = execute(run, args, timeout)
        except Exception as e:  # the harness reports, it does not crash
            run.result = {"error": f"harness: {type(e).__name__}: {e}"[:160]}
        r = run.result
        print(f"== {run.name}: " + (r["error"] if "error" in r else
              f"{r['tokens_per_s']:,.1f} tok/s, peak {r['peak_gib']:.2f} GiB, {r.get('wall_s', 0):.0f} s"
              + (" (reused)" if r.get("reused") else "")), flush=True)
    text = table(runs, args)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
