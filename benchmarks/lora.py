"""nanotune vs the peer (HF Trainer + peft), LoRA, one command, one table (GPU).

    python benchmarks/lora.py --model llama3-8b --seq-len 4096 --steps 20 --out benchmarks/results/lora.md
    python benchmarks/lora.py --qlora ...            # NF4 base on both sides
    python benchmarks/lora.py --full --model llama3.2-1b --peer-rows "--liger --micro-batch-size 4" \
        --rows "--attn flash --compile --micro-batch-size 4"   # full fine-tuning (6N FLOPs per token)
    python benchmarks/lora.py --unsloth-rows "--micro-batch-size 2" ...   # Unsloth rows too (unsloth_peer.py)

Both sides: the same preset shape with random weights, bf16 base, LoRA r=16 on every linear layer
of the decoder, micro-batch 1, full-length rows (the peer: random token ids; nanotune: random
text in --dataset-format pretrain blocks, so no padding either). Each row is a separate process.
Throughput: the peer's median CUDA-synchronised step time after 5 warm-up steps; nanotune's
tokens/s over its last logging window (steps 11-20). MFU: model FLOPs (core/model.py
train_flops: 4N per token for a frozen base, 6N when every weight trains,
+ attention 12 * layers * heads * head_dim * seq) against the 989 TFLOP/s datasheet peak and the
783 TFLOP/s measured bf16 matmul ceiling. Unsloth rows (LoRA and QLoRA only) count as peers in
"vs best peer".
"""

import argparse
import json
import math
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEAK, MATMUL = 989e12, 783e12


def random_text(path: Path, docs: int, letters: int) -> Path:
    rng = random.Random(0)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=letters))})
                            + "\n" for _ in range(docs)))
    return path


def instruction_length(rng: random.Random, low: int, high: int) -> int:
    """A document length of instruction-tuning data: lognormal, median 200 tokens, cut to [low, high]."""
    return min(high, max(low, round(rng.lognormvariate(math.log(200), 0.8))))


def run_peer(args, extra: list[str], tmp: Path, script: str = "peer.py") -> dict:
    out = tmp / f"peer{len(list(tmp.glob('peer*')))}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--model", args.model, "--seq-len", str(args.seq_len),
           "--steps", str(args.steps), "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1][:120]}
    return json.loads(out.read_text())


def run_nanotune(args, extra: list[str], data: Path, tmp: Path, fmt: str = "pretrain") -> dict:
    out = tmp / f"nt{len(list(tmp.glob('nt*')))}"
    cmd = [sys.executable, str(ROOT / "train.py"), "--model", args.model, "--seq-len", str(args.seq_len),
           "--dataset", str(data), "--dataset-format", fmt, "--val-dataset", "none",
           "--micro-batch-size", "1", "--max-steps", str(args.steps), "--log-every", "10", "--warmup-steps", "0",
           "--lr", "1e-4", "--eval-exact-match", "0", "--skip-export", "--output-dir", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:120]}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    last = steps[-1]
    return {"tokens_per_s": last["tokens_per_s"], "peak_gib": last["peak_mem_gib"],
            "tflops": last["mfu"] * PEAK / 1e12, "first_losses": [round(m["loss"], 3) for m in steps[:2]],
            "grad_norms": [round(m["grad_norm"], 3) for m in steps[:2]]}


def table(rows: list[tuple[str, str, dict]], peer_best: float) -> str:
    lines = ["| side | settings | tokens/s | vs best peer | peak GiB | MFU (989) | MFU (783) | losses | grad norms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for side, settings, r in rows:
        if "error" in r:
            lines.append(f"| {side} | {settings} | failed: {r['error']} | | | | | | |")
            continue
        t = r["tflops"] * 1e12
        lines.append(f"| {side} | {settings} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / peer_best:.2f}x | "
                     f"{r['peak_gib']:.1f} | {100 * t / PEAK:.1f}% | {100 * t / MATMUL:.1f}% | "
                     f"{r['first_losses']} | {r['grad_norms']} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=None)
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--qlora", action="store_true", help="QLoRA on both sides instead of LoRA")
    p.add_argument("--full", action="store_true", help="full fine-tuning on both sides instead of LoRA")
    p.add_argument("--rows", nargs="+", default=["--attn flash", "--attn flash --lora-kernels"],
                   help="nanotune rows: extra train.py flags for each (a later --micro-batch-size wins)")
    p.add_argument("--peer-rows", nargs="+", default=["--gradient-checkpointing --liger", "--gradient-checkpointing"],
                   help="peer rows: extra benchmarks/peer.py flags for each")
    p.add_argument("--unsloth-rows", nargs="+", default=[],
                   help="Unsloth rows: extra benchmarks/unsloth_peer.py flags for each (none by default)")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    data = random_text(tmp / "random.jsonl", docs=args.steps * 5, letters=args.seq_len + 64)
    lora = ["--qlora" if args.qlora else "--lora", "--lora-rank", "16", "--precision", "bf16"]
    q = ["--qlora"] if args.qlora else []
    if args.full:  # every weight trains: no adapter on either side
        lora, q = ["--precision", "bf16"], ["--full"]
    rows = []
    for settings in ([] if args.skip_peer else args.peer_rows):
        rows.append(("peer", "SDPA " + settings + " ".join([""] + q), run_peer(args, [*settings.split(), *q], tmp)))
        print(rows[-1], flush=True)
    for settings in ([] if args.skip_peer or args.full else args.unsloth_rows):
        rows.append(("unsloth", settings + " ".join([""] + q), run_peer(args, [*settings.split(), *q], tmp,
                                                                          "unsloth_peer.py")))
        print(rows[-1], flush=True)
    for settings in (r.split() for r in args.rows):
        rows.append(("nanotune", " ".join(lora + settings), run_nanotune(args, lora + settings, data, tmp)))
        print(rows[-1], flush=True)
    peers = [r["tokens_per_s"] for s, _, r in rows if s in ("peer", "unsloth") and "tokens_per_s" in r]
    text = table(rows, max(peers) if peers else float("nan"))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
