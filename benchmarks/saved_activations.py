"""What one LoRA training step keeps from forward to backward, per token and decoder layer (CPU).

    python benchmarks/saved_activations.py               # compiled blocks (inductor), the fastest LoRA recipe
    python benchmarks/saved_activations.py --eager

The model is benchmarks/count_copies.py's: a small Llama of the 8B's structure in bf16, LoRA r=16
on every linear, the fused LoRA kernels, blocks compiled as --compile compiles them. A
saved-tensors hook sees every tensor autograd keeps (compiled regions' saved values included) and
sums the activation-sized ones by storage, so views are counted once. What a block keeps by
design is 13 h + 4 intermediate bytes a token (bf16): the two norms' outputs, q, k and v (k and v
at the kv heads' width), the attention output, the residuals, gate and up.
"""

import argparse
import collections
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks import count_copies as cc  # noqa: E402


def saved(model, b, min_bytes: int) -> dict:
    """{storage: (dtype, shape, bytes)} of the tensors one forward saves for backward."""
    from core.loss import forward_loss_sum

    kept = {}

    def pack(t):
        if t.numel() * t.element_size() >= min_bytes:
            kept.setdefault(t.untyped_storage().data_ptr(), (t.dtype, tuple(t.shape), t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward_loss_sum(model, b, attn_impl="count_opaque_sdpa")
    return kept


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--eager", action="store_true")
    args = p.parse_args()
    hidden, inter = 256, 896
    model, b = cc.build(args.layers, hidden=hidden, intermediate=inter), cc.batch(1024)
    if not args.eager:
        cc.compile_blocks(model, "inductor")
    cc.step(model, b)  # compiles
    tokens = b["input_ids"].numel()
    kept = saved(model, b, tokens * 64)
    total = sum(v[2] for v in kept.values())
    print(f"{'eager' if args.eager else 'compiled (inductor)'}: {total / tokens / args.layers:,.0f} bytes a token "
          f"a layer, the head's logits included; a block by design: 13 h + 4 i = {13 * hidden + 4 * inter}")
    for (dtype, shape), n in sorted(collections.Counter((v[0], v[1]) for v in kept.values()).items(),
                                    key=lambda kv: -kv[1]):
        print(f"  {n} x {str(dtype).replace('torch.', '')} {shape}")


if __name__ == "__main__":
    main()
