"""Ring attention: exact attention over a sequence sharded across ranks, K/V blocks passed around.

    torchrun --nproc_per_node 4 train.py --packing --seq-len 32768 --cp 4 --sp-mode ring

Each rank keeps its queries and passes its key/value block to the next rank, P - 1 times, so
every query block meets every key/value block once; the partial results are merged with the
online softmax (each block's output weighted by exp(block log-sum-exp - running log-sum-exp)),
which gives exactly softmax attention over the whole row. Masks come from each token's index in
the row and its document id, so causal order, packed-document boundaries and sliding windows
hold across blocks. The zig-zag layout (rank r holds chunks r and 2P-1-r of 2P) gives every rank
the same share of the causal triangle. Pure PyTorch math (runs on CPU / gloo); each block is
recomputed in backward (activation checkpointing) so a rank never stores more than one block's
scores, and autograd runs backward through the ring (the gradient of a passed block goes back
the other way).

Reference: Liu et al., "Ring Attention with Blockwise Transformers" (2023); zig-zag sharding as in
zhuzilin/ring-flash-attention and Llama 3's context parallelism.
"""

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

MASKED = -1e30  # finite: a block with no visible key gives a finite LSE that the merge weights to 0


def shard_index(seq: int, rank: int, world: int, zigzag: bool) -> torch.Tensor:
    """Row positions that `rank` holds: one contiguous chunk, or chunks r and 2P-1-r (zig-zag)."""
    if not zigzag:
        n = seq // world
        return torch.arange(rank * n, (rank + 1) * n)
    c = seq // (2 * world)
    return torch.cat([torch.arange(rank * c, (rank + 1) * c),
                      torch.arange((2 * world - 1 - rank) * c, (2 * world - rank) * c)])


def _shift(x: torch.Tensor, group, step: int) -> torch.Tensor:
    """Send x to the rank `step` ahead in the group, receive from the one `step` behind."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    out = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x.contiguous(), dist.get_global_rank(group, (rank + step) % world), group),
           dist.P2POp(dist.irecv, out, dist.get_global_rank(group, (rank - step) % world), group)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


class _RingPass(torch.autograd.Function):
    """Pass a block to the next rank; its gradient travels back to the previous one."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _shift(x, group, 1)

    @staticmethod
    def backward(ctx, grad):
        return _shift(grad, ctx.group, -1), None


def _visible(q_idx, q_doc, k_idx, k_doc, window) -> torch.Tensor:
    """(B, 1, n, m) mask: same document, key not after the query, within the sliding window."""
    ok = (q_doc[:, :, None] == k_doc[:, None, :]) & (k_idx[None, None, :] <= q_idx[None, :, None])
    if window:
        ok &= q_idx[None, :, None] - k_idx[None, None, :] < window
    return ok[:, None]


def _block(q, k, v, q_idx, q_doc, k_idx, k_doc, window, scale):
    """Attention of q over one K/V block: (output, log-sum-exp) in fp32 (fp64 for fp64 inputs).
    Rows with nothing visible get an LSE near MASKED, which the merge weights to zero. The mask is
    rebuilt here rather than passed in, so recomputation in backward saves no n x m tensor."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # grouped-query attention: each K/V head serves `groups` query heads
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    acc = torch.promote_types(q.dtype, torch.float32)
    # matmuls in the input dtype (tensor cores for bf16), softmax and LSE in fp32, as eager attention
    scores = (q @ k.transpose(-1, -2)).to(acc) * scale
    scores = scores.masked_fill(~_visible(q_idx, q_doc, k_idx, k_doc, window), MASKED)
    lse = torch.logsumexp(scores, -1)
    return (torch.softmax(scores, -1).to(v.dtype) @ v).to(acc), lse


def ring_attention(q, k, v, group, index: list[torch.Tensor], doc: torch.Tensor, scale: float,
                   window: int | None = None) -> torch.Tensor:
    """Exact causal attention of this rank's queries over the whole row.

    q: (B, H, n, D) and k, v: (B, Hkv, n, D), this rank's shard; index[j]: the row positions rank j
    holds (n,); doc: (B, S) document id of every row position. Returns (B, H, n, D) in q's dtype.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    q_idx, q_doc = index[rank], doc[:, index[rank]]
    acc = torch.promote_types(q.dtype, torch.float32)
    out = q.new_zeros(q.shape, dtype=acc)
    lse = q.new_full(q.shape[:3], MASKED, dtype=acc)
    kv = torch.stack([k, v])
    for step in range(world):
        src = (rank - step) % world  # whose block this rank holds now
        k_idx, k_doc = index[src], doc[:, index[src]]
        if _visible(q_idx, q_doc, k_idx, k_doc, window).any():  # zig-zag and documents mask many blocks fully
            b_out, b_lse = checkpoint(_block, q, kv[0], kv[1], q_idx, q_doc, k_idx, k_doc, window, scale,
                                      use_reentrant=False)
            new = torch.logaddexp(lse, b_lse)
            out = out * torch.exp(lse - new)[..., None] + b_out * torch.exp(b_lse - new)[..., None]
            lse = new
        if step < world - 1:
            kv = _RingPass.apply(kv, group)
    # keep the last received block in the graph even when it was skipped: every rank must run the
    # backward of every pass, or a rank waits forever for a gradient its neighbour never sends
    out = out + 0.0 * kv.sum().to(acc)
    return out.to(q.dtype)
