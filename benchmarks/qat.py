"""QAT vs post-training quantization (PTQ) of the same fine-tune, on the embedded task (CPU).

    python benchmarks/qat.py --steps 600 --seeds 0 1 --out runs/qat-bench > table.md

For each seed: one plain fine-tune of tiny-llama, evaluated in fp32 and after PTQ with each scheme
(torchao's quantize_ with the same config QAT converts with), and one --qat fine-tune per scheme
(same seed, data order and steps), evaluated after convert. Held-out loss and greedy exact match
on the validation split; the table is printed last (Markdown), with the command, git SHA and
versions. QAT should recover most of the gap between PTQ and fp32.
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from features import qat  # noqa: E402
from features.data import DataConfig, load_splits  # noqa: E402
from features.distributed import Dist  # noqa: E402
from features.evaluate import exact_match, validation_loss  # noqa: E402
from features.model import ModelConfig, load_tokenizer  # noqa: E402


def train(out: Path, seed: int, steps: int, *flags: str) -> Path:
    """A train.py run (no evaluation in it: every model is scored below on the same data)."""
    if not (out / "final").is_dir():
        cmd = [sys.executable, str(ROOT / "train.py"), "--output-dir", str(out), "--seed", str(seed),
               "--max-steps", str(steps), "--val-dataset", "none", "--log-every", "100", *flags]
        subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def score(model, val, tok, n_em: int) -> tuple[float, float]:
    import contextlib

    d, ctx = Dist(), contextlib.nullcontext()
    return (validation_loss(model, val.samples, 32, tok.pad_token_id, d, ctx),
            exact_match(model, val.samples, n_em, tok, d, ctx))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--schemes", nargs="+", default=["int8-int4", "int4"])
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--exact-match", type=int, default=256, help="validation samples answered greedily")
    ap.add_argument("--out", default="runs/qat-bench")
    args = ap.parse_args()
    import transformers

    tok = load_tokenizer(ModelConfig())
    rows: dict[tuple, list] = {}
    started = time.time()
    _, val = load_splits(DataConfig(), tok, seed=0)  # data/val.jsonl: the same held-out set for every run
    for seed in args.seeds:
        plain = train(Path(args.out) / f"plain-s{seed}", seed, args.steps)
        model = transformers.AutoModelForCausalLM.from_pretrained(plain / "final")
        rows.setdefault(("fp32 fine-tune", "-"), []).append(score(model, val, tok, args.exact_match))
        for scheme in args.schemes:
            cfg = qat.QatConfig(qat=True, qat_scheme=scheme, qat_group_size=args.group_size)
            ptq = transformers.AutoModelForCausalLM.from_pretrained(plain / "final")
            qat._torchao()[0].quantize_(ptq, qat.base_config(cfg),
                                        filter_fn=lambda m, _, head=ptq.get_output_embeddings():
                                        isinstance(m, torch.nn.Linear) and m is not head)
            rows.setdefault(("PTQ", scheme), []).append(score(ptq, val, tok, args.exact_match))
            run = train(Path(args.out) / f"qat-{scheme}-s{seed}", seed, args.steps, "--qat", "--qat-scheme",
                        scheme, "--qat-group-size", str(args.group_size))
            rows.setdefault(("QAT", scheme), []).append(
                score(qat.load_quantized(run / "final-quantized"), val, tok, args.exact_match))
    print(table(rows, args, time.time() - started))


def _mean_spread(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.4f} ± {statistics.pstdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"


def table(rows: dict, args, seconds: float) -> str:
    import torchao
    import transformers

    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    lines = [f"QAT vs PTQ, tiny-llama on the embedded task, {args.steps} steps, group size {args.group_size}, "
             f"seeds {args.seeds} (mean ± spread over seeds), {args.exact_match} exact-match samples.",
             f"Command: `python benchmarks/qat.py {' '.join(sys.argv[1:])}`; git {sha.strip()}; torch "
             f"{torch.__version__}, torchao {torchao.__version__}, transformers {transformers.__version__}; "
             f"{torch.get_num_threads()} CPU threads; {seconds / 60:.1f} min.", "",
             "| model | scheme | held-out loss | exact match | loss gap to fp32 |", "|---|---|---|---|---|"]
    base = statistics.mean(loss for loss, _ in rows[("fp32 fine-tune", "-")])
    for (kind, scheme), results in rows.items():
        losses, ems = [r[0] for r in results], [100 * r[1] for r in results]
        ems_text = f"{statistics.mean(ems):.1f}%" + (f" ± {statistics.pstdev(ems):.1f}" if len(ems) > 1 else "")
        lines.append(f"| {kind} | {scheme} | {_mean_spread(losses)} | {ems_text} | "
                     f"{statistics.mean(losses) - base:+.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
