"""What a feature's `apply(model, cfg, run)` may read besides the flags: where and how this run trains."""

import dataclasses
from typing import Callable

import torch

from core.distributed import Dist


@dataclasses.dataclass
class Run:
    d: Dist
    """The processes: rank, world size, device, and the device mesh (core/distributed.py)."""
    attn_impl: str
    """The attention implementation the model runs (core/attention.py)."""
    precision: str
    """The resolved --precision (fp32, bf16, bf16-mixed)."""
    model_config: object
    """The model's transformers config (after --rope-scaling and other overrides)."""
    say: Callable[..., None] = print
    """Rank 0's log line (a no-op on other ranks)."""

    @property
    def device(self) -> torch.device:
        return self.d.device
