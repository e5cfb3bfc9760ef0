"""bf16 vs FP8 full fine-tuning throughput on a Llama-3-8B-shaped block stack (one GPU), loss curves side by side.

    python benchmarks/fp8.py --layers 8 --seq-len 4096 --micro-batch-size 2 --steps 60 > fp8.md

Each row is one train.py run from the same random init (seed) on the embedded data, packed to
--seq-len, pure bf16 weights and AdamW states, per-block torch.compile, chunked loss: only the
linear layers' numerics differ between rows. Throughput is the mean tokens/s of the logged windows
after --warmup steps (compilation excluded); the loss table shows every logged step.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROWS = {"bf16": [], "fp8 tensorwise": ["--fp8", "tensorwise"], "fp8 rowwise": ["--fp8", "rowwise"]}


def run(name: str, flags: list[str], args) -> dict:
    out = Path(args.out) / name.replace(" ", "-")
    cmd = [sys.executable, str(ROOT / "train.py"), "--model", args.model, "--config-overrides",
           json.dumps({"num_hidden_layers": args.layers}), "--precision", "bf16", "--packing", "--seq-len",
           str(args.seq_len), "--micro-batch-size", str(args.micro_batch_size), "--max-steps", str(args.steps),
           "--log-every", str(args.log_every), "--lr", "1e-4", "--warmup-steps", "10", "--val-dataset", "none",
           "--skip-export", "--compile", "--loss", "chunked", "--output-dir", str(out), *args.extra.split(), *flags]
    shutil.rmtree(out, ignore_errors=True)  # a re-run's row starts fresh (train.py refuses an earlier run's directory)
    started = time.time()
    with open(Path(args.out) / f"{out.name}.log", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").is_file() else []
    steps = [m for m in metrics if "loss" in m]
    timed = [m["tokens_per_s"] for m in steps if m["step"] > args.warmup and m.get("tokens_per_s")]
    mfu = [m["mfu"] for m in steps if m["step"] > args.warmup and m.get("mfu")]
    return {"rc": rc, "wall_s": time.time() - started, "losses": {m["step"]: m["loss"] for m in steps},
            "tokens_per_s": statistics.mean(timed) if timed else None, "mfu": statistics.mean(mfu) if mfu else None,
            "peak": max((m.get("peak_mem_gib") or 0 for m in steps), default=None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama3-8b", help="a preset shape")
    ap.add_argument("--layers", type=int, default=8, help="decoder blocks of the 8B shape (32 in the real model)")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=15, help="steps left out of the throughput (compilation)")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--extra", default="", help="flags added to every row, e.g. '--attn flash --ac full'")
    ap.add_argument("--out", default="runs/fp8-bench")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.rows:
        results[name] = run(name, ROWS[name], args)
        print(f"{name}: exit {results[name]['rc']}, {results[name]['wall_s']:.0f} s", file=sys.stderr, flush=True)
    print(table(results, args))


def table(results: dict, args) -> str:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    base = results.get("bf16", {}).get("tokens_per_s")
    lines = [f"Full fine-tune, {args.model} shape with {args.layers} blocks, seq {args.seq_len} packed, "
             f"micro-batch {args.micro_batch_size}, pure bf16 + AdamW, --compile, --loss chunked "
             f"{args.extra}; {gpu}; git {sha.strip()}; torch {torch.__version__}.",
             f"Command: `python benchmarks/fp8.py {' '.join(sys.argv[1:])}`", "",
             "| row | tokens/s | vs bf16 | MFU (bf16 peak) | peak GiB | loss at last step |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        if r["tokens_per_s"] is None:
            lines.append(f"| {name} | failed (exit {r['rc']}, see {name.replace(' ', '-')}.log) | | | | |")
            continue
        speedup = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        last = r["losses"][max(r["losses"])]
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {speedup} | {100 * (r['mfu'] or 0):.1f}% | "
                     f"{r['peak'] or 0:.1f} | {last:.4f} |")
    steps = sorted({s for r in results.values() for s in r["losses"]})
    lines += ["", "Loss curves (same init and data):", "",
              "| step | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
    for s in steps:
        lines.append(f"| {s} | " + " | ".join(f"{r['losses'][s]:.4f}" if s in r["losses"] else "-"
                                              for r in results.values()) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
