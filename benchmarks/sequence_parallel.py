"""The longest sequence that trains with sequence parallelism over N GPUs (issue 12).

    python benchmarks/sequence_parallel.py --gpus 8 --budget-s 420 --out sp.md    # see gpu_sp.sh

Llama-3.1-8B shape (random weights, bf16), LoRA r=16, micro-batch 1, one row holding ONE document
of the full length (full causal attention, no packing shortcut), `--cp N --sp-mode ulysses --attn
flash` with the memory features of each row (ROWS: the --alst recipe under --fsdp, and a DDP row). A try is one training step in its own torchrun, so an
out-of-memory error ends only that try. Lengths double from --start until a failure, the time
budget or --max-len; each row gets an equal share of the budget, and a try is started only when
its predicted time (the last step time x (L'/L)^2, attention is quadratic, plus start-up) fits.
tokens/s is that one step's (warm-up included); peak GiB is rank 0's torch max allocated memory.
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
ROWS = [  # (label, flags). --alst under DDP failed on 2026-11-25 (CPU check: --tiled-mlp under DDP, "mark a
          # variable ready only once"), so the recipe runs with --fsdp (base weights sharded over the cp ranks)
    ("ulysses, --fsdp, --alst (tiled MLP, chunked loss, CPU offload, --ac full)", ["--sp-mode", "ulysses", "--fsdp", "--alst"]),
    ("ulysses, DDP, --ac full --loss chunked --offload cpu", ["--sp-mode", "ulysses", "--ac", "full", "--loss", "chunked",
                                                             "--offload", "cpu"]),
]


def _text(path: Path, tokens: int) -> Path:
    """One document of random letters (the embedded tokenizer: about one token per letter + space)."""
    if not path.exists():
        rng = random.Random(0)
        path.write_text(json.dumps({"text": " ".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=tokens + 256))}) + "\n")
    return path


def try_length(args, seq_len: int, flags: list[str], tmp: Path, timeout: float) -> dict:
    run = tmp / f"run-{len(list(tmp.glob('run-*')))}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.gpus), "--master_port", "29577",
           str(ROOT / "train.py"), "--model", args.model, "--lora", "--lora-rank", "16", "--precision", "bf16",
           "--attn", args.attn, "--cp", str(args.gpus), "--seq-len", str(seq_len),
           "--dataset", str(_text(tmp / f"text-{seq_len}.jsonl", seq_len)), "--dataset-format", "pretrain",
           "--val-dataset", "none", "--micro-batch-size", "1", "--max-steps", "1", "--log-every", "1",
           "--warmup-steps", "0", "--eval-exact-match", "0", "--skip-export", "--output-dir", str(run), *flags]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return {"status": "time", "wall_s": time.perf_counter() - start}
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        text = (proc.stderr + proc.stdout).lower()
        status = "oom" if "out of memory" in text or "outofmemoryerror" in text else "error"
        tail = [line for line in proc.stderr.strip().splitlines() if "Error" in line or "error" in line]
        return {"status": status, "wall_s": wall, "error": (tail or ["?"])[-1][:200]}
    step = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    step = [m for m in step if "loss" in m][-1]
    return {"status": "ok", "wall_s": wall, "tokens_per_s": step["tokens_per_s"], "peak_gib": step["peak_mem_gib"],
            "loss": step["loss"]}


def search(args, flags, tmp: Path, deadline: float, log) -> list[tuple[int, dict]]:
    tries, seq_len, overhead = [], args.start, 60.0
    while seq_len <= args.max_len:
        left = deadline - time.perf_counter()
        fits = [(n, r) for n, r in tries if r["status"] == "ok"]
        if fits:
            n, r = fits[-1]
            predicted = overhead + n / r["tokens_per_s"] * (seq_len / n) ** 2
            if predicted > left:
                tries.append((seq_len, {"status": "time (predicted %.0f s)" % predicted}))
                break
        result = try_length(args, seq_len, flags, tmp, left)
        tries.append((seq_len, result))
        log({"flags": flags, "seq_len": seq_len, **result})
        if result["status"] != "ok":
            break
        overhead = max(10.0, result["wall_s"] - seq_len / result["tokens_per_s"])
        seq_len *= 2
    return tries


def table(args, rows) -> str:
    lines = [f"| {args.gpus} GPUs: settings | longest sequence that trained | tokens/s | peak GiB (rank 0) | tries |",
             "|---|---|---|---|---|"]
    for label, tries in rows:
        fits = [(n, r) for n, r in tries if r["status"] == "ok"]
        n, r = fits[-1] if fits else (0, {})
        done = ", ".join(f"{m // K}K {x['status']}" for m, x in tries)
        lines.append(f"| {label} | {f'{n // K}K' if n else 'none'} | {r.get('tokens_per_s', 0):,.0f} | "
                     f"{r.get('peak_gib', 0):.1f} | {done} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--model", default="llama3-8b", help="a preset (tiny-llama --attn sdpa: a CPU check of this script)")
    p.add_argument("--attn", default="flash")
    p.add_argument("--budget-s", type=float, default=420)
    p.add_argument("--start", type=int, default=128 * K)
    p.add_argument("--max-len", type=int, default=8192 * K)
    p.add_argument("--out", default=None)
    p.add_argument("--logs", default=None)
    args = p.parse_args()
    tmp, t0 = Path(tempfile.mkdtemp()), time.perf_counter()
    log_file = open(args.logs, "a") if args.logs else None

    def log(record):
        print(json.dumps(record), flush=True)
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    rows = []
    for i, (label, flags) in enumerate(ROWS):
        share = (args.budget_s - (time.perf_counter() - t0)) / (len(ROWS) - i)
        rows.append((label, search(args, flags, tmp, time.perf_counter() + share, log)))
    note = (f"\n{args.model} (llama3-8b = the Llama-3.1-8B shape), LoRA r=16, bf16, one document per row, one step "
            f"per try, {torch_version()}; budget {args.budget_s:.0f} s (used {time.perf_counter() - t0:.0f} s)")
    text = table(args, rows) + "\n" + note
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


def torch_version() -> str:
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"torch {torch.__version__}, {name}, PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '')}"


if __name__ == "__main__":
    main()
