"""Liger kernels: Triton RMSNorm, RoPE and SwiGLU/GeGLU for Llama, Mistral, Qwen2 and Gemma (GPU).

    python train.py --liger --lora                 # the kernels under a LoRA adapter
    python train.py --liger --loss liger           # with Liger's fused linear cross entropy too

Each RMSNorm module is swapped for a LigerRMSNorm holding the same weight Parameter (Gemma's
1 + w form via offset=1 and Gemma casting), so parameter names, checkpoints and exports are
unchanged. Each gated MLP keeps its gate/up/down projections (peft's LoRA layers once adapters
are added) and gets an instance forward that fuses act(gate) * up in one kernel, which saves
only gate and up for backward. RoPE has no module to swap: transformers calls the module-level
`apply_rotary_pos_emb` of the model's modeling file, so that one name is replaced by Liger's
kernel in that file (checked on transformers 5.24; the same thing Liger's own
apply_liger_kernel_to_llama does); it affects every model of that architecture in the process.
With --lora-kernels the MLP is already one fused LoRA Function, so --liger leaves MLPs to it.
Triton kernels: CUDA only, refused on CPU. Reference: Hsu et al., "Liger Kernel" (2024,
arXiv:2410.10989, github.com/linkedin/Liger-Kernel). Works with: LoRA / QLoRA, --lora-kernels
(norms and RoPE only), --tiled-mlp, --ac, --offload, --loss liger / cce / chunked.
Not with: other architectures (refused), CPU (refused).
"""

import dataclasses
import importlib
import importlib.util
import types

import torch

from core import UserError

_SUPPORTED = ("llama", "mistral", "qwen2", "gemma")


@dataclasses.dataclass
class LigerConfig:
    liger: bool = False
    """Liger Triton kernels for RMSNorm, RoPE and SwiGLU/GeGLU (Llama, Mistral, Qwen2, Gemma; CUDA only)."""


def validate(cfg) -> None:
    if not cfg.liger.liger:
        return
    if cfg.train.device == "cpu" or not torch.cuda.is_available():
        raise UserError("--liger runs Triton kernels and needs a CUDA GPU; drop --liger on CPU")
    if importlib.util.find_spec("liger_kernel") is None:
        raise UserError("--liger needs the liger-kernel package: pip install liger-kernel")


def _swap_norms(model, gemma: bool) -> None:
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    norms = [(name, m) for name, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")]
    for name, old in norms:
        eps = getattr(old, "variance_epsilon", getattr(old, "eps", 1e-6))
        new = (LigerRMSNorm(old.weight.shape[0], eps=eps, offset=1.0, casting_mode="gemma", init_fn="zeros")
               if gemma else LigerRMSNorm(old.weight.shape[0], eps=eps, offset=0.0, casting_mode="llama"))
        new.weight = old.weight  # the same Parameter: name, dtype, device and values unchanged
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)


def _glu_forward(self, x):
    """down(act(gate(x)) * up(x)) with the activation and the product in one kernel."""
    return self.down_proj(self._liger_glu.apply(self.gate_proj(x), self.up_proj(x)))


def _fuse_mlps(model, gemma: bool) -> None:
    if gemma:
        from liger_kernel.ops.geglu import LigerGELUMulFunction as glu
    else:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction as glu
    mlps = [m for name, m in model.named_modules()
            if name.split(".")[-1] == "mlp" and all(hasattr(m, p) for p in ("gate_proj", "up_proj", "down_proj"))]
    for mlp in mlps:
        mlp._liger_glu = glu
        mlp.forward = types.MethodType(_glu_forward, mlp)


def _patch_rope(model) -> None:
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    modeling = importlib.import_module(type(model).__module__)
    if not hasattr(modeling, "apply_rotary_pos_emb"):
        raise UserError(f"--liger: {type(model).__module__} has no apply_rotary_pos_emb to replace "
                        f"(a transformers version this was not checked on); drop --liger")
    modeling.apply_rotary_pos_emb = liger_rotary_pos_emb


def apply_liger(model, cfg: LigerConfig, fuse_mlp: bool = True):
    """Swap norms, fuse the gated MLPs (unless `fuse_mlp` is False: --lora-kernels fuses them) and
    replace RoPE; call on the base model, before adapters."""
    kind = getattr(model.config, "model_type", "?")
    if kind not in _SUPPORTED:
        raise UserError(f"--liger supports {', '.join(_SUPPORTED)} models, not {kind}; drop --liger")
    gemma = kind == "gemma"
    act = getattr(model.config, "hidden_activation", None) or getattr(model.config, "hidden_act", None)
    if act not in ("silu", "gelu_pytorch_tanh") or (act == "silu") == gemma:
        raise UserError(f"--liger: {kind} with activation {act} has no Liger kernel; drop --liger")
    _swap_norms(model, gemma)
    if fuse_mlp:
        _fuse_mlps(model, gemma)
    _patch_rope(model)
    return model


def apply(model, cfg, run):
    """--liger: Liger's norm / RoPE / GLU kernels; the MLPs are left to --lora-kernels when it is on
    (it fuses the adapted MLP itself, and Liger's MLP would hide the projections from it)."""
    return apply_liger(model, cfg.liger, fuse_mlp=not cfg.lora_kernels.lora_kernels)
