"""Real-length documents: tokens/s counting only real tokens, nanotune packed vs the peer padded (GPU).

    python benchmarks/real_length.py --model llama3-8b --steps 20 --out real_length.md

The documents follow a typical instruction-tuning length distribution: lognormal token counts
(median 200, mean about 275, cut to [16, 4096]), the shape of Alpaca-style instruction data, in
`{"text"}` records of random letters (one token each with the presets' tokenizer), every token
trained on both sides. The peer (benchmarks/peer.py --data) batches them the Trainer's way: each
micro-batch padded to its longest document, optionally with its length-grouped sampler or
transformers' padding-free DataCollatorWithFlattening. nanotune packs them into --seq-len rows
(--packing). tokens/s and MFU count real tokens and each document's own attention only, so
padding earns nothing on either side.
"""

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora import instruction_length, run_nanotune, run_peer, table  # noqa: E402  (the same harness as the LoRA table)


def instruction_like(path: Path, docs: int, seed: int = 0) -> dict:
    """Write `docs` records with lognormal lengths; returns their length statistics."""
    rng = random.Random(seed)
    lengths = [instruction_length(rng, 16, 4096) for _ in range(docs)]
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=n))}) + "\n"
                            for n in lengths))
    lengths.sort()
    return {"docs": docs, "mean": sum(lengths) / docs, "median": lengths[docs // 2], "p99": lengths[int(0.99 * docs)]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--docs", type=int, default=4000)
    p.add_argument("--out", default=None)
    p.add_argument("--peer-rows", nargs="+", default=[
        "--gradient-checkpointing --liger --micro-batch-size 16",
        "--gradient-checkpointing --liger --micro-batch-size 16 --group-by-length",
        "--gradient-checkpointing --liger --micro-batch-size 16 --padding-free"])
    p.add_argument("--rows", nargs="+",
                   default=["--packing --attn flash --lora-kernels --compile --micro-batch-size 2"])
    args = p.parse_args()
    args.qlora, args.full = False, False
    tmp = Path(tempfile.mkdtemp())
    data = tmp / "instructions.jsonl"
    stats = instruction_like(data, args.docs)
    print(stats, flush=True)
    lora = ["--lora", "--lora-rank", "16", "--precision", "bf16"]
    rows = []
    for settings in args.peer_rows:
        rows.append(("peer", "SDPA " + settings, run_peer(args, [*settings.split(), "--data", str(data)], tmp)))
        print(rows[-1], flush=True)
    for settings in args.rows:
        rows.append(("nanotune", " ".join(lora + settings.split()),
                     run_nanotune(args, lora + settings.split(), data, tmp, fmt="completion")))
        print(rows[-1], flush=True)
    peers = [r["tokens_per_s"] for s, _, r in rows if s == "peer" and "tokens_per_s" in r]
    text = (f"documents: {stats}\n\n" + table(rows, max(peers) if peers else float("nan")))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
