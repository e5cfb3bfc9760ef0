"""The longest sequence that trains on one GPU: the peer vs nanotune, one memory feature at a time.

    python benchmarks/long_context.py --budget-s 450 --out long_context.md     # GPU; see gpu_long_context.sh search

Llama-3.1-8B shape (random weights, bf16 base), LoRA r=16 on every decoder linear, micro-batch 1,
one full-length row. A try is one training step (forward + backward + optimizer) at one sequence
length, in its own process, so an out-of-memory error ends only that try. Per row: lengths double
from a start (the previous row's best: the rows add features, so the longest length only grows),
(halving instead when the start fails), then one bisection step between the last fit and the
first failure. Long tries cost minutes
(attention is quadratic), so the whole matrix runs under --budget-s: a try is started only when
its predicted time (the previous try's step time scaled by (L'/L)^1.6, plus the measured process
start-up) fits the row's share, and a row stopped by time says so ("time" in the table: the
next length was not tried; it may fit). tokens/s is the first (only) step's, warm-up included,
on both sides; peak GiB is torch's max allocated memory in that step.
Peer: benchmarks/peer.py (HF Trainer + peft, --gradient-checkpointing --liger: Liger's kernels and
fused linear cross entropy). nanotune rows: train.py --attn sdpa (one unpadded row: PyTorch's
flash SDPA kernel, as the peer) with the flags of each row added to the previous row's.

    python benchmarks/long_context.py --record 524288 --flags "--alst --liger --attn flash"

--record L skips the search: two short probes with --flags measure the device peak as weights +
bytes-per-token x length, then one step at L (shortened in 64K steps until the plan fits) with
--offload-keep-gib set so that the block inputs that do not fit the GPU's --gpu-gib go to host
memory, at most --host-gib of it: at 512K an 8B model's 32 block inputs alone are 128 GiB.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
K = 1024
ROWS = [  # (label, flags added to the row before)
    ("LoRA", []),
    ("+ --ac full", ["--ac", "full"]),
    ("+ --loss chunked", ["--loss", "chunked", "--loss-chunk", "4096"]),
    ("+ --tiled-mlp", ["--tiled-mlp"]),
    ("+ --offload cpu", ["--offload", "cpu"]),
]


def _text(path: Path, tokens: int) -> Path:
    """One document of random letters: the embedded tokenizer makes about one token per letter+space."""
    rng = random.Random(0)
    path.write_text(json.dumps({"text": " ".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=tokens + 256))}) + "\n")
    return path


def _oom(text: str) -> bool:
    return "out of memory" in text.lower() or "outofmemoryerror" in text.lower()


def _last_line(text: str) -> str:
    return (text.strip().splitlines() or ["?"])[-1][:160]


def try_peer(model: str, seq_len: int, tmp: Path, timeout: float) -> dict:
    out = tmp / f"peer-{seq_len}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/peer.py"), "--model", model, "--seq-len", str(seq_len),
           "--steps", "1", "--warmup", "0", "--gradient-checkpointing", "--liger", "--out", str(out)]
    return _run(cmd, timeout, lambda: json.loads(out.read_text()))


def try_nanotune(model: str, seq_len: int, flags: list[str], tmp: Path, timeout: float) -> dict:
    run = tmp / f"nt-{len(list(tmp.glob('nt-*')))}"
    data = _text(tmp / f"text-{seq_len}.jsonl", seq_len)
    cmd = [sys.executable, str(ROOT / "train.py"), "--model", model, "--lora", "--lora-rank", "16",
           "--precision", "bf16", "--attn", "sdpa", "--seq-len", str(seq_len), "--dataset", str(data),
           "--dataset-format", "pretrain", "--val-dataset", "none", "--micro-batch-size", "1", "--max-steps", "1",
           "--log-every", "1", "--warmup-steps", "0", "--eval-exact-match", "0", "--skip-export",
           "--output-dir", str(run), *flags]

    def parse():
        step = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        step = [m for m in step if "loss" in m][-1]
        return {"tokens_per_s": step["tokens_per_s"], "peak_gib": step["peak_mem_gib"], "loss": step["loss"]}

    return _run(cmd, timeout, parse)


def _run(cmd: list[str], timeout: float, parse) -> dict:
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return {"status": "time", "wall_s": time.perf_counter() - start}
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        text = proc.stderr + proc.stdout
        return {"status": "oom" if _oom(text) else "error", "error": _last_line(proc.stderr), "wall_s": wall}
    try:
        result = parse()
    except (OSError, ValueError, KeyError, IndexError) as e:
        return {"status": "error", "error": f"no result: {e}", "wall_s": wall}
    return {"status": "ok", "wall_s": wall, **result}


class Row:
    """The search over lengths for one side/settings, within a time share."""

    def __init__(self, side: str, settings: str, attempt, start: int, log):
        self.side, self.settings, self.attempt, self.start, self.log = side, settings, attempt, start, log
        self.tries: list[tuple[int, dict]] = []
        self.stopped_by_time = False

    def best(self):
        fits = [(n, r) for n, r in self.tries if r["status"] == "ok"]
        return max(fits, key=lambda x: x[0]) if fits else (0, {})

    def predict(self, seq_len: int, overhead: float) -> float:
        fits = [(n, r) for n, r in self.tries if r["status"] == "ok"]
        if not fits:
            return overhead + 60.0
        n, r = max(fits, key=lambda x: x[0])
        step = n / r["tokens_per_s"]
        return overhead + step * max(seq_len / n, 1.0) ** 1.6

    def search(self, deadline: float, overhead: list[float], max_len: int):
        seq_len, fail = self.start, None
        while seq_len <= max_len:
            if not self._try(seq_len, deadline, overhead):
                if self.stopped_by_time or self.tries[-1][1]["status"] == "error":
                    return
                fail = seq_len
                break
            seq_len *= 2
        while not self.best()[0] and fail and fail // 2 >= K:  # even the start failed: halve down
            if self._try(fail // 2, deadline, overhead):
                break
            if self.stopped_by_time or self.tries[-1][1]["status"] == "error":
                return
            fail //= 2
        lo = self.best()[0]
        if fail is None or lo == 0:
            return
        mid = (lo + fail) // 2 // K * K
        if mid > lo:
            self._try(mid, deadline, overhead)

    def _try(self, seq_len: int, deadline: float, overhead: list[float]) -> bool:
        left = deadline - time.perf_counter()
        if self.tries and self.predict(seq_len, overhead[0]) > left:
            self.stopped_by_time = True
            return False
        result = self.attempt(seq_len, left)
        self.tries.append((seq_len, result))
        self.log(self.side, self.settings, seq_len, result)
        if result["status"] == "ok":
            overhead[0] = max(1.0, result["wall_s"] - seq_len / result["tokens_per_s"])
        if result["status"] == "time":
            self.stopped_by_time = True
        return result["status"] == "ok"


def _length(n: int) -> str:
    return f"{n // K}K" if n % K == 0 else str(n)


def plan_record(probes: list[tuple[int, dict]], target: int, layers: int, hidden: int, gpu_gib: float,
                host_gib: float) -> tuple[int, float, dict]:
    """The longest length <= target (64K steps) whose device peak, extrapolated linearly from two
    probes with everything offloaded, fits gpu_gib once the block inputs that host_gib cannot take
    are kept on the device; returns (length, --offload-keep-gib, the figures behind it)."""
    (n1, r1), (n2, r2) = probes
    per_token = (r2["peak_gib"] - r1["peak_gib"]) / (n2 - n1)
    fixed = r2["peak_gib"] - per_token * n2
    for length in range(target, n2, -64 * K):
        inputs = layers * length * hidden * 2 / 2**30  # bf16 block inputs saved by --ac full
        keep = max(0.0, inputs - host_gib)
        peak = fixed + per_token * length + keep
        if peak <= gpu_gib:
            keep = max(keep, min(inputs, gpu_gib - peak) * 0.5)  # spare room: fewer copies, less host RAM
            return length, round(keep, 1), {"fixed_gib": fixed, "gib_per_16k": per_token * 16 * K,
                                            "inputs_gib": inputs,
                                            "predicted_peak_gib": fixed + per_token * length + keep}
    return 0, 0.0, {"fixed_gib": fixed, "gib_per_16k": per_token * 16 * K}


def record(args, tmp: Path, log) -> list[tuple[str, int, dict]]:
    """Probes, then the one long step (see --record)."""
    flags = args.flags.split()
    tries = []
    probes = (args.probe // 2, args.probe) if args.keep_gib is None else (args.probe,) if args.probe else ()
    for n in probes:
        result = try_nanotune(args.model, n, flags, tmp, 900)
        log("nanotune", args.flags, n, result)
        tries.append((args.flags, n, result))
        if result["status"] != "ok":
            return tries
    if args.keep_gib is None:
        length, keep, plan = plan_record([(n, r) for _, n, r in tries], args.record, args.layers, args.hidden,
                                         args.gpu_gib, args.host_gib)
    else:  # the plan given: the probes' linear fit can miss what only a long row needs
        length, keep, plan = args.record, args.keep_gib, {"given": True}
    print(json.dumps({"plan": {"length": length, "offload_keep_gib": keep, **plan}}), flush=True)
    if length:
        settings = f"{args.flags} --offload-keep-gib {keep}"
        result = try_nanotune(args.model, length, flags + ["--offload-keep-gib", str(keep)], tmp, 3600)
        log("nanotune", settings, length, result)
        tries.append((settings, length, result))
    return tries


def record_table(tries) -> str:
    lines = ["| flags | seq len | status | tokens/s | step s | peak GiB |", "|---|---|---|---|---|---|"]
    for flags, n, r in tries:
        ok = r["status"] == "ok"
        lines.append(f"| `{flags}` | {_length(n)} ({n:,}) | {r['status']} | {r['tokens_per_s'] if ok else 0:,.0f} | "
                     f"{n / r['tokens_per_s'] if ok else 0:,.0f} | {r.get('peak_gib', 0):.1f} |")
    return "\n".join(lines)


def table(rows: list[Row]) -> str:
    lines = ["| side | settings | longest seq that trained | tokens/s at it | peak GiB | stopped by | tries |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        n, r = row.best()
        failed = [x for x in row.tries if x[1]["status"] != "ok"]
        stop = "time budget" if row.stopped_by_time else (failed[-1][1]["status"] if failed else "max length")
        if failed and failed[-1][1]["status"] == "error":
            stop = f"error: {failed[-1][1]['error']}"
        tries = ", ".join(f"{_length(m)} {x['status']}" for m, x in row.tries)
        best = f"{_length(n)}" + (" (or more)" if row.stopped_by_time else "") if n else "none"
        lines.append(f"| {row.side} | {row.settings} | {best} | {r.get('tokens_per_s', 0):,.0f} | "
                     f"{r.get('peak_gib', 0):.1f} | {stop} | {tries} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama3-8b", help="a preset (tiny-llama: a CPU check of the script)")
    p.add_argument("--budget-s", type=float, default=450, help="wall-clock budget for the whole matrix")
    p.add_argument("--start", type=int, default=16 * K, help="first length of the first rows")
    p.add_argument("--max-len", type=int, default=1024 * K)
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--out", default=None, help="the Markdown table")
    p.add_argument("--logs", default=None, help="a JSONL of every try")
    p.add_argument("--record", type=int, default=0, help="skip the search: probe, then one step at this length")
    p.add_argument("--flags", default="--alst --attn flash", help="--record: train.py flags of the probes and the step")
    p.add_argument("--probe", type=int, default=64 * K, help="--record: the longer probe (the other is half)")
    p.add_argument("--gpu-gib", type=float, default=128.0, help="--record: device memory the plan may use")
    p.add_argument("--host-gib", type=float, default=80.0, help="--record: pinned host memory the plan may use")
    p.add_argument("--keep-gib", type=float, default=None,
                   help="--record: this --offload-keep-gib and length instead of the plan "
                        "(one probe at --probe, 0 = none)")
    p.add_argument("--layers", type=int, default=32, help="--record: decoder blocks of --model")
    p.add_argument("--hidden", type=int, default=4096, help="--record: hidden size of --model")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    log_file = open(args.logs, "a") if args.logs else None

    def log(side, settings, seq_len, result):
        record = {"side": side, "settings": settings, "seq_len": seq_len, **result}
        print(json.dumps(record), flush=True)
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    if args.record:
        text = record_table(record(args, tmp, log))
        if args.out:
            Path(args.out).write_text(text + "\n")
        print(text)
        return
    t0, overhead = time.perf_counter(), [30.0]
    plan = ([] if args.skip_peer else [("peer", "HF Trainer + peft + checkpointing + Liger (FLCE)", None)])
    flags: list[str] = []
    for label, added in ROWS:
        flags = flags + added
        plan.append(("nanotune", label, list(flags)))
    rows, start = [], args.start
    for i, (side, settings, row_flags) in enumerate(plan):
        share = (args.budget_s - (time.perf_counter() - t0)) / (len(plan) - i)
        attempt = ((lambda n, left: try_peer(args.model, n, tmp, left)) if row_flags is None
                   else (lambda n, left, f=row_flags: try_nanotune(args.model, n, f, tmp, left)))
        row = Row(side, settings, attempt, args.start if row_flags is None or not rows else start, log)
        row.search(time.perf_counter() + share, overhead, args.max_len)
        rows.append(row)
        if row_flags is not None:
            start = max(args.start, row.best()[0])  # the next row adds a feature: start at this best
    text = table(rows)
    note = (f"\n{args.model} (llama3-8b = the Llama-3.1-8B shape), LoRA r=16, bf16, micro-batch 1, one step per try; "
            f"budget {args.budget_s:.0f} s "
            f"(used {time.perf_counter() - t0:.0f} s); PYTORCH_CUDA_ALLOC_CONF="
            f"{os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '')}")
    if args.out:
        Path(args.out).write_text(text + "\n" + note + "\n")
    print(text + "\n" + note)


if __name__ == "__main__":
    main()
