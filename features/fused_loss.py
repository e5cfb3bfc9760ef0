"""Fused linear cross entropy on GPU: Cut Cross Entropy or Liger's kernel, never the full logits.

    python train.py --loss cce      # Apple's Cut Cross Entropy (pip install cut-cross-entropy)
    python train.py --loss liger    # Liger's fused linear cross entropy (pip install liger-kernel)

Both take the final hidden states and the output weight, like --loss chunked, and use its head
swap (features/chunked_loss.py: the head returns hidden states, its weight Parameter unchanged).
CCE computes the log-sum-exp block by block in SRAM and, by default, skips gradient blocks below
bf16 precision (its filter_eps="auto"); Liger materializes one chunk of logits at a time and
computes the gradients in forward. Both are Triton kernels: CUDA only, refused on CPU (use
--loss chunked there, which is exact). Under bf16 autocast the hidden states and the head weight
go in as bf16, as the plain head's matmul would; the loss is summed (reduction="sum") over the
shifted targets, so train.py's token accounting is unchanged. Same loss as cross entropy within
bf16 tolerance (tests/test_fused_loss.py, GPU-marked; the glue is tested on CPU with a reference
kernel). Does not work with final-logit soft-capping (Gemma 2): refused.
References: Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models" (2024,
arXiv:2411.09009, github.com/apple/ml-cross-entropy); Hsu et al., "Liger Kernel" (2024,
arXiv:2410.10989, github.com/linkedin/Liger-Kernel).
"""

import torch

from core.attention import model_inputs
from core.loss import IGNORE, head_weight, next_token_targets, shifted_targets


def _cce(hidden, weight, targets):
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE, reduction="sum")


def _liger(hidden, weight, targets):
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    out = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")(weight, hidden, targets)
    # the loss alone, or with extras (z-loss, accuracy) as a tuple or an output object, by version
    return out[0] if isinstance(out, tuple) else getattr(out, "loss", out)


_KERNELS = {"cce": _cce, "liger": _liger}


def fused_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                            kernel: str, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Summed next-token cross entropy of hidden states (B, S, H) through an output weight (V, H)."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    targets = (shifted_targets(labels) if targets is None else targets).flatten()
    with torch.autocast(device, enabled=False):  # the kernels take one dtype for both operands
        loss = _KERNELS[kernel](hidden.flatten(0, 1).to(dtype), weight.to(dtype), targets)
    return loss.float()


def forward_fused_loss_sum(model, batch: dict, attn_impl: str = "sdpa", kernel: str = "cce") -> torch.Tensor:
    """The fused-kernel counterpart of core.loss.forward_loss_sum."""
    hidden = model(**model_inputs(batch, attn_impl)).logits
    return fused_cross_entropy_sum(hidden, head_weight(model), None, kernel, next_token_targets(batch))

