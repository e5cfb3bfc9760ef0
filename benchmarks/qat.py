"""QAT vs post-training quantization (PTQ) of the same fine-tune, on the embedded task (CPU).

    python benchmarks/qat.py --steps 1000 --seeds 0 1 2 --schemes int2 --group-size 128 --qat-start-step 500 \
        --exact-match 128 --out runs/qat-bench-int2 > table.md

For each seed: one plain fine-tune of tiny-llama, evaluated in fp32 and after PTQ with each scheme
(torchao's quantize_ with the same config QAT converts with), and one --qat fine-tune per scheme
(same seed, data order and steps), evaluated after convert. Held-out loss and greedy exact match
on the validation split; the tables are printed last (Markdown), with the command, git SHA and
versions: the mean over seeds, and the held-out loss of each seed. QAT should recover most of the
gap between PTQ and fp32: "gap recovered" = (PTQ - QAT) / (PTQ - fp32), 100% = QAT lost nothing
to quantization, 0% = no better than PTQ. On this tiny model int4 PTQ loses almost nothing
(benchmarks/results/2026-11-25-qat-cpu.md); 2-bit weights are where PTQ has a clear gap.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from features import qat  # noqa: E402
from core.data import DataConfig, load_splits  # noqa: E402
from core.distributed import Dist  # noqa: E402
from core.evaluate import exact_match, validation_loss  # noqa: E402
from core.model import ModelConfig, load_tokenizer  # noqa: E402


def launch(out: Path, seed: int, args, *flags: str):
    """Start a train.py run (no evaluation in it: every model is scored below on the same data);
    None if its final model exists already (a re-run only scores)."""
    if (out / "final").is_dir():
        return None
    cmd = [sys.executable, str(ROOT / "train.py"), "--output-dir", str(out), "--seed", str(seed),
           "--max-steps", str(args.steps), "--micro-batch-size", str(args.micro_batch_size),
           "--val-dataset", "none", "--log-every", "100", *flags]
    shutil.rmtree(out, ignore_errors=True)  # a run killed before its final model starts again
    out.mkdir(parents=True, exist_ok=True)
    # one thread per run, all runs at once: on a shared 2-core box that beats 2 threads in turn
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(out / "train.log", "w"), stderr=subprocess.STDOUT)


def score(model, val, tok, n_em: int) -> tuple[float, float]:
    import contextlib

    d, ctx = Dist(), contextlib.nullcontext()
    return (validation_loss(model, val.samples, 32, tok.pad_token_id, d, ctx),
            exact_match(model, val.samples, n_em, tok, d, ctx))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--schemes", nargs="+", default=["int8-int4", "int4"])
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--qat-start-step", type=int, default=1,
                    help="QAT runs train plain until this step, then fake-quantized (train.py's --qat-start-step)")
    ap.add_argument("--micro-batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per training run (all run at once)")
    ap.add_argument("--exact-match", type=int, default=256, help="validation samples answered greedily")
    ap.add_argument("--out", default="runs/qat-bench")
    args = ap.parse_args()
    import transformers

    tok = load_tokenizer(ModelConfig())
    _, val = load_splits(DataConfig(), tok)  # data/val.jsonl: the same held-out set for every run
    rows: dict[tuple, list] = {}
    started = time.time()
    start = f"-from{args.qat_start_step}" if args.qat_start_step > 1 else ""
    runs = {(seed, scheme): Path(args.out) / (f"qat-{scheme}{start}-s{seed}" if scheme else f"plain-s{seed}")
            for seed in args.seeds for scheme in [None, *args.schemes]}
    qat_flags = ("--qat-start-step", str(args.qat_start_step)) if start else ()
    procs = [launch(out, seed, args, *(("--qat", "--qat-scheme", scheme, "--qat-group-size", str(args.group_size),
                                        *qat_flags) if scheme else ())) for (seed, scheme), out in runs.items()]
    if any(p is not None and p.wait() != 0 for p in procs):
        sys.exit(f"a training run failed; see {args.out}/*/train.log")
    for seed in args.seeds:
        plain = runs[(seed, None)] / "final"
        model = transformers.AutoModelForCausalLM.from_pretrained(plain)
        rows.setdefault(("fp32 fine-tune", "-"), []).append(score(model, val, tok, args.exact_match))
        for scheme in args.schemes:
            cfg = qat.QatConfig(qat=True, qat_scheme=scheme, qat_group_size=args.group_size)
            ptq = qat.quantize_dir(plain, cfg)  # the same config and layers QAT's convert quantizes
            rows.setdefault(("PTQ", scheme), []).append(score(ptq, val, tok, args.exact_match))
            quantized = qat.load_quantized(runs[(seed, scheme)] / "final-quantized")
            rows.setdefault(("QAT", scheme), []).append(score(quantized, val, tok, args.exact_match))
    print(table(rows, args, time.time() - started))
    print()
    print(per_seed(rows, args))


def _mean_spread(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.4f} ± {statistics.pstdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"


def table(rows: dict, args, seconds: float) -> str:
    import torchao
    import transformers

    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    lines = [f"QAT vs PTQ, tiny-llama on the embedded task, {args.steps} steps of {args.micro_batch_size} samples, "
             f"group size {args.group_size}, QAT from step {args.qat_start_step}, "
             f"seeds {args.seeds} (mean ± spread over seeds), {args.exact_match} exact-match samples.",
             f"Command: `python benchmarks/qat.py {' '.join(sys.argv[1:])}`; git {sha.strip()}; torch "
             f"{torch.__version__}, torchao {torchao.__version__}, transformers {transformers.__version__}; "
             f"{torch.get_num_threads()} CPU threads; {seconds / 60:.1f} min.", "",
             "| model | scheme | held-out loss | exact match | loss gap to fp32 | gap recovered |",
             "|---|---|---|---|---|---|"]
    mean = {key: statistics.mean(r[0] for r in results) for key, results in rows.items()}
    base = mean[("fp32 fine-tune", "-")]
    for (kind, scheme), results in rows.items():
        losses, ems = [r[0] for r in results], [100 * r[1] for r in results]
        ems_text = f"{statistics.mean(ems):.1f}%" + (f" ± {statistics.pstdev(ems):.1f}" if len(ems) > 1 else "")
        recovered = _recovered(base, mean[("PTQ", scheme)], mean[(kind, scheme)]) if kind == "QAT" else ""
        lines.append(f"| {kind} | {scheme} | {_mean_spread(losses)} | {ems_text} | "
                     f"{mean[(kind, scheme)] - base:+.4f} | {recovered} |")
    return "\n".join(lines)


def _recovered(fp: float, ptq: float, qat_loss: float) -> str:
    """(PTQ - QAT) / (PTQ - fp32) as a percentage of the PTQ gap."""
    return f"{100 * (ptq - qat_loss) / (ptq - fp):.0f}%" if ptq - fp > 0 else "no PTQ gap"


def per_seed(rows: dict, args) -> str:
    """Held-out loss of each seed: PTQ and its fp32 baseline are the same training run, QAT another."""
    lines = ["| scheme | seed | fp32 | PTQ | QAT | PTQ gap | gap recovered |", "|---|---|---|---|---|---|---|"]
    for scheme in args.schemes:
        for i, seed in enumerate(args.seeds):
            fp, ptq, q = (rows[key][i][0] for key in [("fp32 fine-tune", "-"), ("PTQ", scheme), ("QAT", scheme)])
            lines.append(f"| {scheme} | {seed} | {fp:.4f} | {ptq:.4f} | {q:.4f} | {ptq - fp:+.4f} | "
                         f"{_recovered(fp, ptq, q)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
