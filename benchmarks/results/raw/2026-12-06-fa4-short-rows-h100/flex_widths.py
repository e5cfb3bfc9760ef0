"""Which row widths compiled flex_attention builds a kernel for: forward + backward, bf16, batch 2, 4 query
heads, head dim 32, a document-causal BlockMask (documents of 17 tokens); kv 4: MHA, kv 2: grouped-query."""
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

attend = torch.compile(flex_attention)
for W in [16, 33, 64, 100, 120, 127, 128, 129, 136, 200, 255, 256, 300]:
    for kv_heads in (4, 2):
        torch._dynamo.reset()
        q = torch.randn(2, 4, W, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(2, kv_heads, W, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(2, kv_heads, W, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        doc = (torch.arange(W, device="cuda") // 17)[None].expand(2, W)
        mask = create_block_mask(lambda b, h, i, j: (doc[b, i] == doc[b, j]) & (j <= i), 2, None, W, W, device="cuda")
        try:
            attend(q, k, v, block_mask=mask, enable_gqa=kv_heads != 4).float().sum().backward()
            result = "ok"
        except Exception as e:  # noqa: BLE001
            result = type(e).__name__ + ": " + str(e).split("\n")[0][:90]
        print(f"W {W:4d} kv {kv_heads}: {result}", flush=True)
