"""Fused LoRA kernels: the base matmul and the low-rank path in one autograd Function.

    python train.py --lora --lora-kernels                       # bf16/fp32 frozen base
    python train.py --qlora --precision bf16 --lora-kernels     # NF4 base, dequantized per matmul

peft computes a LoRA linear as base(x) + lora_B(lora_A(dropout(x))) * s, and autograd saves what
every one of those ops needs; in a SwiGLU MLP it also keeps silu(gate) and h = silu(gate) * up,
and on a bf16 base with fp32 adapters one fp32 copy of x per adapter. Here each decoder MLP is one
Function that saves X, gate, up and the rank-r products X A^T (and h A_d^T), and recomputes
silu(gate) and h in backward; each other LoRA linear (q/k/v/o, or an MLP projection when not all
three are adapted) is one Function that saves X and X A^T. Gradients (dX, dA, dB) are written out
by hand; base weights are frozen and get none. Pure PyTorch: runs on CPU and CUDA, under bf16
autocast too. The math follows unsloth's fast_lora (github.com/unslothai/unsloth,
unsloth/kernels/fast_lora.py), written here without Triton.

Attention is fused per projection, not as one q/k/v Function: the three calls share one input
tensor, so autograd holds X once for all three anyway (a saved tensor is a reference, not a copy),
and no attention code has to be copied from transformers. One cost of that choice: a saved-tensor
hook that copies (activation offload) packs X once per projection.

Works with: --lora, --qlora (bitsandbytes Params4bit base, dequantized in forward and again in
backward, never kept), MLP activation silu or gelu_pytorch_tanh (Llama, Qwen2, Mistral, Gemma),
frozen base biases (Qwen2's q/k/v), activation checkpointing, peft's save_pretrained,
`with model.disable_adapter()` (falls back to peft's forward). Does not work with: --lora-dropout
above 0, --dora, --lora-8bit, LoRA biases or a trainable base bias, several active adapters.
"""

import dataclasses
import types

import torch
import torch.nn.functional as F

from core import UserError
from core.ops import opaque_op
from core.quantize import dequantize_packed, is_4bit, packed_4bit

_ACTS = {  # class name of transformers' act_fn -> (activation, its backward(grad, x)): aten ops
    "SiLUActivation": (F.silu, torch.ops.aten.silu_backward),
    "SiLU": (F.silu, torch.ops.aten.silu_backward),
    "GELUTanh": (lambda x: F.gelu(x, approximate="tanh"),
                 lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="tanh")),
}


@dataclasses.dataclass
class LoraKernelsConfig:
    lora_kernels: bool = False
    """Fused LoRA autograd kernels for the MLP and the attention projections (--lora/--qlora, no dropout); on by default on a CUDA GPU where they apply."""  # noqa: E501
    no_lora_kernels: bool = False
    """Run peft's own LoRA layers, also on a CUDA GPU (where --lora-kernels is on by default)."""


def validate(cfg) -> None:
    """Refuse, before the model loads, a value apply_lora_kernels would refuse after (the adapter
    modes and --dora it needs or refuses: core/compat.py)."""
    if cfg.lora_kernels.lora_kernels and cfg.lora.lora_dropout > 0:
        raise UserError(_DROPOUT.format(cfg.lora.lora_dropout))


_FIX = "; drop --lora-kernels or"
_DROPOUT = "--lora-kernels has no dropout (--lora-dropout is {})" + _FIX + " pass --lora-dropout 0"
_DORA = "--lora-kernels computes plain LoRA, not DoRA" + _FIX + " drop --dora"


# ---- the frozen base layer: a plain weight, or a bitsandbytes 4-bit one dequantized per call


def _weight(base) -> torch.Tensor:
    """The base layer's (out, in) weight. A 4-bit weight is dequantized on every call, so the dense
    copy lives for one matmul in forward and one in backward and is never saved (QLoRA's saving)."""
    if not is_4bit(base):
        return base.weight
    import bitsandbytes.functional as bnbF
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    fix_4bit_weight_quant_state_from_module(base)  # as Linear4bit.forward does (bitsandbytes 0.50.2)
    return bnbF.dequantize_4bit(base.weight, base.weight.quant_state)


def _compute_dtype(base, x: torch.Tensor) -> torch.dtype:
    """bnb's Linear4bit computes in its compute_dtype (set from the first input when unset)."""
    return (getattr(base, "compute_dtype", None) or x.dtype) if is_4bit(base) else x.dtype


def _base_linear(x: torch.Tensor, base) -> torch.Tensor:
    dt = _compute_dtype(base, x)
    w, bias = _weight(base), base.bias
    y = F.linear(x.to(dt), w.to(dt), None if bias is None else bias.to(dt))
    return y if dt == x.dtype else y.to(x.dtype)  # as Linear4bit: returns the input dtype


def _base_grad(dy: torch.Tensor, base, x: torch.Tensor) -> torch.Tensor:
    dt = _compute_dtype(base, x)
    return dy.to(dt) @ _weight(base).to(dt)


# ---- one LoRA linear on 2-D (tokens, features) tensors: y = base(x) + s (x A^T) B^T


def _linear_plus(x, w, bias, c, d, s: float):
    """F.linear(x, w, bias) + s c d: the low-rank product c d is added into the base product's output
    by one GEMM with beta = 1 (addmm_), in place. Under torch.compile the same two calls go through
    the opaque op below (core/ops.py): functionalization (torch 2.13) would turn addmm_ into an
    out-of-place addmm, which CUDA runs as a full copy of its (tokens, out) input followed by the GEMM,
    a `Memcpy DtoD` per LoRA linear in forward and backward: 14 per decoder block, a measurable share
    of the 8B-shape LoRA step (benchmarks/results/2026-11-29-copies-cpu.md). Eager calls skip the op's
    dispatch."""
    if torch.compiler.is_compiling():
        return torch.ops.nanotune.linear_plus(x, w, bias, c, d, float(s))
    return _linear_plus_eager(x, w, bias, c, d, s)


def _linear_plus_eager(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, c: torch.Tensor,
                       d: torch.Tensor, s: float) -> torch.Tensor:
    return F.linear(x, w, bias).addmm_(c, d, alpha=s)


opaque_op("linear_plus", _linear_plus_eager,
          lambda x, w, bias, c, d, s: x.new_empty((x.shape[0], w.shape[0])))  # mm/addmm outputs are contiguous


def _base_plus(x, base, c, d, s: float, transpose: bool = False) -> torch.Tensor:
    """x W^T + bias + s c d (transpose: x W + s c d, the input gradient), W the frozen base weight.

    A 4-bit W under torch.compile goes through one opaque op that dequantizes inside it. Were the
    dequantized copy a value of the traced graph, the min-cut partitioner would save it for backward
    instead of dequantizing again (it never recomputes a custom op such as bitsandbytes'): a bf16
    copy of every decoder weight held from forward to backward, more than a bf16 base's own memory."""
    bias = None if transpose or base.bias is None else base.bias.to(x.dtype)
    if hasattr(base, "fp8_matmul"):  # --fp8-base: the two FP8 matmuls of features/fp8_base.py, s c d inside
        return base.fp8_grad_input(x, (c, d, s, None)) if transpose else base.fp8_matmul(x, (c, d, s, bias))
    if is_4bit(base) and torch.compiler.is_compiling():
        return torch.ops.nanotune.linear4bit_plus(x, *packed_4bit(base), transpose, bias, c, d, float(s))
    w = _weight(base).to(x.dtype)
    return _linear_plus(x, w.t() if transpose else w, bias, c, d, s)


def _linear4bit_plus(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                     absmax2: torch.Tensor | None, code2: torch.Tensor | None, offset: torch.Tensor | None,
                     blocksize: int, blocksize2: int, shape: list[int], transpose: bool,
                     bias: torch.Tensor | None, c: torch.Tensor, d: torch.Tensor, s: float) -> torch.Tensor:
    w = dequantize_packed(packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, shape, x.dtype)
    return _linear_plus_eager(x, w.t() if transpose else w, bias, c, d, s)


def _linear4bit_plus_fake(x, packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, shape, transpose,
                          bias, c, d, s):
    return x.new_empty((x.shape[0], shape[1] if transpose else shape[0]))


opaque_op("linear4bit_plus", _linear4bit_plus, _linear4bit_plus_fake)


def _lora_forward(x, A, B, base, s):
    """(y, x A^T). The low-rank path runs in the base output's dtype, with fp32 accumulation inside
    the matmuls: on a bf16 base the fp32 adapters (the optimizer's master copy) are cast to bf16 per
    call, as bf16 autocast does, and s (x A^T) B^T is added into y by one matmul with beta = 1
    (addmm_). Computing it in fp32, as peft does on a pure-bf16 base, writes and reads fp32
    (tokens, out) tensors per adapter: 7 adapters x 32 layers of them cost more time than the
    base matmuls on the 8B shape (benchmarks/results/2026-11-25-perf.md)."""
    dt = _compute_dtype(base, x)
    if dt != x.dtype:  # a 4-bit base computing in another dtype than x's: y comes back in x's
        y = _base_linear(x, base)
        xa = x.to(y.dtype) @ A.t().to(y.dtype)
        return y.addmm_(xa, B.t().to(y.dtype), alpha=s), xa
    xa = x @ A.t().to(dt)  # in base(x)'s dtype: dt, or the autocast dtype (matmul and linear cast alike)
    ot = xa.dtype
    return _base_plus(x.to(ot), base, xa, B.t().to(ot), s), xa


def _lora_backward(dy, x, xa, A, B, base, s, dx=None, need_dx=True):
    """(dx, dA, dB) of _lora_forward; dx is accumulated into `dx` when given (a shared input).
    need_dx=False skips the base matmul for an input without grad (layer 0's q/k/v: the
    embeddings are frozen). dA and dB come back in the adapters' own dtype."""
    dt = xa.dtype
    dyl = dy.to(dt)
    dB = (dyl.t() @ xa).mul_(s).to(B.dtype)
    dxa = (dyl @ B.to(dt)).mul_(s)
    dA = (dxa.t() @ x.to(dt)).to(A.dtype)
    if not need_dx:
        return None, dA, dB
    if not is_4bit(base) or _compute_dtype(base, x) == dt:  # dy W + dxa A in dt (_base_grad's dtype)
        g = _base_plus(dy.to(dt), base, dxa, A.to(dt), 1.0, transpose=True).to(x.dtype)
    else:
        g = _base_grad(dy, base, x).to(dt).addmm_(dxa, A.to(dt)).to(x.dtype)
    return (g if dx is None else dx.add_(g)), dA, dB


def _autocast_state(x: torch.Tensor):
    """Backward must run under the autocast state of forward (what torch.amp.custom_bwd does, for
    whichever device the input is on)."""
    t = x.device.type
    return t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)


def _autocast(state):
    t, enabled, dtype = state
    return torch.autocast(t, dtype=dtype, enabled=enabled)


class LoRALinear(torch.autograd.Function):
    """y = base(X) + s (X A^T) B^T; saves X and X A^T."""

    @staticmethod
    def forward(ctx, X, A, B, base, s):
        ctx.base, ctx.s, ctx.amp = base, s, _autocast_state(X)
        y, xa = _lora_forward(X.reshape(-1, X.shape[-1]), A, B, base, s)
        ctx.save_for_backward(X, xa, A, B)
        return y.view(*X.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dY):
        X, xa, A, B = ctx.saved_tensors
        with _autocast(ctx.amp):
            dX, dA, dB = _lora_backward(dY.reshape(-1, dY.shape[-1]), X.reshape(-1, X.shape[-1]),
                                        xa, A, B, ctx.base, ctx.s, need_dx=ctx.needs_input_grad[0])
        return None if dX is None else dX.view_as(X), dA, dB, None, None


class LoRAMLP(torch.autograd.Function):
    """down(act(gate(X)) * up(X)), each projection a LoRA linear; saves X, gate, up and the
    rank-r products, and recomputes act(gate) and h = act(gate) * up in backward."""

    @staticmethod
    def forward(ctx, X, Ag, Bg, Au, Bu, Ad, Bd, bases, scales, act):
        ctx.bases, ctx.scales, ctx.act, ctx.amp = bases, scales, act, _autocast_state(X)
        x = X.reshape(-1, X.shape[-1])
        gate, xag = _lora_forward(x, Ag, Bg, bases[0], scales[0])
        up, xau = _lora_forward(x, Au, Bu, bases[1], scales[1])
        out, had = _lora_forward(_ACTS[act][0](gate) * up, Ad, Bd, bases[2], scales[2])
        ctx.save_for_backward(X, gate, up, xag, xau, had, Ag, Bg, Au, Bu, Ad, Bd)
        return out.view(*X.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dOut):
        X, gate, up, xag, xau, had, Ag, Bg, Au, Bu, Ad, Bd = ctx.saved_tensors
        (bg, bu, bd), (sg, su, sd), (act, act_grad) = ctx.bases, ctx.scales, _ACTS[ctx.act]
        x = X.reshape(-1, X.shape[-1])
        with _autocast(ctx.amp):
            a = act(gate)
            # up * a, not a * up: traced by torch.compile, the forward's a * up would be the same node
            # (common-subexpression elimination), and the partitioner then saves that (tokens,
            # intermediate) product from forward to backward: 7 GiB at the 8B shape and 8,192 tokens
            h = up * a
            dh, dAd, dBd = _lora_backward(dOut.reshape(-1, dOut.shape[-1]), h, had, Ad, Bd, bd, sd)
            del h
            dgate = act_grad(dh * up, gate)
            need_dx = ctx.needs_input_grad[0]
            dX, dAg, dBg = _lora_backward(dgate, x, xag, Ag, Bg, bg, sg, need_dx=need_dx)
            del dgate
            dup = dh.mul_(a)  # d up = dh * act(gate), in place: dh is not needed any more
            dX, dAu, dBu = _lora_backward(dup, x, xau, Au, Bu, bu, su, dx=dX, need_dx=need_dx)
        return None if dX is None else dX.view_as(X), dAg, dBg, dAu, dBu, dAd, dBd, None, None, None


# ---- installing the kernels on a peft model


def _adapter(layer):
    """(A, B, scale) of the layer's one active adapter, or None when peft's own forward must run:
    adapters disabled or merged (`with model.disable_adapter()`), or another adapter set."""
    names = [n for n in layer.active_adapters if n in layer.lora_A]
    if layer.disable_adapters or layer.merged or len(names) != 1:
        return None
    return layer.lora_A[names[0]].weight, layer.lora_B[names[0]].weight, layer.scaling[names[0]]


def _proj_forward(self, x, *args, **kwargs):
    parts = _adapter(self)
    if parts is None or args or kwargs:
        return type(self).forward(self, x, *args, **kwargs)
    A, B, s = parts
    return LoRALinear.apply(x, A, B, self.base_layer, s)


def _mlp_forward(self, x):
    parts = [_adapter(p) for p in (self.gate_proj, self.up_proj, self.down_proj)]
    if any(p is None for p in parts):
        return type(self).forward(self, x)
    (Ag, Bg, sg), (Au, Bu, su), (Ad, Bd, sd) = parts
    bases = (self.gate_proj.base_layer, self.up_proj.base_layer, self.down_proj.base_layer)
    return LoRAMLP.apply(x, Ag, Bg, Au, Bu, Ad, Bd, bases, (sg, su, sd), type(self.act_fn).__name__)


def _check_layer(layer, name: str) -> None:
    """Refuse what the kernels do not compute, naming the flag to change."""
    for n in layer.active_adapters:
        drop = layer.lora_dropout[n]
        if isinstance(drop, torch.nn.Dropout) and drop.p > 0:
            raise UserError(_DROPOUT.format(drop.p))
        if layer.use_dora.get(n):
            raise UserError(_DORA)
        if layer.lora_variant.get(n) is not None or layer.lora_bias.get(n):
            raise UserError(f"--lora-kernels: {name} uses a LoRA variant or a LoRA bias{_FIX} use plain LoRA")
    if len(layer.active_adapters) != 1:
        raise UserError(f"--lora-kernels needs exactly one active adapter ({name} has {layer.active_adapters})")
    base = layer.base_layer
    if not is_4bit(base) and not base.weight.dtype.is_floating_point:  # Int8Params, GPTQ, ...
        raise UserError(f"--lora-kernels supports a bf16/fp32 (--lora) or 4-bit (--qlora) base, not "
                        f"{type(base).__name__} ({name}; --lora-8bit){_FIX} use --lora or --qlora")
    if getattr(layer, "fan_in_fan_out", False) or base.bias is not None and base.bias.requires_grad:
        raise UserError(f"--lora-kernels: {name} has a transposed (Conv1D) or trainable-bias base{_FIX} freeze it")


def _mlps(model) -> list:
    """The decoder MLPs: modules named `mlp` (Llama/Qwen2/Mistral/Gemma layers)."""
    return [(name, m) for name, m in model.named_modules() if name.split(".")[-1] == "mlp"]


def _fusable_mlp(name: str, mlp, is_lora) -> bool:
    """True for a gated MLP whose three projections all carry an adapter; refuses other MLP shapes."""
    projs = [getattr(mlp, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
    if any(p is None for p in projs) or type(getattr(mlp, "act_fn", None)).__name__ not in _ACTS:
        raise UserError(f"--lora-kernels fuses gated MLPs (gate/up/down with silu or gelu_pytorch_tanh); "
                        f"{name} is {type(mlp).__name__} with act {type(getattr(mlp, 'act_fn', None)).__name__}")
    return all(is_lora(p) for p in projs)


def apply_lora_kernels(model):
    """Route every decoder MLP and every other LoRA linear of a peft model through the Functions above.

    The kernels replace the `forward` of module instances: the module tree, parameter names and
    the trainable lora_A / lora_B parameters stay peft's, so the optimizer, checkpoints and
    save_pretrained are unchanged, and only this model is affected (no class is patched, so a
    second model in the process, a reference one in a test, keeps transformers' forward).
    """
    import peft
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, peft.PeftModel):
        raise UserError("--lora-kernels fuses LoRA adapters; add --lora or --qlora")
    linear = lambda base: isinstance(base, torch.nn.Linear) or hasattr(base, "fp8_matmul")  # noqa: E731 (--fp8-base)
    lora = {id(m): (n, m) for n, m in model.named_modules()  # linear ones: a LoRA'd embedding stays peft's
            if isinstance(m, LoraLayer) and linear(m.base_layer)}
    if not lora:
        raise UserError("--lora-kernels: the model has no LoRA layers; check --lora-targets")
    for name, layer in lora.values():
        _check_layer(layer, name)
    fused = set()
    for name, mlp in _mlps(model):
        if _fusable_mlp(name, mlp, lambda p: id(p) in lora):
            fused |= {id(mlp.gate_proj), id(mlp.up_proj), id(mlp.down_proj)}
            _set_forward(mlp, _mlp_forward)
    for key, (_, layer) in lora.items():
        if key not in fused:
            _set_forward(layer, _proj_forward)
    return model


def _set_forward(module, fn) -> None:
    # An instance attribute shadows the class's forward; nn.Module.__call__ (hooks, checkpointing,
    # compile) calls it like any forward. The fallback inside calls type(module).forward.
    module.forward = types.MethodType(fn, module)


def apply(model, cfg, run):
    """--lora-kernels: the fused LoRA Functions in place of peft's forward, per MLP and projection."""
    return apply_lora_kernels(model)
