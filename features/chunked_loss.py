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

import contextlib
import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F

from features import UserError
from features.attention import model_inputs
from features.loss import IGNORE, next_token_targets, shifted_targets


@dataclasses.dataclass
class LossConfig:
    loss: Literal["auto", "ce", "chunked", "cce", "liger"] = "auto"
    """Loss: ce (full logits); chunked (pure PyTorch), cce (Cut Cross Entropy) or liger (Liger's fused linear CE) never materialize tokens x vocabulary logits; cce and liger need CUDA. auto: chunked for LoRA/QLoRA on a CUDA GPU, else ce."""  # noqa: E501
    loss_chunk: int | None = None
    """Tokens per chunk for --loss chunked; unset: 256 with a frozen head (LoRA), 4096 when the head trains (fewer passes over its fp32 gradient)."""  # noqa: E501


class HiddenHead(torch.nn.Module):
    """The output head that hands back its input: the model's `.logits` become hidden states."""

    def __init__(self, weight: torch.nn.Parameter):
        super().__init__()
        self.weight, self.hidden_only = weight, True

    def forward(self, x):
        return x if self.hidden_only else F.linear(x, self.weight)


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
            if grad_w is not None:  # an fp32 GEMM here (CUDA SIMT) was 19% of an 8B full fine-tune step
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


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def head_weight(model) -> torch.Tensor:
    """The output head's weight, whole. Under FSDP2 it is the gathered weight after a training
    forward (the root stays unsharded), but a sharded DTensor after an evaluation forward (resharded
    at once): gather it then (differentiable, so a DTensor head under TP works too)."""
    weight = _base(getattr(model, "module", model)).get_output_embeddings().weight
    return weight.full_tensor() if hasattr(weight, "full_tensor") else weight


def apply_chunked_loss(model, cfg: LossConfig):
    """Swap the output head for a HiddenHead; returns the model (call before DDP wrapping)."""
    if cfg.loss_chunk is not None and cfg.loss_chunk < 1:
        raise UserError(f"--loss-chunk must be at least 1 (got {cfg.loss_chunk})")
    base = _base(model)
    if getattr(base.config, "final_logit_softcapping", None):
        raise UserError(f"--loss {cfg.loss}: this model soft-caps its logits (Gemma 2); use --loss ce")
    base.set_output_embeddings(HiddenHead(base.get_output_embeddings().weight))
    return model


def forward_chunked_loss_sum(model, batch: dict, attn_impl: str = "sdpa", chunk: int = 4096) -> torch.Tensor:
    """The chunked counterpart of features.loss.forward_loss_sum."""
    hidden = model(**model_inputs(batch, attn_impl)).logits
    return chunked_cross_entropy_sum(hidden, head_weight(model), None, chunk, next_token_targets(batch))


@contextlib.contextmanager
def real_logits(model):
    """Let generate() see logits: the head multiplies by its weight again inside this block."""
    head = _base(model).get_output_embeddings()
    if not isinstance(head, HiddenHead):
        yield
        return
    head.hidden_only = False
    try:
        yield
    finally:
        head.hidden_only = True
