"""Activation checkpointing per decoder block: recompute in backward instead of keeping activations.

    python train.py --ac full                   # every decoder block keeps only its input
    python train.py --ac full --ac-every 2      # every 2nd block: half the recompute, half the saving
    python train.py --ac selective              # every block keeps its matmul and attention outputs,
                                                # recomputes the cheap pointwise ops (norms, SiLU, RoPE)

Through the decoder layers' own hook, transformers' GradientCheckpointingLayer: each chosen block
gets `gradient_checkpointing = True` and a non-reentrant `torch.utils.checkpoint` function (the
selective one with torch's selective-checkpoint policy), so parameter names, peft adapters and
checkpoints are untouched. Non-reentrant checkpointing needs no `enable_input_require_grads` for
frozen-base LoRA. Gradients are the same as without checkpointing (tests/test_checkpointing.py).
Works with LoRA / QLoRA / --lora-kernels, packing, every attention backend, DDP.
Reference: Chen et al., "Training Deep Nets with Sublinear Memory Cost" (2016); torch's
selective activation checkpointing (torch.utils.checkpoint.create_selective_checkpoint_contexts).
"""

import dataclasses
import functools
from typing import Literal

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from core import UserError
from core.model import decoder_blocks

# Outputs worth keeping under --ac selective: expensive to recompute, and (for attention) the
# kernels' own saved state. Everything else is recomputed.
_KEEP = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
         torch.ops.aten._scaled_dot_product_flash_attention.default,
         torch.ops.aten._scaled_dot_product_efficient_attention.default,
         torch.ops.aten._scaled_dot_product_cudnn_attention.default}


@dataclasses.dataclass
class CheckpointingConfig:
    ac: Literal["none", "full", "selective"] = "none"
    """Activation checkpointing per decoder block: full (keep only block inputs) or selective (keep matmul outputs)."""
    ac_every: int = 1
    """Checkpoint every N-th decoder block (1 = all); the others keep their activations."""


def _keep_matmuls(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _KEEP else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpoint_fn(mode: str):
    if mode == "selective":
        context = functools.partial(create_selective_checkpoint_contexts, _keep_matmuls)
        return functools.partial(checkpoint, use_reentrant=False, context_fn=context)
    return functools.partial(checkpoint, use_reentrant=False)


def apply_checkpointing(model, cfg: CheckpointingConfig):
    if cfg.ac_every < 1:
        raise UserError(f"--ac-every must be at least 1 (got {cfg.ac_every})")
    blocks = decoder_blocks(model)
    if not blocks:
        raise UserError("--ac: this model's decoder layers have no checkpointing hook "
                        "(transformers' GradientCheckpointingLayer); use --ac none")
    fn = _checkpoint_fn(cfg.ac)
    for i, block in enumerate(blocks):
        if i % cfg.ac_every == 0:
            block.gradient_checkpointing, block._gradient_checkpointing_func = True, fn
    return model


def apply(model, cfg, run):
    """--ac full / selective: each decoder block recomputed in backward."""
    return apply_checkpointing(model, cfg.checkpointing)
