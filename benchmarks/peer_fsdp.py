"""The multi-GPU peer: Hugging Face Trainer (+ peft LoRA, or full fine-tuning) with accelerate FSDP2.

    torchrun --standalone --nproc_per_node 8 benchmarks/peer_fsdp.py --model llama3-8b --seq-len 4096 \
        --micro-batch-size 1 --grad-accum 1 --steps 8 [--full] --out-dir /tmp/peer8
    # CPU (gloo): --model tiny-llama --device cpu --precision fp32 --seq-len 128

What benchmarks/scaling.py runs as its peer-full / peer-lora rows, at every world size with the same
global batch (micro-batch x grad-accum x ranks) as the nanotune rows. The model: a nanotune preset
shape (core/model.py) with random weights (seed 0), SDPA; LoRA r=16 on every linear layer of the
decoder unless --full. Sharding: `TrainingArguments(fsdp=True, fsdp_config={"version": 2,
"transformer_layer_cls_to_wrap": [<decoder layer>], "reshard_after_forward": True})`, i.e.
accelerate's FSDP2 plugin (fully_shard per decoder layer + root), with any number of processes,
one included. Precision: --precision bf16 loads bf16 weights and trains them in bf16 without
autocast (nanotune's --precision bf16; with `bf16=True` accelerate's FSDP2 would upcast the
parameters to fp32, which the 8B full fine-tune does not fit on one GPU); bf16-mixed: fp32 weights
and `bf16=True`; fp32: fp32 throughout. Data: random token ids (full rows, no padding), the
Trainer's seeded sampler: one global step holds the same rows at every world size (accelerate
deals the micro-batches of one sampler out to the ranks). Step time: rank 0, synchronised around
each optimizer step. Writes <out-dir>/metrics.jsonl in nanotune's keys (step, loss, tokens,
tokens_per_s = global tokens / step time, peak_mem_gib, mfu: null) so the harness reads both alike.

On CPU it runs but is not FSDP: accelerate 1.15 turns its FSDP plugin on only for GPU-like
distributed types, never for MULTI_CPU, so with gloo the Trainer silently trains DDP (checked with
torch 2.13, transformers 5.24, accelerate 1.15). The script records whether the parameters ended up
as DTensors ("fsdp2" in metrics.jsonl; scaling.py marks a row whose runs were not sharded), so the
CPU run checks the plumbing (global batch, losses, metrics) and the GPU run is the real peer. One
process on a GPU may also stay unsharded (accelerate picks no distributed type for world size 1).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(args, device: torch.device):
    import peft
    import transformers

    from core.model import PRESETS

    cls_name, fields = PRESETS[args.model]
    config = getattr(transformers, cls_name)(**fields)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    torch.manual_seed(0)
    with device:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    if not args.full:
        lora = peft.LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules="all-linear",
                               lora_dropout=0.0, task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, lora)
    layer = type(next(m for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))).__name__
    return model, layer


class Timer(TrainerCallback):
    """Step wall time on rank 0 (device-synchronised) and the Trainer's logged loss per step."""

    def __init__(self, device: torch.device):
        self.device, self.times, self.losses, self.t = device, [], {}, None

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_step_begin(self, args, state, control, **kw):
        self._sync()
        self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self._sync()
        self.times.append(time.perf_counter() - self.t)

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--full", action="store_true", help="full fine-tune: no adapter")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--precision", choices=["bf16", "bf16-mixed", "fp32"], default="bf16")
    p.add_argument("--gradient-checkpointing", action="store_true", help="FSDP's activation checkpointing")
    p.add_argument("--out-dir", default="/tmp/peer_fsdp")
    args = p.parse_args()

    import datasets
    from transformers import Trainer, TrainingArguments, default_data_collator

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    model, layer = build(args, device)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, model.config.vocab_size, (args.steps * args.micro_batch_size * args.grad_accum * world,
                                                      args.seq_len), generator=g).tolist()
    data = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})
    timer = Timer(device)
    fsdp_config = {"version": 2, "transformer_layer_cls_to_wrap": [layer], "reshard_after_forward": True,
                   "activation_checkpointing": args.gradient_checkpointing}
    targs = TrainingArguments(
        output_dir=args.out_dir, per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.grad_accum, max_steps=args.steps, learning_rate=args.lr,
        lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no", seed=1,
        dataloader_num_workers=0, remove_unused_columns=False, bf16=args.precision == "bf16-mixed",
        use_cpu=args.device == "cpu", ddp_backend="gloo" if args.device == "cpu" else None,
        fsdp=True, fsdp_config=fsdp_config)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(model=model, args=targs, train_dataset=data, data_collator=default_data_collator,
                      callbacks=[timer])
    trainer.train()
    # FSDP2 really sharded the model: its parameters are DTensors (a silent fallback would be unsharded)
    sharded = all(type(p).__name__ == "DTensor" for p in trainer.model_wrapped.parameters())
    if rank != 0:
        return
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    per_step = args.micro_batch_size * args.grad_accum * world * args.seq_len
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.jsonl", "w") as f:
        for i, t in enumerate(timer.times):
            step = i + 1
            f.write(json.dumps({"step": step, "loss": timer.losses.get(step, float("nan")), "tokens": step * per_step,
                                "tokens_per_s": per_step / t, "peak_mem_gib": peak, "mfu": None,
                                "fsdp2": sharded}) + "\n")
    print(f"peer_fsdp: FSDP2 {'on' if sharded else 'OFF'}, {len(timer.times)} steps, "
          f"losses {[round(v, 4) for v in timer.losses.values()]}, "
          f"median {per_step / sorted(timer.times)[len(timer.times) // 2]:,.0f} tok/s, peak {peak:.2f} GiB")


if __name__ == "__main__":
    main()
