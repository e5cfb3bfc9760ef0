"""Bytes per token that one recomputed decoder block saves for backward under --alst --lora (CPU).

    python benchmarks/alst_memory.py --seq 512 --out benchmarks/results/2026-11-29-alst-memory-cpu.md

With --ac full and --offload cpu the GPU holds, at the peak of backward, the one block being
recomputed and backpropagated: what its forward saves for backward, plus the gradients in flight.
This builds one decoder layer of the llama3-8b preset (hidden 4096, intermediate 14336, 32 heads,
8 KV heads), --precision bf16, with train.py's adapters and swaps (LoRA r=16 on every linear, then
--tiled-mlp), runs the layer's forward with grad (what the checkpoint's recompute runs) on a short
row, and walks the autograd graph: each saved tensor, counted once per storage, is charged to the
op and module that produced it. Parameters are not counted. SDPA on CPU (its flash kernel, GQA
without repeat_kv: mask None) saves what the CUDA flash kernels save: q, k, v, out, logsumexp.
"""

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.model import decoder_blocks  # noqa: E402
from features.lora import LoraConfig, apply_lora  # noqa: E402
from core.model import ModelConfig, load_config, load_model, load_tokenizer  # noqa: E402
from features.tiled_mlp import TiledMLPConfig, apply_tiled_mlp, auto_shards  # noqa: E402


class Producers(TorchDispatchMode):
    """storage -> (module, op) of the op that allocated it, with the module path at that moment.
    A saved storage stays alive, so no later op can reuse its address: the latest writer is it."""

    def __init__(self, names):
        super().__init__()
        self.names, self.stack, self.by_storage = names, [], {}
        hooks = torch.nn.modules.module
        self.hooks = [hooks.register_module_forward_pre_hook(lambda m, a: self.stack.append(m) and None),
                      hooks.register_module_forward_hook(lambda m, a, o: self.stack.pop() and None)]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        where = next((self.names[m] for m in reversed(self.stack) if m in self.names), "?")
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            ptr = t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else None
            if ptr is not None and ptr not in inputs:  # a fresh storage (not a view, not in place)
                self.by_storage[ptr] = (where, func.__name__.split(".")[0])
        return out

    def close(self):
        for h in self.hooks:
            h.remove()


def saved_tensors(root):
    """Every tensor the graph under `root` saved for backward, with the backward node that saved it."""
    seen, todo = set(), [root]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo += [n for n, _ in node.next_functions]
        values = [getattr(node, a) for a in dir(node) if a.startswith("_saved_")]
        if hasattr(node, "saved_tensors"):  # a custom autograd.Function (TiledMLP)
            values.append(node.saved_tensors)
        for v in values:
            for t in v if isinstance(v, (tuple, list)) else (v,):
                if isinstance(t, torch.Tensor):
                    yield type(node).__name__, t


def account(fn, label_inputs, params, names):
    """{(module, op, dtype): bytes} of the storages saved by fn()'s graph, counted once each."""
    producers = Producers(names)
    with producers:
        out = fn()
    producers.close()
    rows, counted = collections.defaultdict(lambda: [0, set()]), set()
    for node, t in saved_tensors(out.grad_fn):
        ptr = t.untyped_storage().data_ptr()
        if ptr in params or ptr in counted:
            continue
        counted.add(ptr)
        where, op = label_inputs.get(ptr) or producers.by_storage.get(ptr, ("?", "?"))
        row = rows[(where, op, str(t.dtype).replace("torch.", ""))]
        row[0] += t.untyped_storage().nbytes()
        row[1].add(node)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=512, help="tokens in the row")
    ap.add_argument("--shards", type=int, default=2, help="--tiled-mlp-shards (a short row is not tiled by auto)")
    ap.add_argument("--at", type=int, default=131072, help="length to amortize the tiled MLP's one tile over")
    ap.add_argument("--out", default=None, help="write the Markdown table here too")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    tok = load_tokenizer(ModelConfig())
    mcfg = ModelConfig("llama3-8b", precision="bf16")
    config = load_config(mcfg, tok)
    config.num_hidden_layers, config.vocab_size = 1, len(tok)  # one block; the head is not in it
    model = load_model(mcfg, config, torch.device("cpu"))
    model = apply_lora(model, LoraConfig(lora=True, lora_rank=16))  # train.py's order: adapters, then tiles
    model = apply_tiled_mlp(model, TiledMLPConfig(tiled_mlp=True, tiled_mlp_shards=args.shards))
    block, hidden = decoder_blocks(model)[0], config.hidden_size
    names = {m: n.removeprefix("base_model.model.model.layers.0.") for n, m in model.named_modules()}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    x = torch.randn(1, args.seq, hidden, dtype=torch.bfloat16, requires_grad=True)  # the block input
    pos = torch.arange(args.seq)[None]
    cos, sin = model.get_base_model().model.rotary_emb(x, pos)
    inputs = {x.untyped_storage().data_ptr(): ("(block input)", "-"),
              cos.untyped_storage().data_ptr(): ("(rope cos)", "-"),
              sin.untyped_storage().data_ptr(): ("(rope sin)", "-")}
    rows = account(lambda: block(x, attention_mask=None, position_ids=pos, position_embeddings=(cos, sin)),
                   inputs, params, names)

    # the tiled MLP's backward recomputes one tile at a time with grad: transient, one tile's worth
    tile = -(-args.at // auto_shards(args.at, hidden))
    mlp = block.mlp
    t_in = torch.randn(1, tile, hidden, dtype=torch.bfloat16, requires_grad=True)
    tile_rows = account(lambda: mlp._untiled_forward(t_in), {t_in.untyped_storage().data_ptr(): ("(tile input)", "-")},
                        params, names)
    report(rows, tile_rows, args, hidden, tile)


def report(rows, tile_rows, args, hidden, tile):
    vec = 2 * hidden  # one hidden-size bf16 vector
    lines = [f"Saved for backward by one recomputed decoder block, per token (llama3-8b shape, bf16 base, LoRA r=16, "
             f"--tiled-mlp-shards {args.shards}; row of {args.seq} tokens). "
             f"A vector = one hidden-size bf16 vector = {vec} bytes.", "",
             "| module | producing op | dtype | bytes/token | vectors | saved by |", "|---|---|---|---:|---:|---|"]
    total = 0
    for (where, op, dtype), (nbytes, nodes) in sorted(rows.items(), key=lambda kv: -kv[1][0]):
        per = nbytes / args.seq
        total += per
        if per < 1:
            continue
        lines.append(f"| {where} | {op} | {dtype} | {per:.0f} | {per / vec:.2f} | {', '.join(sorted(nodes))} |")
    lines.append(f"| **total** | | | **{total:.0f}** | **{total / vec:.2f}** | |")
    tile_total = sum(b for b, _ in tile_rows.values())
    lines += ["", f"Tiled MLP, in backward only, one tile of {tile} tokens "
              f"(auto tiling at {args.at} tokens) at a time: "
              f"{tile_total / 2**20:.0f} MiB, {tile_total / tile:.0f} bytes per tile token "
              f"({tile_total / tile / vec:.1f} vectors), {tile_total / args.at:.0f} bytes per token at {args.at}:", "",
              "| module | producing op | dtype | bytes/tile token |", "|---|---|---|---:|"]
    for (where, op, dtype), (nbytes, _) in sorted(tile_rows.items(), key=lambda kv: -kv[1][0]):
        if nbytes >= tile:
            lines.append(f"| {where} | {op} | {dtype} | {nbytes / tile:.0f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
