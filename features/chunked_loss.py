"""Chunked cross entropy: the loss without ever holding the full logits (pure PyTorch, CPU-safe).

    python train.py --loss chunked --loss-chunk 4096

The model's output head is swapped for one that returns the final hidden states (keeping the
same weight Parameter, so optimizers, checkpoints and exports see `lm_head.weight` unchanged), and
the loss multiplies --loss-chunk tokens at a time by the head weight. Gradients for the hidden
states and the head weight are computed chunk by chunk inside the forward pass and kept (the
approach of Liger's fused linear cross entropy), so the peak holds one chunk's fp32 logits
instead of tokens x vocabulary of them, plus their softmax and gradient. Exact: the same loss and
gradients as plain cross entropy (tests/test_chunked_loss.py). Generation switches the head back.
Does not work with final-logit soft-capping (Gemma 2): refused. --loss cce and --loss liger
(features/fused_loss.py) use the same head swap with GPU kernels.
"""

import warnings

import torch

from core.attention import model_inputs
from core.loss import IGNORE, head_weight, hidden_head, next_token_targets, shifted_targets


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        want_h, want_w = ctx.needs_input_grad[:2]  # all False under no_grad (evaluation)
        need_grad = want_h or want_w
        grad_h = torch.zeros_like(hidden) if want_h else None
        acc = torch.promote_types(hidden.dtype, torch.float32)  # at least fp32 for the softmax
        grad_w = torch.zeros_like(weight, dtype=acc) if want_w else None
        total = hidden.new_zeros((), dtype=acc)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = (h @ weight.to(h.dtype).T).to(acc)
            lse = torch.logsumexp(logits, -1)
            valid = t != IGNORE
            picked = t.clamp(min=0)[:, None]  # an ignored position's target: any index, masked below
            total += ((lse - logits.gather(1, picked).squeeze(1)) * valid).sum()
            if not need_grad:
                continue
            # d(sum CE)/d logits = softmax - onehot, 0 where ignored; in place of the logits, so a chunk
            # holds one (chunk x vocabulary) buffer and logsumexp's temporary
            d_logits = logits.sub_(lse[:, None]).exp_()
            d_logits.scatter_add_(1, picked, -valid[:, None].to(acc))
            d_logits.mul_(valid[:, None])
            d_logits = d_logits.to(h.dtype)  # the GEMMs run in the inputs' dtype, as plain CE's backward does
            if grad_h is not None:
                grad_h[start:start + chunk] = (d_logits @ weight.to(h.dtype)).to(grad_h.dtype)
            if grad_w is not None:  # in fp32: slow SIMT cores (benchmarks/results/2026-11-29-fp8-h200.md)
                grad_w += d_logits.T @ h  # summed across chunks in fp32
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.has = (grad_h is not None, grad_w is not None)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0) * grad_out if ctx.has[0] else None
        grad_w = (saved.pop(0) * grad_out).to(ctx.weight_dtype) if ctx.has[1] else None
        return grad_h, grad_w, None, None


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              chunk: int, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Summed next-token cross entropy of hidden states (B, S, H) through an output weight (V, H)."""
    targets = (shifted_targets(labels) if targets is None else targets).flatten()
    return _LinearCrossEntropy.apply(hidden.flatten(0, 1), weight, targets, chunk)


def forward_chunked_loss_sum(model, batch: dict, attn_impl: str = "sdpa", chunk: int = 4096) -> torch.Tensor:
    """The chunked counterpart of core.loss.forward_loss_sum."""
    hidden = model(**model_inputs(batch, attn_impl)).logits
    return chunked_cross_entropy_sum(hidden, head_weight(model), None, chunk, next_token_targets(batch))


def apply(model, cfg, run=None):
    """--loss chunked / cce / liger: the output head returns hidden states (its weight Parameter
    unchanged), for the loss to multiply a chunk at a time. Call before sharding wraps the model."""
    # Those hidden states are a view (the model slices them for its head), which FSDP2 warns about at
    # every forward: an in-place op on them would skip its backward hook. The losses read them out of place.
    warnings.filterwarnings("ignore", r"FSDP2-wrapped module \(.*\) returned a view tensor", UserWarning)
    return hidden_head(model, f"--loss {cfg.loss.loss}")
