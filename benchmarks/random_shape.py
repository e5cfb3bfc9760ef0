"""A random-weight checkpoint of a named small shape, in Hugging Face format with a tokenizer's files:
a local --model for the benchmarks at sizes no preset has (CUDA graphs pay by size: core/defaults.py
GRAPHS_BELOW).

    python benchmarks/random_shape.py --shape smollm2-360m --tokenizer DIR --out /tmp/smollm2-360m
    python benchmarks/random_shape.py --shape qwen2.5-0.5b --tokenizer DIR --out /tmp/qwen2.5-0.5b

DIR is a checkpoint or tokenizer directory (e.g. SmolLM2-135M-Instruct's): its tokenizer and chat
template files are copied beside the weights. The shapes are the published models' configs; the
vocabulary is the model's own, so a smaller tokenizer's ids are all in range.
"""

import argparse
import shutil
from pathlib import Path

import torch

SHAPES = {
    "smollm2-360m": ("llama", dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15,
                                   num_key_value_heads=5, intermediate_size=2560, vocab_size=49152)),
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                   num_key_value_heads=2, intermediate_size=4864, vocab_size=151936)),
}


def build(shape: str, tokenizer: Path, out: Path, layers: int | None = None, seed: int = 0) -> int:
    """Write the shape's random bf16 weights and the tokenizer's files to out; the parameter count.
    layers: fewer decoder layers (tests)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, sizes = SHAPES[shape]
    sizes = {**sizes, **({"num_hidden_layers": layers} if layers else {})}
    config = AutoConfig.for_model(model_type, tie_word_embeddings=True, max_position_embeddings=8192,
                                  rope_theta=100000.0, **sizes)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for f in tokenizer.iterdir():
        if f.is_file() and ("token" in f.name or "chat_template" in f.name):
            shutil.copy(f, out / f.name)
    return sum(p.numel() for p in model.parameters())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--tokenizer", type=Path, required=True, help="a directory with the tokenizer's files")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the shape's")
    args = p.parse_args()
    n = build(args.shape, args.tokenizer, args.out, args.layers)
    print(f"{args.shape}: {n / 1e6:.1f}M parameters, random bf16 weights, in {args.out}")


if __name__ == "__main__":
    main()
