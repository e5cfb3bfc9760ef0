"""Do FlashAttention-4 varlen calls stall on new packings? The 8B attention shape (32 query heads, 8 kv
heads, head dim 128), forward + backward on 80 packings of random chat-length documents (lognormal).
    python fa4_varlen_random.py ROWS"""
import itertools
import random
import sys
import time

import torch
from flash_attn.cute import flash_attn_varlen_func

rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1
rng = random.Random(0)
T = 4096 * rows
q = torch.randn(T, 32, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(T, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(T, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
for it in range(80):
    lens = []
    for _ in range(rows):
        left = 4096
        while left > 0:
            n = min(left, max(16, int(rng.lognormvariate(5.3, 0.8))))
            lens.append(n)
            left -= n
    cu = torch.tensor([0, *itertools.accumulate(lens)], device="cuda", dtype=torch.int32)
    m = max(lens)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=m, max_seqlen_k=m,
                                 causal=True)
    out = out[0] if isinstance(out, tuple) else out
    out.float().sum().backward()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    stall = "  <-- STALL" if dt > 0.1 and it > 0 else ""
    print(f"rows {rows} it {it:2d} docs {len(lens):3d} max {m:5d} {dt * 1000:8.1f} ms{stall}", flush=True)
