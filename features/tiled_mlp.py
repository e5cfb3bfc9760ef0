"""TiledMLP: each decoder MLP runs over the sequence in tiles, in forward and again in backward.

    python train.py --tiled-mlp                          # tiles of about hidden-size tokens (auto)
    python train.py --tiled-mlp --tiled-mlp-shards 8     # 8 tiles per sequence

A gated MLP holds tokens x intermediate-size activations for backward (gate, up, act(gate), their
product): for Llama-3.1-8B, 14336 values a token, 3.5x the hidden size, the largest activation
at long context. Here each MLP's forward becomes one autograd Function that runs the MLP tile by
tile under no_grad and saves only its input; backward recomputes each tile's MLP with grad and
backpropagates it at once, so at most one tile's intermediate activations exist at any time.
The Function takes the MLP's trainable parameters as inputs and returns their gradients, summed
over the tiles (one extra parameter-sized buffer per MLP, only while its backward runs), so
autograd accumulates each `.grad` once. Writing `.grad` from the inner backward instead (as
DeepSpeed's TiledMLP does) runs each parameter's accumulate-grad hooks once per tile: DDP's
reducer raises "marked a variable ready twice" (torch 2.13), or would all-reduce after the first
tile. The MLP's forward is wrapped as it is when the flag is applied (after the
adapters), so the tiles run peft's LoRA forward or the fused --lora-kernels one; parameter
names, adapters and checkpoints are untouched. Same loss and gradients as untiled
(tests/test_tiled_mlp.py). Auto tiling uses ceil(seq_len / hidden_size) tiles, as ALST does.
Reference: Arctic Long Sequence Training (Bekman et al., 2025, arXiv:2506.13996); DeepSpeed's
TiledMLP (deepspeed/runtime/sequence_parallel/ulysses_sp.py).
Works with: LoRA / QLoRA / --lora-kernels, --ac full|selective, --offload, packing, --ddp, --fsdp
(tests/test_tiled_mlp.py: 2 gloo ranks match one process).
Not with: MoE MLPs (no `gate_proj`/`up_proj`/`down_proj` MLP module found: refused).
"""

import dataclasses
import math
import types

import torch

from core import UserError


@dataclasses.dataclass
class TiledMLPConfig:
    tiled_mlp: bool = False
    """Run each decoder MLP over the sequence in tiles, recomputing each tile in backward (long context)."""
    tiled_mlp_shards: int = 0
    """Tiles per sequence for --tiled-mlp; 0 = auto, ceil(seq_len / hidden_size)."""


def validate(cfg) -> None:
    t = cfg.tiled_mlp
    if t.tiled_mlp_shards < 0:
        raise UserError(f"--tiled-mlp-shards must be >= 0, 0 = auto (got {t.tiled_mlp_shards})")
    if t.tiled_mlp_shards and not t.tiled_mlp:
        raise UserError("--tiled-mlp-shards is set but --tiled-mlp is off; add --tiled-mlp")


def _autocast_state(x: torch.Tensor):
    t = x.device.type
    return t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)


class TiledMLP(torch.autograd.Function):
    """y = fn(x), computed over `shards` tiles of the sequence dim (-2); saves only x."""

    @staticmethod
    def forward(ctx, fn, shards, x, *params):
        ctx.fn, ctx.shards, ctx.amp = fn, shards, _autocast_state(x)
        ctx.params = params  # the leaves to differentiate in backward (parameters: not saved tensors)
        ctx.save_for_backward(x)
        return torch.cat([fn(tile) for tile in x.chunk(shards, dim=-2)], dim=-2)  # Function.forward: no grad

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        device, enabled, dtype = ctx.amp
        want_dx, want_params = ctx.needs_input_grad[2], ctx.needs_input_grad[3:]
        params = [p for p, need in zip(ctx.params, want_params) if need]
        dx = torch.zeros_like(x) if want_dx else None
        dparams = [None] * len(params)
        start = 0
        for tile, dtile in zip(x.chunk(ctx.shards, dim=-2), dy.chunk(ctx.shards, dim=-2)):
            tile = tile.detach().requires_grad_(want_dx)
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                out = ctx.fn(tile)
            # autograd.grad, not backward: parameter hooks (DDP's) fire once, as autograd accumulates the sum
            grads = list(torch.autograd.grad(out, [tile, *params] if want_dx else params, dtile, allow_unused=True))
            if want_dx:
                dx[..., start:start + tile.shape[-2], :] = grads.pop(0)
            dparams = [_add(acc, g) for acc, g in zip(dparams, grads)]
            start += tile.shape[-2]
        summed = iter(dparams)
        return None, None, dx, *(next(summed) if need else None for need in want_params)


def _add(acc, g):
    """acc + g in place (acc is this backward's own buffer from the first tile); None is zero."""
    return g if acc is None else acc if g is None else acc.add_(g)


def auto_shards(seq_len: int, hidden_size: int) -> int:
    return max(1, math.ceil(seq_len / hidden_size))


def _tiled_forward(self, x):
    n = self._tile_shards or auto_shards(x.shape[-2], x.shape[-1])
    n = min(n, x.shape[-2])
    params = [p for p in self.parameters() if p.requires_grad]
    if n == 1 or not torch.is_grad_enabled() or not (x.requires_grad or params):
        return self._untiled_forward(x)
    return TiledMLP.apply(self._untiled_forward, n, x, *params)


def decoder_mlps(model) -> list[tuple[str, torch.nn.Module]]:
    """Gated decoder MLPs (Llama, Qwen2, Mistral, Gemma): modules named `mlp` with gate/up/down."""
    return [(name, m) for name, m in model.named_modules()
            if name.split(".")[-1] == "mlp" and all(hasattr(m, p) for p in ("gate_proj", "up_proj", "down_proj"))]


def apply_tiled_mlp(model, cfg: TiledMLPConfig):
    """Wrap every decoder MLP's current forward (peft's, --lora-kernels', or the model's own)."""
    mlps = decoder_mlps(model)
    if not mlps:
        raise UserError("--tiled-mlp: no gated decoder MLP (gate_proj/up_proj/down_proj) in this model; "
                        "drop --tiled-mlp")
    for _, mlp in mlps:
        # the bound forward as it is now: an instance forward (--lora-kernels) or the class's
        mlp._untiled_forward, mlp._tile_shards = mlp.forward, cfg.tiled_mlp_shards
        mlp.forward = types.MethodType(_tiled_forward, mlp)
    return model


def apply(model, cfg, run):
    """--tiled-mlp: each MLP's forward in sequence tiles, as the adapters and kernels left it."""
    return apply_tiled_mlp(model, cfg.tiled_mlp)
