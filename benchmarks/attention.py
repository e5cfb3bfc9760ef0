"""Attention fwd+bwd throughput per backend on packed batches (GPU).

    python benchmarks/attention.py --seq-lens 4096 8192 16384 --out benchmarks/results/attention.md

Shapes: Llama-3-8B heads (32 query heads, 8 KV heads, head dim 128), bf16, one packed row per
batch holding documents of random lengths (128..2048 tokens, seeded) that fill the row. Each
backend gets the inputs nanotune gives it on a packed batch:
  sdpa       F.scaled_dot_product_attention with the boolean block-diagonal causal mask that
             transformers builds from restarting position_ids
  flex       compiled flex_attention with a document-causal BlockMask
  flash-4    flash_attn.cute.flash_attn_varlen_func (FlashAttention-4), cu_seqlens
  varlen     torch.nn.attention.varlen.varlen_attn (PyTorch's FlashAttention-2), cu_seqlens
  xformers   memory_efficient_attention + BlockDiagonalCausalMask (when it imports)
FLOPs counted: causal within documents only, 4 * sum(len_d^2) / 2 * heads * head_dim for the
forward pass and 2.5x that for the backward pass (FlashAttention's convention), so a backend is
not credited for masked-out work. Time: CUDA events, median of 10 after 3 warm-up iterations.
"""

import argparse
import random
import statistics

import torch
import torch.nn.functional as F

HQ, HKV, D = 32, 8, 128


def documents(seq_len: int, seed: int) -> list[int]:
    rng, lengths = random.Random(seed), []
    while sum(lengths) < seq_len:
        lengths.append(min(rng.randint(128, 2048), seq_len - sum(lengths)))
    return lengths


def flops(lengths: list[int]) -> float:
    fwd = 4 * sum(n * n for n in lengths) / 2 * HQ * D
    return 3.5 * fwd


def _time(fn, iters=10, warmup=3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _doc_ids(lengths, device):
    return torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                   torch.tensor(lengths, device=device))


def make_backends(lengths, q, k, v):
    """name -> a closure running fwd+bwd for this packed row (raises if the backend is absent)."""
    s, dev = sum(lengths), q.device
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=dev)
    cu[1:] = torch.tensor(lengths, device=dev).cumsum(0)
    longest = max(lengths)
    docs = _doc_ids(lengths, dev)

    def flat(t):  # (1,H,S,D) -> (S,H,D)
        return t[0].transpose(0, 1).contiguous().requires_grad_()

    def sdpa():
        idx = torch.arange(s, device=dev)
        mask = (docs[:, None] == docs[None, :]) & (idx[:, None] >= idx[None, :])
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        return lambda: F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask[None, None],
                                                      enable_gqa=True).sum().backward()

    def flex():
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        compiled = torch.compile(flex_attention)

        def mask_mod(b, h, qi, ki):
            return (docs[qi] == docs[ki]) & (qi >= ki)

        block = create_block_mask(mask_mod, 1, None, s, s, device=dev)
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        return lambda: compiled(qq, kk, vv, block_mask=block, enable_gqa=True).sum().backward()

    def flash4():
        from flash_attn.cute import flash_attn_varlen_func

        qq, kk, vv = flat(q), flat(k), flat(v)

        def run():
            out = flash_attn_varlen_func(qq, kk, vv, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest,
                                         max_seqlen_k=longest, causal=True)
            (out[0] if isinstance(out, tuple) else out).sum().backward()
        return run

    def varlen():
        import inspect

        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
        gqa = {"enable_gqa": True} if "enable_gqa" in params else {}
        qq = flat(q)
        kk, vv = (flat(t) if gqa else flat(t.repeat_interleave(HQ // HKV, 1)) for t in (k, v))
        return lambda: varlen_attn(qq, kk, vv, cu, cu, longest, longest, **causal, **gqa).sum().backward()

    def xformers():
        from xformers.ops import fmha

        mask = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(lengths)
        g = HQ // HKV
        qq = q.transpose(1, 2).reshape(1, s, HKV, g, D).detach().requires_grad_()
        kk, vv = (t.transpose(1, 2)[:, :, :, None].expand(1, s, HKV, g, D).detach().requires_grad_()
                  for t in (k, v))
        return lambda: fmha.memory_efficient_attention(qq, kk, vv, attn_bias=mask).sum().backward()

    return {"sdpa": sdpa, "flex": flex, "flash-4": flash4, "varlen": varlen, "xformers": xformers}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for seq in args.seq_lens:
        lengths = documents(seq, seed=seq)
        torch.manual_seed(0)
        q = torch.randn(1, HQ, seq, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, HKV, seq, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        for name, make in make_backends(lengths, q, k, v).items():
            try:
                t = _time(make())
                rows.append((seq, len(lengths), name, f"{t * 1e3:.2f}", f"{flops(lengths) / t / 1e12:.0f}"))
            except Exception as e:  # a missing package or an unsupported shape is a row, not a crash
                rows.append((seq, len(lengths), name, "-", f"n/a ({type(e).__name__}: {str(e)[:60]})"))
            torch.cuda.empty_cache()
            print(rows[-1], flush=True)
    head = "| seq | docs | backend | fwd+bwd ms | TFLOP/s |\n|---|---|---|---|---|\n"
    table = head + "".join(f"| {' | '.join(map(str, r))} |\n" for r in rows)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}\n\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
