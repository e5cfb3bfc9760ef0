"""The training loss as a sum over tokens, so train.py can normalize by the global token count.

A step's loss is the sum of token losses over all its micro-batches and ranks divided by the
number of trained tokens in all of them (see train.py); a per-micro-batch mean instead would
weight a short micro-batch's tokens more than a long one's, and gradient accumulation would no
longer equal one big batch.

A loss of your own keeps that contract: a sum over the trained positions (targets != IGNORE), never a
mean. train.py's `build_loss` picks the function for --loss; the same function gives the validation
loss (core/evaluate.py), so an added term shows there too. Under --compile, `build_loss` hands the
function it picked to features/compile.compile_loss. --loss chunked, cce and liger compute their own
sums (features/chunked_loss.py, features/fused_loss.py).
"""

import contextlib
import dataclasses
import importlib.util
from typing import Literal

import torch
import torch.nn.functional as F

from core import UserError
from core.attention import model_inputs
from core.records import IGNORE


@dataclasses.dataclass
class LossConfig:
    loss: Literal["auto", "ce", "chunked", "cce", "liger"] = "auto"
    """Loss: ce (full logits); chunked (pure PyTorch), cce (Cut Cross Entropy) or liger (Liger's fused linear CE) never materialize tokens x vocabulary logits; cce and liger need CUDA. auto: ce, or chunked for LoRA/QLoRA on a CUDA GPU where the full logits would crowd its memory (core/defaults.py)."""  # noqa: E501
    loss_chunk: int | None = None
    """Tokens per chunk for --loss chunked; unset: 256 with a frozen head (LoRA), 4096 when the head trains (fewer passes over its fp32 gradient)."""  # noqa: E501


_FUSED_PACKAGES = {"cce": ("cut_cross_entropy", "cut-cross-entropy"), "liger": ("liger_kernel", "liger-kernel")}


def validate(cfg) -> None:
    """--loss-chunk, and --loss cce / liger without their package (the compatibility matrix refuses them
    on CPU first; features/fused_loss.py)."""
    loss = cfg.loss
    if loss.loss_chunk is not None and loss.loss_chunk < 1:
        raise UserError(f"--loss-chunk must be at least 1 (got {loss.loss_chunk})")
    if loss.loss not in _FUSED_PACKAGES:
        return
    module, package = _FUSED_PACKAGES[loss.loss]
    if importlib.util.find_spec(module) is None:
        raise UserError(f"--loss {loss.loss} needs the {package} package: pip install {package} "
                        f"(or use --loss chunked)")


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


# ---- the head swap of the losses on hidden states (features/chunked_loss.py, features/fused_loss.py)

class HiddenHead(torch.nn.Module):
    """The output head that hands back its input: the model's `.logits` become hidden states."""

    def __init__(self, weight: torch.nn.Parameter):
        super().__init__()
        self.weight, self.hidden_only = weight, True

    def forward(self, x):
        return x if self.hidden_only else F.linear(x, self.weight)


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def head_weight(model) -> torch.Tensor:
    """The output head's weight, whole. Under FSDP2 it is the gathered weight after a training
    forward (the root stays unsharded), but a sharded DTensor after an evaluation forward (resharded
    at once): gather it then (differentiable, so a DTensor head under TP works too)."""
    weight = _base(getattr(model, "module", model)).get_output_embeddings().weight
    return weight.full_tensor() if hasattr(weight, "full_tensor") else weight


def hidden_head(model, flag: str):
    """Swap the output head for a HiddenHead (same weight Parameter, so optimizers, checkpoints and
    exports see `lm_head.weight` unchanged); returns the model."""
    base = _base(model)
    if getattr(base.config, "final_logit_softcapping", None):
        raise UserError(f"{flag}: this model soft-caps its logits (Gemma 2); use --loss ce")
    base.set_output_embeddings(HiddenHead(base.get_output_embeddings().weight))
    return model


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
