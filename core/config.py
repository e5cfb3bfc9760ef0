"""The loop's own settings (TrainConfig) and the checks of single values every run makes.

train.py composes TrainConfig with each module's config into one Config; `check_values` refuses a
value that cannot work (a negative learning rate, zero steps), naming the flag. Where a new check
goes: one value of the loop, the optimizer or the data, on its own, here; a value that depends on
another setting (adamw-sr and --precision), in its module's `validate(cfg)`; two feature flags
that cannot run together, in core/compat.py.
"""

import dataclasses
from typing import Literal

import torch

from core import UserError


@dataclasses.dataclass
class TrainConfig:
    micro_batch_size: int | None = None
    """Rows per forward/backward pass on each rank (samples, or packed --seq-len rows); unset: 2, or 4-8 on a GPU with room (core/defaults.py; the demo: 32)."""  # noqa: E501
    grad_accum: int | None = None
    """Micro-batches per optimizer step (global batch = micro-batch-size x grad-accum x ranks); unset: 8 rows a step (demo: 1)."""  # noqa: E501
    max_steps: int = -1
    """Optimizer steps to run; -1 derives them from --epochs."""
    epochs: float | None = None
    """Passes over the training data (fractions allowed), when --max-steps is -1; unset: 3 (the demo: 1.6)."""
    seed: int = 0
    """Seeds the weights of presets, the data order and dropout; not the held-out split (--val-seed)."""
    output_dir: str | None = None
    """Run directory (config, metrics, checkpoints, final model); default runs/<date-time>."""
    log_every: int = 25
    """Optimizer steps between log lines (step 1 and the last step are always logged)."""
    eval_every: int | None = None
    """Optimizer steps between validation passes; 0 = only before training and at the end; unset: once an epoch for a real model trained for more than one (core/defaults.py), else 0."""  # noqa: E501
    eval_exact_match: int | None = None
    """Validation samples scored by exact match of their greedy answer at every evaluation (0 = off); unset: 128 where the held-out answers are short (core/defaults.py), else off."""  # noqa: E501
    save_every: int = 0
    """Optimizer steps between checkpoints (0 = none; with N > 0 the last step is saved too)."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept on disk (0 keeps all)."""
    resume: str | None = None
    """A checkpoint directory to continue from, or 'auto' for the latest in --output-dir."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; auto picks CUDA when available."""
    skip_export: bool = False
    """Do not write the final model to <output-dir>/final (benchmarks; checkpoints still follow --save-every)."""


def adapters_on(lora_cfg) -> bool:
    """LoRA, QLoRA or 8-bit LoRA (`lora_cfg`: --lora's config): a frozen base under trained adapters."""
    return bool(lora_cfg.lora or lora_cfg.qlora or lora_cfg.lora_8bit)


def check_values(cfg) -> None:
    """Refuse values that cannot work, naming the flag and the fix (`cfg`: train.Config)."""
    t, o, d = cfg.train, cfg.optim, cfg.data
    checks = [
        (d.seq_len is None or d.seq_len >= 2, f"--seq-len must be at least 2 (got {d.seq_len})"),
        (o.lr is None or o.lr > 0, f"--lr must be positive (got {o.lr})"),
        (0 <= o.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1] (got {o.min_lr_ratio})"),
        (o.warmup_steps is None or o.warmup_steps >= 0, f"--warmup-steps must be >= 0 (got {o.warmup_steps})"),
        (o.weight_decay >= 0, f"--weight-decay must be >= 0 (got {o.weight_decay})"),
        (o.max_grad_norm >= 0, f"--max-grad-norm must be >= 0, 0 disables clipping (got {o.max_grad_norm})"),
        (t.micro_batch_size is None or t.micro_batch_size >= 1,
         f"--micro-batch-size must be at least 1 (got {t.micro_batch_size})"),
        (t.grad_accum is None or t.grad_accum >= 1, f"--grad-accum must be at least 1 (got {t.grad_accum})"),
        (t.max_steps > 0 or t.max_steps == -1,
         f"--max-steps must be positive, or -1 to use --epochs (got {t.max_steps})"),
        (t.max_steps > 0 or t.epochs is None or t.epochs > 0, f"--epochs must be positive (got {t.epochs})"),
        (t.log_every >= 1, f"--log-every must be at least 1 (got {t.log_every})"),
        (min(t.eval_every or 0, t.save_every, t.eval_exact_match or 0, t.keep_checkpoints) >= 0,
         "--eval-every, --save-every, --eval-exact-match and --keep-checkpoints must be >= 0"),
        (d.val_size >= 0, f"--val-size must be >= 0 (got {d.val_size})"),
        (t.resume != "auto" or t.output_dir is not None, "--resume auto needs --output-dir (the run to continue)"),
        (t.device != "cuda" or torch.cuda.is_available(), "--device cuda: no CUDA device is visible; use --device cpu"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
