"""What a user gets with no tuning flag, beside the tuned recipe and the Hugging Face baseline (GPU).

    python benchmarks/defaults.py --model llama3-8b --method lora  --out lora.md
    python benchmarks/defaults.py --model llama3-8b --method qlora --out qlora.md
    python benchmarks/defaults.py --model llama3.2-1b --method qlora --rows headline --out 1b.md
    python benchmarks/defaults.py --model llama3.2-1b --method full --rows baseline defaults --out full.md

One command, one table, each row its own process on the same GPU:
  baseline  the Hugging Face Trainer + peft baseline (benchmarks/peer.py: SDPA + Liger, no activation
            checkpointing, LoRA r=16 on every linear, bf16, full-length random rows of --seq-len; QLoRA
            without peft's prepare_model_for_kbit_training, whose fp32 upcasts cost it speed and memory)
            at micro-batch 2, the default micro-batch of nanotune for a real model, and at 4;
  tuned     nanotune's tuned recipe, every speed flag by hand: --precision bf16 --lora-kernels
            --compile --packing --attn flash --micro-batch-size 4 --grad-accum 1;
  defaults  `train.py --model M --lora --dataset X` (no adapter flag for --method full), no other flag
            but the harness's own (steps, output, no evaluation: its seconds are not training
            throughput); --defaults-with "FLAGS" adds a defaults row with FLAGS;
  headline  `train.py --packing --attn flash --qlora --model M --dataset X` (the README's command line);
            --headline-with "FLAGS" adds a headline row with FLAGS (an ablation of one default);
  unsloth   Unsloth at micro-batch 2, its own best settings (benchmarks/unsloth_peer.py; its random
            weights saved once to --unsloth-checkpoint-dir), or its error and versions;
  fp8-base  the defaults row with --fp8-base (LoRA only: the frozen base's matmuls in FP8).
--method full: a full fine-tune (no adapter), the baseline with --full; rows baseline and defaults only.
X is a chat dataset (`messages`) of random-letter conversations of exactly 4,096 tokens, so packed
rows are full like the baseline's and the automatic --seq-len is 4096. With --lengths instruction the
conversations have instruction-tuning lengths (median 200 tokens) and the baseline trains the same
ones, rendered by the chat template and padded per micro-batch; a local checkpoint directory as
--model brings its tokenizer and its weights to every row:
    python benchmarks/defaults.py --model DIR --rows baseline defaults --lengths instruction --samples 3000 \
        --baseline-micro-batch 8 16 32 --baseline-with "--micro-batch-size 16 --group-by-length"
Throughput: tokens/s over the last logging window (the baseline: its median synchronised step after
warm-up, its mean with --lengths instruction, whose step lengths vary); MFU from the same model FLOPs
(core/model.py train_flops) against the 989 TFLOP/s datasheet peak and the 783 TFLOP/s measured bf16
matmul ceiling; peak memory: torch.cuda.max_memory_allocated.
"""

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.lora import MATMUL, PEAK, instruction_length, run_peer  # noqa: E402

TUNED = "--precision bf16 --lora-kernels --compile --packing --attn flash --micro-batch-size 4 --grad-accum 1"


def chat_data(path: Path, n: int, tokenizer_dir: Path, tokens: int = 4096, lengths: str = "full") -> Path:
    """n conversations of random letters. lengths "full": each chat rendering is exactly `tokens`
    long, so one fills a packed row, as full as the baselines' random rows. "instruction": lognormal
    lengths (median 200 tokens, mean about 275, cut to [64, tokens]), the shape of instruction-tuning
    data, as benchmarks/real_length.py draws them. tokens/s counts real tokens only."""
    from transformers import AutoTokenizer

    tok, rng = AutoTokenizer.from_pretrained(tokenizer_dir), random.Random(0)
    lines = []
    for _ in range(n):
        want = tokens if lengths == "full" else instruction_length(rng, 64, tokens)
        words = lambda k: " ".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=k))  # noqa: E731
        messages = [{"role": "user", "content": words(want // 2)},
                    {"role": "assistant", "content": words(want // 2)}]
        for m in (messages[1], messages[0]):  # the answer's letters first; each turn keeps one at least
            while (excess := len(tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False,
                                     verbose=False)["input_ids"]) - want) > 0 and len(m["content"]) > 1:
                m["content"] = m["content"][:max(1, len(m["content"]) - 2 * excess)]  # a letter and its space: a token
        lines.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(lines) + "\n")
    return path


def rendered(chats: Path, tokenizer_dir: Path) -> Path:
    """The same conversations as {"text"} records, each its chat-template rendering: what the
    baseline trains with --data (padded to the longest of each micro-batch, the Trainer's way)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = chats.with_name("rendered.jsonl")
    out.write_text("".join(json.dumps({"text": tok.apply_chat_template(json.loads(line)["messages"], tokenize=False)})
                           + "\n" for line in chats.read_text().splitlines()))
    return out


def run_train(flags: list[str], data: Path, out: Path, steps: int) -> dict:
    harness = ["--dataset", str(data), "--val-dataset", "none", "--eval-exact-match", "0", "--max-steps", str(steps),
               "--log-every", str(steps // 2), "--skip-export", "--output-dir", str(out)]
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)  # a re-run's row starts fresh (train.py refuses an earlier run's directory)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *flags, *harness], capture_output=True, text=True)
    (out.parent / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:160]}
    steps_logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in steps_logged if "loss" in m][-1]
    auto = json.loads((out / "config.json").read_text()).get("auto", [])
    return {"tokens_per_s": last["tokens_per_s"], "peak_gib": last["peak_mem_gib"],
            "tflops": (last["mfu"] or 0) * PEAK / 1e12, "loss": round(last["loss"], 3), "auto": auto}


def rows_for(args) -> list[tuple[str, str, list[str]]]:
    adapter = {"qlora": ["--qlora"], "lora": ["--lora"], "full": []}[args.method]
    lr = "2e-5" if args.method == "full" else "2e-4"
    model = ["--model", args.model, *adapter]
    rows = {
        "baseline": [("baseline", f"micro-batch {m}", ["--liger", "--micro-batch-size", str(m)])
                     for m in args.baseline_micro_batch]
                    + [("baseline", extra, ["--liger", *extra.split()]) for extra in args.baseline_with],
        "tuned": [("tuned", TUNED, [*model, "--lr", lr, *TUNED.split()])],
        "defaults": [("defaults", " ".join(model), model)],
        "headline": [("headline", f"--packing --attn flash --qlora --model {args.model}",
                      ["--packing", "--attn", "flash", "--qlora", "--model", args.model])],
        "unsloth": [("unsloth", "micro-batch 2", ["--micro-batch-size", "2", "--checkpoint-dir",
                                                  args.unsloth_checkpoint_dir])],
        "fp8-base": [("fp8 base", f"--model {args.model} --lora --fp8-base",
                      ["--model", args.model, "--lora", "--fp8-base"])],
    }
    variants = [("headline", f"--packing --attn flash --qlora --model {args.model} {extra}",
                 ["--packing", "--attn", "flash", "--qlora", "--model", args.model, *extra.split()])
                for extra in args.headline_with]
    variants += [("defaults", f"{' '.join(model)} {extra}", [*model, *extra.split()]) for extra in args.defaults_with]
    return [row for name in args.rows for row in rows[name]] + variants


def table(results: list[tuple[str, str, dict]]) -> str:
    def best(side: str) -> float | None:
        return max((r["tokens_per_s"] for s, _, r in results if s == side and "tokens_per_s" in r), default=None)

    def ratio(x: float, ref: float | None) -> str:
        return f"{x / ref:.2f}" if ref else "-"

    tuned, baseline = best("tuned"), best("baseline")
    lines = ["| row | command | tokens/s | vs tuned | vs baseline | peak GiB | MFU (989) | MFU (783) | last loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for side, what, r in results:
        if "error" in r:
            lines.append(f"| {side} | {what} | failed: {r['error']} | | | | | | |")
            continue
        t, tps = r["tflops"] * 1e12, r["tokens_per_s"]
        lines.append(f"| {side} | `{what}` | {tps:,.0f} | {ratio(tps, tuned)} | {ratio(tps, baseline)} | "
                     f"{r['peak_gib']:.1f} | {100 * t / PEAK:.1f}% | {100 * t / MATMUL:.1f}% | {r.get('loss', '-')} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--method", choices=["lora", "qlora", "full"], default="lora")
    p.add_argument("--rows", nargs="*", default=["baseline", "tuned", "defaults", "headline"],
                   choices=["baseline", "unsloth", "tuned", "defaults", "headline", "fp8-base"],
                   help="none: only the --headline-with / --defaults-with rows")
    p.add_argument("--baseline-micro-batch", type=int, nargs="*", default=[2, 4])
    p.add_argument("--headline-with", nargs="*", default=[], metavar="FLAGS",
                   help='more headline rows, each with these flags added (e.g. "--loss ce")')
    p.add_argument("--defaults-with", nargs="*", default=[], metavar="FLAGS",
                   help='more defaults rows, each with these flags added (e.g. "--loss chunked")')
    p.add_argument("--unsloth-checkpoint-dir", default="/tmp/unsloth-random-weights",
                   help="where the unsloth row saves the random weights it loads (16 GB for 8B; not under --logs)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--samples", type=int, default=160, help="conversations (--lengths instruction: take 3000)")
    p.add_argument("--lengths", choices=["full", "instruction"], default="full",
                   help="full: every conversation 4,096 tokens, the baseline on random full rows; instruction: "
                        "lognormal lengths, the baseline on the same conversations, padded")
    p.add_argument("--baseline-with", nargs="*", default=[], metavar="FLAGS",
                   help='more baseline rows (benchmarks/peer.py flags), e.g. "--micro-batch-size 16 --group-by-length"')
    p.add_argument("--logs", default=None, help="folder for each row's log and run directory")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.method == "full" and {"tuned", "unsloth", "fp8-base", "headline"} & set(args.rows):
        p.error("--method full: the tuned, unsloth, fp8-base and headline rows are adapter rows; drop them "
                "(a tuned full fine-tune is a --defaults-with row)")
    logs = Path(args.logs or tempfile.mkdtemp())
    logs.mkdir(parents=True, exist_ok=True)
    tokenizer = Path(args.model) if Path(args.model).is_dir() else ROOT / "data" / "tokenizer"
    data = chat_data(logs / "chats.jsonl", args.samples, tokenizer, lengths=args.lengths)
    peer_args = argparse.Namespace(model=args.model, seq_len=4096, steps=args.steps + 8)
    baseline_method = {"qlora": ["--qlora", "--no-kbit-prep"], "full": ["--full"]}.get(args.method, [])
    if args.lengths == "instruction":  # the baseline trains the same conversations, padded
        baseline_method += ["--data", str(rendered(data, tokenizer))]
    unsloth_method = ["--qlora"] if args.method == "qlora" else []
    results = []
    for i, (side, what, flags) in enumerate(rows_for(args)):
        if side == "baseline":
            r = run_peer(peer_args, flags + baseline_method, logs)
        elif side == "unsloth":
            r = run_peer(peer_args, flags + unsloth_method, logs, "unsloth_peer.py")
        else:
            r = run_train(flags, data, logs / f"row{i}-{side.replace(' ', '-')}", args.steps)  # no spaces in paths
        results.append((side, what, r))
        print(json.dumps({"row": side, "what": what, **r}), flush=True)
    text = table(results)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
