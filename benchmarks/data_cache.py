"""Start-up with the tokenized-sample cache (core/data_cache.py): load_splits with no cache, a first
run that fills it, and a second run that reads it (CPU).

    python benchmarks/data_cache.py [--tokenizer DIR] [--chats 20000] [--out table.md]

Two datasets: the repo's demo data (data/train.jsonl, alpaca, the default tokenizer) and --chats
generated two-turn conversations (a system prompt, two questions, two answers) rendered with the
chat template of --tokenizer (default: the repo's tokenizer). Each row is the best of --repeat runs,
in seconds; the cache sits in a temporary directory.
"""

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from core.data import DataConfig, load_splits  # noqa: E402
from core.model import ModelConfig, load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def chats(path: Path, n: int) -> Path:
    rng, words = random.Random(0), "the a of model data train loss step token batch layer".split()
    say = lambda k: " ".join(rng.choices(words, k=k))  # noqa: E731
    with path.open("w") as f:
        for _ in range(n):
            messages = [{"role": "system", "content": say(8)}]
            for _ in range(2):
                messages += [{"role": "user", "content": say(20)}, {"role": "assistant", "content": say(40)}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def seconds(cfg: DataConfig, tok, repeat: int, empty_cache: bool = False) -> float:
    """The best of `repeat` load_splits; empty_cache: each in a cache directory of its own, still empty."""
    best = float("inf")
    for _ in range(repeat):
        run = dataclasses.replace(cfg, data_cache=tempfile.mkdtemp()) if empty_cache else cfg
        start = time.perf_counter()
        load_splits(run, tok)
        best = min(best, time.perf_counter() - start)
    return best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--chats", type=int, default=20000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    demo_tok = load_tokenizer(ModelConfig())
    chat_tok = load_tokenizer(ModelConfig(tokenizer=args.tokenizer)) if args.tokenizer else demo_tok
    sets = [("demo (data/train.jsonl, alpaca)", str(ROOT / "data" / "train.jsonl"), demo_tok),
            (f"{args.chats:,} two-turn chats", str(chats(tmp / "chats.jsonl", args.chats)), chat_tok)]
    lines = ["| data | no cache (s) | first run, fills the cache (s) | next runs, read it (s) | speed-up |",
             "|---|---|---|---|---|"]
    for i, (name, path, tok) in enumerate(sets):
        cfg = DataConfig(dataset=path, val_dataset="none", data_cache=str(tmp / f"cache{i}"))
        none = seconds(dataclasses.replace(cfg, data_cache="none"), tok, args.repeat)
        first = seconds(cfg, tok, args.repeat, empty_cache=True)
        load_splits(dataclasses.replace(cfg), tok)  # fills cfg's cache: every timed run below reads it
        hit = seconds(cfg, tok, args.repeat)
        lines.append(f"| {name} | {none:.2f} | {first:.2f} | {hit:.2f} | {none / hit:.1f}x |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
