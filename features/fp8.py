"""FP8 training through torchao: the decoder's large linears run their three matmuls in float8.

    python train.py --model llama3-8b --precision bf16 --fp8 tensorwise --compile
    torchrun --nproc_per_node 8 train.py --model llama3-8b --fp8 tensorwise --compile --fsdp

`convert_to_float8_training` swaps nn.Linear for torchao's Float8Linear: inputs, weights and output
gradients are scaled dynamically and cast to e4m3 (tensorwise: gradients e5m2, one scale per
tensor; rowwise: one scale per row, all e4m3, more accurate, a little slower), and the matmuls run
on FP8 tensor cores. Only layers whose shapes gain are converted: both dims divisible by 16 (the
FP8 GEMM needs it) and above the size thresholds of torchao's H100 tables (tensorwise: skip when
in <= 4096 and out <= 1024; rowwise: skip when out <= 2048, in <= 1024, or out <= 4096 and
in <= 2048), never lm_head. The log lists what was converted; --fp8-all-linears converts every
divisible decoder linear. The casts are separate kernels unless torch.compile fuses them, so use
it with --compile (per decoder block): without, FP8 is usually slower than bf16.
Under --fsdp with tensorwise scaling, the weights are all-gathered in FP8 (half the bytes of
bf16); their scales for the next step are computed for all layers at once by
`precompute_float8_dynamic_scale_for_fsdp` in an optimizer post-step hook (`register_hooks`).

Reference: torchao.float8 (torchao 0.18); torchtitan docs/float8.md; Micikevicius et al., "FP8
Formats for Deep Learning" (2022, arXiv:2209.05433).
Works with: full fine-tuning, --precision bf16 / bf16-mixed, --compile, --fsdp, --ac, --packing.
Refused with: CPU and GPUs before Ada/Hopper (compute capability < 8.9), adapters (--lora /
--qlora / --lora-8bit / --gptq: the frozen base gains little), --qat.
"""

import dataclasses
from typing import Literal

import torch

from core import UserError, optional

optional.quiet_torchao()  # torchao prints at import: filtered before --qat or --fp8 imports it


@dataclasses.dataclass
class Fp8Config:
    fp8: Literal["none", "tensorwise", "rowwise"] = "none"
    """FP8 training of the large decoder linears (CUDA, compute capability >= 8.9): tensorwise or rowwise scaling."""
    fp8_all_linears: bool = False
    """Convert every decoder linear whose dims divide by 16, also the small ones where FP8 does not pay off."""


def validate(cfg) -> None:
    """Refuse FP8 where this GPU cannot run it (an adapter, --qat, --fp8-all-linears alone: core/compat.py)."""
    if cfg.fp8.fp8 == "none":
        return
    problem = hardware_problem(cfg.train.device)
    if problem:
        raise UserError(f"--fp8 {cfg.fp8.fp8}: {problem}; use --precision bf16 instead")


def hardware_problem(device: str = "auto") -> str | None:
    """Why FP8 matmuls cannot run here (None when they can)."""
    if device == "cpu" or not torch.cuda.is_available():
        return "FP8 training needs a CUDA GPU (none is used here)"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return (f"{torch.cuda.get_device_name()} has compute capability {major}.{minor}; FP8 tensor cores "
                f"need 8.9 or newer (Ada, Hopper, Blackwell)")
    return None


def worth_converting(linear: torch.nn.Linear, recipe: str, all_linears: bool = False) -> bool:
    """torchao's shape rules: dims divisible by 16, and large enough that FP8 beats bf16 (H100)."""
    n, k = linear.out_features, linear.in_features
    if n % 16 or k % 16:
        return False
    if all_linears:
        return True
    if recipe == "tensorwise":
        return not (k <= 4096 and n <= 1024)
    return not (n <= 2048 or k <= 1024 or (n <= 4096 and k <= 2048))


def float8_config(cfg: Fp8Config, fsdp: bool = False, emulate: bool = False):
    from torchao.float8 import Float8LinearConfig

    config = Float8LinearConfig.from_recipe_name(cfg.fp8)
    # FP8 all-gather needs one scale per tensor; rowwise weights are gathered in bf16
    return dataclasses.replace(config, enable_fsdp_float8_all_gather=fsdp and cfg.fp8 == "tensorwise",
                               emulate=emulate)


def apply_fp8(model, cfg: Fp8Config, fsdp: bool = False, compiled: bool = True, emulate: bool = False, say=print):
    """Swap the worthwhile decoder linears for Float8Linear, in place; returns the model.

    emulate: compute in high precision with FP8 rounding (torchao's emulation; CPU tests only).
    """
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as e:
        raise UserError(f"--fp8 needs torchao (pip install 'torchao>=0.18'): {e}") from e
    head = model.get_output_embeddings()
    chosen = {name for name, m in model.named_modules() if type(m) is torch.nn.Linear and m is not head
              and worth_converting(m, cfg.fp8, cfg.fp8_all_linears)}
    skipped = sorted({f"{m.out_features}x{m.in_features}" for n, m in model.named_modules()
                      if type(m) is torch.nn.Linear and m is not head and n not in chosen})
    if not chosen:
        raise UserError(f"--fp8 {cfg.fp8}: no decoder linear is large enough to gain from FP8 (shapes "
                        f"{', '.join(skipped)}); add --fp8-all-linears to convert them anyway, or drop --fp8")
    convert_to_float8_training(model, config=float8_config(cfg, fsdp, emulate),
                               module_filter_fn=lambda m, fqn: fqn in chosen)
    kinds = sorted({n.rsplit(".", 1)[-1] for n in chosen})
    say(f"fp8: {cfg.fp8} scaling on {len(chosen)} linears ({', '.join(kinds)}); kept in bf16: lm_head"
        + (f", shapes {', '.join(skipped)}" if skipped else "")
        + ("" if compiled else "; without --compile the casts run as separate kernels: expect no speed-up"))
    return model


def register_hooks(model, optimizer, cfg: Fp8Config, fsdp: bool = False):
    """With FP8 all-gather under FSDP2: precompute every weight's scale after each optimizer step
    (one fused amax all-reduce instead of one per layer). Returns the hook handle or None."""
    if not (fsdp and cfg.fp8 == "tensorwise"):
        return None
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    return optimizer.register_step_post_hook(lambda *_: precompute_float8_dynamic_scale_for_fsdp(model))


def apply(model, cfg, run):
    """--fp8: Float8Linear swaps, before FSDP wraps them (FP8 all-gather) and before compile."""
    return apply_fp8(model, cfg.fp8, fsdp=cfg.sharding.fsdp, compiled=cfg.compile.compile, say=run.say)
