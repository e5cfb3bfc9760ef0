"""The training loss as a sum over tokens, so train.py can normalize by the global token count.

A step's loss is the sum of token losses over all its micro-batches and ranks divided by the
number of trained tokens in all of them (see train.py); a per-micro-batch mean instead would
weight a short micro-batch's tokens more than a long one's, and gradient accumulation would no
longer equal one big batch.
"""

import torch
import torch.nn.functional as F

from features.attention import model_inputs

IGNORE = -100


def count_targets(labels: torch.Tensor) -> int:
    """Trained tokens in a batch: labels are unshifted, so position 0 is never a target."""
    return int((labels[:, 1:] != IGNORE).sum())


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """targets[:, t] is the token position t must predict (labels[:, t + 1]); the last is ignored."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def next_token_targets(batch: dict) -> torch.Tensor:
    """Each position's target: `shift_labels` when the batch carries them already shifted (a
    sequence-parallel shard, whose last token's target lives on another rank; transformers' name),
    else `labels` shifted by one."""
    return batch["shift_labels"] if "shift_labels" in batch else shifted_targets(batch["labels"])


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Summed next-token cross entropy (in fp32, or fp64 for fp64 logits) over the trained positions
    (`targets`, if given, are already shifted and `labels` is not used)."""
    targets = shifted_targets(labels) if targets is None else targets
    logits = logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least
    return F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE, reduction="sum")


def forward_loss_sum(model, batch: dict, attn_impl: str = "sdpa", ce=cross_entropy_sum) -> torch.Tensor:
    """Run the model on a batch (inputs shaped for the attention backend) and sum the token losses
    (`ce`: cross_entropy_sum, or its compiled form under --compile, features/compile.compile_loss)."""
    return ce(model(**model_inputs(batch, attn_impl)).logits, None, next_token_targets(batch))
