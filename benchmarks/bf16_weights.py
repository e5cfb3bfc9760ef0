"""A full fine-tune on bf16 weights, with torch's AdamW and with --optimizer adamw-sr, beside fp32 weights.

    python benchmarks/bf16_weights.py --model path/to/SmolLM2-135M-Instruct --steps 60 --out bf16-weights.md
    python benchmarks/bf16_weights.py ... --reference bf16-mixed      # on a GPU: fp32 masters under autocast

Three runs of the same full fine-tune of a real checkpoint, one after the other: the docstring task of
benchmarks/fp8_base.py (English the model cannot learn in a few hundred steps), the same seed and
order, the full fine-tune's default learning rate (2e-5). The reference keeps fp32 weights; the other
two store bf16 weights, one updated by torch's AdamW (where an update under half a bf16 step rounds
away), one by adamw-sr (stochastic rounding). The table gives every logged loss, the last lines each
run's mean over the last quarter of the steps against the reference's.
"""

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.fp8_base import docstring_chats, losses  # noqa: E402

RUNS = [("bf16 weights, AdamW", ["--precision", "bf16"]),
        ("bf16 weights, adamw-sr", ["--precision", "bf16", "--optimizer", "adamw-sr"])]


def compare(curves: dict[str, list[tuple[int, float]]]) -> str:
    names = list(curves)
    lines = ["| step | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    steps = [step for step, _ in curves[names[0]]]
    for i, step in enumerate(steps):
        lines.append(f"| {step} | " + " | ".join(f"{curves[n][i][1]:.4f}" for n in names) + " |")
    tail = [i for i, step in enumerate(steps) if step > 0.75 * steps[-1]]
    means = {n: sum(curves[n][i][1] for i in tail) / len(tail) for n in names}
    lines.append("")
    lines += [f"mean over steps after {int(0.75 * steps[-1])}, {n}: {means[n]:.4f} "
              f"({100 * (means[n] - means[names[0]]) / means[names[0]]:+.2f}% against {names[0]})" for n in names]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="a real checkpoint (a Hugging Face directory or hub id)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--reference", choices=["fp32", "bf16-mixed"], default="fp32", help="the fp32 weights' precision")
    p.add_argument("--logs", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    logs = Path(args.logs or tempfile.mkdtemp())
    logs.mkdir(parents=True, exist_ok=True)
    data = docstring_chats(logs / "docstrings.jsonl")
    common = ["--seq-len", str(args.seq_len), "--truncation", "truncate", "--micro-batch-size",
              str(args.micro_batch_size), "--grad-accum", "1", "--seed", "0"]  # long docstrings: cut, not dropped
    runs = [(f"fp32 weights ({args.reference})", ["--precision", args.reference]), *RUNS]
    curves = {name: losses(args.model, data, logs / f"run{i}", args.steps, common + flags)
              for i, (name, flags) in enumerate(runs)}
    text = compare(curves)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
