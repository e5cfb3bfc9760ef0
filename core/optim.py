"""AdamW and the learning-rate schedule: linear warmup, then cosine or linear decay (or constant).

    python train.py --lr 2e-4 --warmup-steps 20 --lr-schedule cosine --min-lr-ratio 0.1

Weight decay applies to matrices only (not to norms or biases). AdamW is the fused CUDA kernel
on GPU and the foreach implementation elsewhere; `--optimizer adamw-8bit` is bitsandbytes' 8-bit
AdamW (block-wise quantized moments: 2 bytes of state per parameter instead of 8, for full
fine-tuning where the optimizer state is the largest piece of memory; Dettmers et al., "8-bit
Optimizers via Block-wise Quantization", 2022). Only parameters that require grad are given to
the optimizer, so a frozen base costs no optimizer memory or time.
"""

import dataclasses
import math
from typing import Literal

import torch

from core import UserError


@dataclasses.dataclass
class OptimConfig:
    optimizer: Literal["adamw", "adamw-8bit"] = "adamw"
    """adamw (torch; fused on CUDA) or adamw-8bit (bitsandbytes: 8-bit moments, a quarter of the state memory)."""
    lr: float | None = None
    """Peak learning rate; unset: 2e-4 for LoRA/QLoRA, 2e-5 for full fine-tuning, 2e-3 for the demo."""
    min_lr_ratio: float = 0.1
    """The schedule ends at lr * min-lr-ratio."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    warmup_steps: int | None = None
    """Linear warmup from 0 over this many optimizer steps; unset: 3% of the steps (the demo: 50)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay, on matrices only."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping; the norm is still logged)."""


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kwargs = dict(lr=cfg.lr, eps=cfg.adam_eps, betas=(cfg.adam_beta1, cfg.adam_beta2))
    if cfg.optimizer == "adamw-8bit":
        try:
            import bitsandbytes
        except ImportError as e:
            raise UserError("--optimizer adamw-8bit needs bitsandbytes: pip install bitsandbytes") from e
        return bitsandbytes.optim.AdamW8bit(groups, **kwargs)
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, **kwargs, fused=fused, foreach=not fused)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of --lr for the update made at optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def build_scheduler(optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))


def trained_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters the optimizer updates, read from its groups: a walk of a peft model's modules
    each step (thousands of them) would leave the GPU idle before the optimizer."""
    return [p for group in optimizer.param_groups for p in group["params"]]
