"""The peer: Hugging Face Trainer + peft LoRA on a random-weight model, timed like nanotune.

    python benchmarks/peer.py --model llama3-8b --seq-len 4096 --micro-batch-size 1 --steps 20 \
        --gradient-checkpointing --liger [--qlora] --out peer.json

Same shapes as nanotune's presets (core/model.py), or a local checkpoint directory's own weights; base
weights in bf16, `bf16=True`, SDPA, LoRA on every linear layer of the decoder, random token ids of full
length (no padding). With --qlora: the decoder linears in NF4 (double quantization, bf16 compute) and
peft's prepare_model_for_kbit_training, the standard QLoRA recipe (--no-kbit-prep skips it). With
--full: no adapter, every weight trains (bf16 weights, the Trainer's AdamW). With --data FILE (jsonl of
{"text"}): those documents, tokenized by the model's tokenizer, batched the Trainer's way (padded to the
longest of each micro-batch, optionally --group-by-length, or --padding-free: transformers'
DataCollatorWithFlattening, its packing option); tokens/s then counts real tokens only. Step time is
measured with CUDA synchronisation around each optimizer step, over the steps after `--warmup` ones; the
Trainer's own logged loss and grad norm are kept, so a run that does not train cannot pass for fast.
Prints one JSON object (and writes it to --out).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(args):
    import peft
    import transformers

    from core.model import PRESETS, train_flops

    torch.manual_seed(0)
    if args.model in PRESETS:
        cls_name, fields = PRESETS[args.model]
        with torch.device("cuda"):
            model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**fields),
                                                                  dtype=torch.bfloat16, attn_implementation="sdpa")
    else:  # a local checkpoint directory: its real weights
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16,
                                                                  attn_implementation="sdpa", device_map="cuda")
    model.config.use_cache = False
    if args.qlora:  # NF4 + double quantization, bf16 compute: what from_pretrained does with this config
        from transformers import BitsAndBytesConfig

        from core.quantize import quantize_base

        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
        model = quantize_base(model, qc)
        if not args.no_kbit_prep:  # casts the norms, embeddings and head to fp32: the recipe, not the fastest
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
        elif args.gradient_checkpointing:
            model.enable_input_require_grads()
    if args.full:
        return model, train_flops(model)
    lora = peft.LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules="all-linear",
                           lora_dropout=0.0, task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    return model, train_flops(model)


def dataset(args, vocab: int):
    """(train dataset, collator): random full-length rows, or --data's documents."""
    import datasets
    from transformers import DataCollatorForLanguageModeling, DataCollatorWithFlattening, default_data_collator

    if not args.data:
        rows = torch.randint(0, vocab, (args.steps * args.micro_batch_size, args.seq_len)).tolist()
        return datasets.Dataset.from_dict({"input_ids": rows, "labels": rows}), default_data_collator
    from core.model import ModelConfig, load_tokenizer

    tok = load_tokenizer(ModelConfig(path=args.model))
    texts = [json.loads(line)["text"] for line in Path(args.data).read_text().splitlines()]
    ids = [t[:args.seq_len] for t in tok(texts, add_special_tokens=True)["input_ids"]]
    data = datasets.Dataset.from_dict({"input_ids": ids})
    if args.padding_free:
        return data, DataCollatorWithFlattening()
    return data, DataCollatorForLanguageModeling(tok, mlm=False)


def sampler(args) -> dict:
    """The length-grouped sampler's argument: `group_by_length` before transformers 5, then
    `train_sampling_strategy="group_by_length"`."""
    import inspect

    from transformers import TrainingArguments

    if not args.group_by_length:
        return {}
    if "train_sampling_strategy" in inspect.signature(TrainingArguments).parameters:
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True}


class Counted:
    """A collator wrapper that queues each batch's real tokens and sum of squared document lengths
    (the data loader may run a batch ahead of the step: the queue keeps them in step order)."""

    def __init__(self, collator):
        self.collator, self.queue = collator, []

    def __call__(self, features):
        lengths = [len(f["input_ids"]) for f in features]
        self.queue.append((sum(lengths), sum(n * n for n in lengths)))
        return self.collator(features)


class Timer(TrainerCallback):
    """Wall time of each optimizer step (CUDA-synchronised), real tokens per step, and the Trainer's logs."""

    def __init__(self, collator: Counted):
        self.times, self.logs, self.t = [], [], None
        self.tokens, self.sum_sq, self.collator = [], [], collator

    def on_step_begin(self, args, state, control, **kw):
        torch.cuda.synchronize()
        self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.t)
        tokens, sum_sq = self.collator.queue.pop(0)
        self.tokens.append(tokens)
        self.sum_sq.append(sum_sq)

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs or {}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--liger", action="store_true")
    p.add_argument("--qlora", action="store_true")
    p.add_argument("--no-kbit-prep", action="store_true", help="with --qlora: skip prepare_model_for_kbit_training")
    p.add_argument("--full", action="store_true", help="full fine-tune: no adapter")
    p.add_argument("--data", default=None, help="jsonl of {'text'}: real documents instead of random full rows")
    p.add_argument("--group-by-length", action="store_true", help="with --data: the Trainer's length-grouped sampler")
    p.add_argument("--padding-free", action="store_true", help="with --data: DataCollatorWithFlattening (packing)")
    p.add_argument("--no-cudnn-sdpa", action="store_true", help="keep SDPA off its cuDNN backend")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.no_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)

    from transformers import Trainer, TrainingArguments

    model, (per_token, per_sq) = build(args)
    data, collator = dataset(args, model.config.vocab_size)
    collator = Counted(collator)
    timer = Timer(collator)
    targs = TrainingArguments(output_dir="/tmp/peer", per_device_train_batch_size=args.micro_batch_size,
                              max_steps=args.steps, bf16=True, learning_rate=1e-4, logging_steps=1,
                              gradient_checkpointing=args.gradient_checkpointing, use_liger_kernel=args.liger,
                              report_to=[], save_strategy="no", dataloader_num_workers=0, lr_scheduler_type="constant",
                              remove_unused_columns=False, **sampler(args))
    torch.cuda.reset_peak_memory_stats()
    Trainer(model=model, args=targs, train_dataset=data, data_collator=collator, callbacks=[timer]).train()
    timed = slice(args.warmup, None)
    step = sum(timer.times[timed]) / len(timer.times[timed]) if args.data else statistics.median(timer.times[timed])
    tokens = sum(timer.tokens[timed]) / len(timer.tokens[timed])  # real tokens per step
    flops = per_token * tokens + per_sq * sum(timer.sum_sq[timed]) / len(timer.sum_sq[timed])
    losses = [round(log["loss"], 3) for log in timer.logs if "loss" in log]
    norms = [round(log["grad_norm"], 3) for log in timer.logs if "grad_norm" in log]
    result = {"side": "peer (HF Trainer" + (")" if args.full else " + peft)"), "model": args.model,
              "seq_len": args.seq_len,
              "micro_batch_size": args.micro_batch_size, "gradient_checkpointing": args.gradient_checkpointing,
              "liger": args.liger, "qlora": args.qlora, "step_s": step, "tokens_per_s": tokens / step,
              "step_times": [round(t, 4) for t in timer.times], "step_tokens": timer.tokens,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "tflops": flops / step / 1e12,
              "first_losses": losses[:3], "grad_norms": norms[:3]}
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
