"""The Unsloth peer: Unsloth's FastLanguageModel + LoRA on a random-weight model, timed like peer.py (GPU).

    python benchmarks/unsloth_peer.py --model llama3-8b --seq-len 4096 --micro-batch-size 2 --steps 20 \
        [--qlora] [--gradient-checkpointing [unsloth|true]] [--checkpoint-dir DIR] --out unsloth.json

The same preset shape (core/model.py), random weights built as peer.py builds them (seed 0, bf16). Unsloth
loads only from a checkpoint, so they are first written as one (safetensors, with the presets' tokenizer) to
--checkpoint-dir (default: a temporary directory, removed at the end; a given one is kept and reused).
Loaded by `FastLanguageModel.from_pretrained(max_seq_length=--seq-len, dtype=bfloat16,
load_in_4bit=--qlora)` (Unsloth's NF4: double quantization, bf16 compute), then
`FastLanguageModel.get_peft_model`: r=--lora-rank (16), lora_alpha=r, dropout 0, no bias, on q/k/v/o/gate/up/down.
Gradient checkpointing is off by default: Unsloth's fastest setting when the activations fit, as the 8B
shape's should on an H200 at 4096 x 2; `--gradient-checkpointing` gives Unsloth's own (activations offloaded
to CPU memory), `--gradient-checkpointing true` plain recomputation.
Training: TRL's SFTTrainer as Unsloth patches it (the path of its notebooks) on random token ids in
full-length rows (no padding; dataset preparation skipped), at Unsloth's SFTConfig defaults (its optimizer
among them) except what keeps the step comparable to peer.py's: one micro-batch per optimizer step, bf16,
lr 1e-4 constant, no warm-up. Timing, tokens and FLOPs are peer.py's (its Timer and Counted): the median
CUDA-synchronised step after --warmup steps.

Unsloth is imported first (it patches transformers, peft and trl on import), with its CPU fallback and usage
statistics off, the Hugging Face hub offline and its compiled modules in the temporary directory. If that
fails, one line on stderr names the error and the versions of torch, transformers, peft, trl, unsloth and
unsloth_zoo, {"error": that line} goes to --out, and the exit status is 1, before any model is built.
Prints one JSON object (and writes it to --out).
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHECKPOINTING = {"false": False, "true": True, "unsloth": "unsloth"}


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("torch", "transformers", "peft", "trl", "unsloth", "unsloth_zoo"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} missing")
    return ", ".join(found)


def import_unsloth(args, tmp: Path) -> None:
    """Import unsloth before transformers, peft and trl; on failure: one line, the error JSON, exit 1."""
    for key, value in (("UNSLOTH_DISABLE_CPU_FALLBACK", "1"), ("UNSLOTH_DISABLE_STATISTICS", "1"),
                       ("HF_HUB_OFFLINE", "1"), ("UNSLOTH_COMPILE_LOCATION", str(tmp / "compiled"))):
        os.environ.setdefault(key, value)
    try:
        import unsloth  # noqa: F401
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device")
    except Exception as e:
        message = (str(e).strip().splitlines() or [""])[0][:200]
        line = f"unsloth_peer: {type(e).__name__}: {message} ({versions()})"
        print(line, file=sys.stderr)
        if args.out:
            Path(args.out).write_text(json.dumps({"error": line}))
        sys.exit(1)


def write_checkpoint(args, path: Path) -> None:
    """peer.py's model (the preset's shape, seed 0, bf16) and the presets' tokenizer, saved to `path`."""
    import torch
    import transformers

    from core.model import EMBEDDED_TOKENIZER, PRESETS

    if (path / "config.json").exists():
        return
    cls_name, fields = PRESETS[args.model]
    config = getattr(transformers, cls_name)(**fields)
    tok = transformers.AutoTokenizer.from_pretrained(EMBEDDED_TOKENIZER)
    config.pad_token_id, config.eos_token_id, config.bos_token_id = tok.pad_token_id, tok.eos_token_id, tok.bos_token_id
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    torch.cuda.empty_cache()


def build(args, path: Path):
    import torch
    from unsloth import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(str(path), max_seq_length=args.seq_len, dtype=torch.bfloat16,
                                                   load_in_4bit=args.qlora)
    model = FastLanguageModel.get_peft_model(model, r=args.lora_rank, lora_alpha=args.lora_rank, lora_dropout=0,
                                             bias="none", target_modules=TARGETS, random_state=0,
                                             use_gradient_checkpointing=CHECKPOINTING[args.gradient_checkpointing])
    return model, tok


def train(args, model, tok, tmp: Path):
    """SFTTrainer on random full rows, with peer.py's timer; returns (the timer, the trainer's arguments)."""
    import datasets
    import torch
    from transformers import default_data_collator
    from trl import SFTConfig, SFTTrainer

    from peer import Counted, Timer

    rows = torch.randint(0, model.config.vocab_size, (args.steps * args.micro_batch_size, args.seq_len),
                         generator=torch.Generator().manual_seed(0)).tolist()
    data = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})
    collator = Counted(default_data_collator)
    timer = Timer(collator)
    off = {} if CHECKPOINTING[args.gradient_checkpointing] else {"gradient_checkpointing": False}
    cfg = SFTConfig(output_dir=str(tmp / "trainer"), per_device_train_batch_size=args.micro_batch_size,
                    gradient_accumulation_steps=1, max_steps=args.steps, bf16=True, learning_rate=1e-4,
                    lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, report_to="none",
                    save_strategy="no", dataloader_num_workers=0, remove_unused_columns=False, max_length=args.seq_len,
                    packing=False, padding_free=False, dataset_kwargs={"skip_prepare_dataset": True}, **off)
    torch.cuda.reset_peak_memory_stats()
    trainer = SFTTrainer(model=model, processing_class=tok, args=cfg, train_dataset=data, data_collator=collator,
                         callbacks=[timer])
    trainer.train()
    return timer, trainer.args


def result(args, model, timer, targs) -> dict:
    import torch

    from core.model import train_flops

    per_token, per_sq = train_flops(model)
    timed = slice(args.warmup, None)
    step = statistics.median(timer.times[timed])
    tokens = sum(timer.tokens[timed]) / len(timer.tokens[timed])
    flops = per_token * tokens + per_sq * sum(timer.sum_sq[timed]) / len(timer.sum_sq[timed])
    losses = [round(log["loss"], 3) for log in timer.logs if "loss" in log]
    norms = [round(log["grad_norm"], 3) for log in timer.logs if "grad_norm" in log]
    return {"side": "peer (Unsloth)", "model": args.model, "seq_len": args.seq_len,
            "micro_batch_size": args.micro_batch_size, "gradient_checkpointing": args.gradient_checkpointing,
            "qlora": args.qlora, "optim": getattr(targs.optim, "value", targs.optim), "step_s": step,
            "tokens_per_s": tokens / step, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "tflops": flops / step / 1e12, "first_losses": losses[:3], "grad_norms": norms[:3], "versions": versions()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--qlora", action="store_true", help="the base in 4-bit NF4 (Unsloth's load_in_4bit)")
    p.add_argument("--gradient-checkpointing", nargs="?", const="unsloth", default="false", choices=CHECKPOINTING,
                   help="false (default, fastest), unsloth (offloaded; the bare flag) or true (plain recompute)")
    p.add_argument("--checkpoint-dir", default=None, help="the random checkpoint's folder (kept; reused if it has one)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="unsloth_peer_"))
    try:
        import_unsloth(args, tmp)
        path = Path(args.checkpoint_dir) if args.checkpoint_dir else tmp / "checkpoint"
        write_checkpoint(args, path)
        model, tok = build(args, path)
        out = result(args, model, *train(args, model, tok, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out))
    if args.out:
        Path(args.out).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
