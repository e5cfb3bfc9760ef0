"""FP8 for the frozen base under LoRA: the base projections' matmuls in FP8, the adapters as before.

    python train.py --lora --fp8-base          # a GPU with FP8 matmuls (Ada, Hopper, Blackwell)
    python train.py --qlora --fp8-base         # the base stays NF4 in memory; its matmuls run in FP8

Under LoRA the base weights never change, so each is quantized once, to float8 e4m3 with one
scale per output row, and kept once: a byte per weight, half a bf16 base. Every step quantizes the
activations per row (e4m3, each row's absmax mapped to 448), so the forward y = x W^T is an FP8
matmul with bf16 output. The input gradient dX = dY W reuses the same quantized W: W's row scales
are folded into dY's columns before dY is quantized per row (dY diag(s) Wq = dY W), so it is the
gradient of the quantized forward. torch._scaled_mm takes its second operand column-major, so each
backward transposes Wq (a byte per weight read and written); --fp8-base-transposed-copy keeps the
transpose as a second buffer instead: no transpose per step, the memory of a bf16 weight. The
weight gets no gradient. The adapters (lora_A, lora_B), their gradients, the norms, attention,
embeddings and the head stay in their own precision, and so do the last --fp8-base-keep-last
decoder layers (1 by default; see apply). With --lora-kernels the fused Functions call the same
two matmuls (features/lora_kernels.py).

On a --qlora base the weight stays NF4 in memory (QLoRA's memory) and each matmul dequantizes it
straight to e4m3 inside one opaque op (the row scales folded into the NF4 blocks' absmax once), so
no dense or FP8 copy lives beyond that op (Fp8Nf4Linear). It runs inside
the fused LoRA kernels (on by default on a GPU).

Lossy, by a stated tolerance (tests/test_fp8_base.py holds it): each matmul within 6% of the
unquantized one (e4m3 keeps 3 mantissa bits), a random-weight preset's LoRA losses within 2% of
the plain base's, and a real checkpoint's first-step loss within 0.1 nats. A real checkpoint's curve
can sit a little above the plain base's all along (benchmarks/results/2026-12-02-fp8-base-one-copy-h200.md):
compare yours before you keep it. Speed on a GPU: the same file.
Runs on CPU too (torch's CPU _scaled_mm), slowly: for tests. Works with: --lora (a bf16/fp32
base), --qlora (with --lora-kernels), --lora-kernels, --compile (the FP8 copies are buffers, so the
compiled graph sees their column-major views), --packing, activation checkpointing and offload.
Refused with an int8 or GPTQ base (--lora-8bit, --gptq), with --fp8 (FP8 training of a full
fine-tune), --qat, and with sharding (--fsdp, --tp, --deepspeed: they shard float weights).
References: torch._scaled_mm rowwise scaling; torchao's float8 rowwise recipe (the scale layout).
"""

import dataclasses
import types

import torch

from core import UserError
from core.ops import opaque_op
from core.quantize import block_absmax, dequantize_packed, is_4bit, nf4_to_e4m3, packed_4bit

E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


@dataclasses.dataclass
class Fp8BaseConfig:
    fp8_base: bool = False
    """The frozen base's projections under --lora or --qlora in FP8 (e4m3, rowwise scales); adapters unchanged. Lossy: each matmul within a few percent of bf16."""  # noqa: E501
    fp8_base_keep_last: int = 1
    """With --fp8-base: the last N decoder layers keep their projections in bf16 (their MLP writes the outliers the head reads); 0 converts every layer."""  # noqa: E501
    fp8_base_transposed_copy: bool = False
    """With --fp8-base: also keep each FP8 weight transposed for the input gradient (no transpose per backward; the memory of a bf16 base instead of half)."""  # noqa: E501


def validate(cfg) -> None:
    """An FP8 GPU when training on CUDA (CPU runs the same ops, slowly)."""
    if cfg.fp8_base.fp8_base_keep_last < 0:
        raise UserError(f"--fp8-base-keep-last must be 0 or more (got {cfg.fp8_base.fp8_base_keep_last})")
    if cfg.fp8_base.fp8_base_transposed_copy and not cfg.fp8_base.fp8_base:
        raise UserError("--fp8-base-transposed-copy keeps a copy of --fp8-base's weights; add --fp8-base or drop it")
    if not cfg.fp8_base.fp8_base or not torch.cuda.is_available() or cfg.train.device == "cpu":
        return
    if torch.cuda.get_device_capability() < (8, 9):
        raise UserError("--fp8-base needs FP8 matmuls: a GPU of compute capability 8.9+ (Ada, Hopper, Blackwell); "
                        "drop --fp8-base")


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t / scale) in e4m3 and the fp32 scale of each row (rows of absmax 0 get scale 1)."""
    amax = t.detach().abs().amax(dim=-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """x's compute dtype: the autocast dtype under autocast (as nn.Linear), else its own."""
    autocast = torch.is_autocast_enabled(x.device.type)
    return torch.get_autocast_dtype(x.device.type) if autocast else x.dtype


def _scaled(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor, plus=None, out_dtype=None) -> torch.Tensor:
    """x (..., k) times w8^T (w8: n x k in e4m3; w_scale: 1 x n, one per row of w8) in FP8, output in
    out_dtype, by default x's compute dtype (the autocast dtype under autocast, as nn.Linear).
    plus = (c, d, s, bias): bias + s c d added into the product inside the same opaque op (the LoRA
    kernels' low-rank path), in c's dtype."""
    out_dtype = out_dtype or _compute_dtype(x)
    x8, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))  # traced: torch.compile fuses it into one kernel
    ops = torch.ops.nanotune if torch.compiler.is_compiling() else _EAGER  # eager calls skip the ops' dispatch
    if plus is None:
        y = ops.fp8_rowwise_mm(x8, x_scale, w8, w_scale, _mm_dtype(out_dtype, x.device)).to(out_dtype)
    else:
        c, d, s, bias = plus
        y = ops.fp8_rowwise_mm_plus(x8, x_scale, w8, w_scale, c, d, float(s), bias)
    return y.reshape(*x.shape[:-1], w8.shape[0])


def _rowwise_mm(x8: torch.Tensor, x_scale: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor,
                out_dtype: torch.dtype) -> torch.Tensor:
    # cuBLASLt multiplies only a row-major first operand by a column-major second one
    return torch._scaled_mm(x8.contiguous(), w8.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=out_dtype)


def _rowwise_mm_plus(x8: torch.Tensor, x_scale: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor,
                     c: torch.Tensor, d: torch.Tensor, s: float, bias: torch.Tensor | None) -> torch.Tensor:
    y = _rowwise_mm(x8, x_scale, w8, w_scale, _mm_dtype(c.dtype, c.device)).to(c.dtype)
    y = y if bias is None else y.add_(bias)
    return y.addmm_(c, d, alpha=s)


# Each is one opaque op under torch.compile (core/ops.py); inside an op, and in eager code, the plain
# functions are called: every dispatch costs host time, hundreds of times a micro-step.
# - fp8_rowwise_mm: inductor's CPU lowering of _scaled_mm copies a transposed (column-major)
#   operand into row-major order, which _scaled_mm then refuses.
# - fp8_rowwise_mm_plus: the product plus s c d by one addmm_ in place. Traced, the addmm_ would be
#   functionalized into an out-of-place addmm: on CUDA a copy of the whole (tokens, out) product
#   before the GEMM, in every LoRA linear's forward and backward (lora_kernels' _linear_plus says the same).
opaque_op("fp8_rowwise_mm", _rowwise_mm,
          lambda x8, x_scale, w8, w_scale, out_dtype: x8.new_empty((x8.shape[0], w8.shape[0]), dtype=out_dtype))
opaque_op("fp8_rowwise_mm_plus", _rowwise_mm_plus,
          lambda x8, x_scale, w8, w_scale, c, d, s, bias: x8.new_empty((x8.shape[0], w8.shape[0]), dtype=c.dtype))
_EAGER = types.SimpleNamespace(fp8_rowwise_mm=_rowwise_mm, fp8_rowwise_mm_plus=_rowwise_mm_plus)


def _mm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The matmul's output dtype: CUDA's rowwise-scaled FP8 matmul writes bf16 only."""
    return torch.bfloat16 if device.type == "cuda" or dtype not in (torch.float16, torch.float32) else dtype


def transposed(w8: torch.Tensor) -> torch.Tensor:
    """w8^T in row-major order, copied as bytes (compiled CPU code has no float8 transpose)."""
    return w8.view(torch.uint8).t().contiguous().view(w8.dtype)


def grad_input(dy: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor, wt8: torch.Tensor | None,
               unit: torch.Tensor, plus=None) -> torch.Tensor:
    """dY W for W = diag(w_scale) w8: w_scale folded into dY's columns, then one FP8 matmul with w8
    (wt8: w8 already transposed, or None to transpose it here); unit: ones, w8's column scales."""
    g = dy.float() * w_scale  # traced: torch.compile fuses it into dY's quantization
    return _scaled(g, transposed(w8) if wt8 is None else wt8, unit, plus, out_dtype=dy.dtype)


class _Fp8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w8, w_scale, wt8, unit, bias):
        ctx.save_for_backward(w8, w_scale, wt8, unit)  # the frozen FP8 buffers: references, not copies
        y = _scaled(x, w8, w_scale)
        return y if bias is None else y + bias.to(y.dtype)

    @staticmethod
    def backward(ctx, dy):
        return grad_input(dy, *ctx.saved_tensors), None, None, None, None, None


class Fp8FrozenLinear(torch.nn.Module):
    """A frozen nn.Linear whose matmuls run in FP8: W once, scaled per output row, as buffers (and W
    transposed with transposed_copy); the bf16 weight is dropped once quantized."""

    def __init__(self, linear: torch.nn.Linear, transposed_copy: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.dtype = linear.in_features, linear.out_features, linear.weight.dtype
        w8, w_scale = quantize_rows(linear.weight.data.contiguous())  # (out, in), (out, 1)
        buffers = {"w8": w8, "w_scale": w_scale.t().contiguous(),  # as _scaled_mm's scale_b: 1 x out
                   "unit": torch.ones(1, self.in_features, device=w8.device),  # W^T's column scales, folded into dY
                   "wt8": transposed(w8) if transposed_copy else None}
        for name, t in buffers.items():
            self.register_buffer(name, t, persistent=False)  # not in state dicts: the base loads from --model
        self.buffered_weight_numel = linear.weight.numel()  # core.model.count_params: FLOPs, MFU, the log
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.data, requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (what peft and checks read as `.weight`; training never does)."""
        return (self.w8.float() * self.w_scale.t()).to(self.dtype)

    def fp8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W8, its row scales as 1 x out): W ~ diag(scale) W8."""
        return self.w8, self.w_scale

    def fp8_matmul(self, x: torch.Tensor, plus=None) -> torch.Tensor:
        """x W^T, for the fused LoRA kernels' forward; plus = (c, d, s, bias) adds bias + s c d."""
        return _scaled(x, self.w8, self.w_scale, plus)

    def fp8_grad_input(self, dy: torch.Tensor, plus=None) -> torch.Tensor:
        """dY W: the gradient of x W^T with respect to x; plus = (c, d, s, None) adds s c d."""
        return grad_input(dy, self.w8, self.w_scale, self.wt8, self.unit, plus)

    def forward(self, x):
        return _Fp8Matmul.apply(x, self.w8, self.w_scale, self.wt8, self.unit, self.bias)


# ---- a QLoRA base (bitsandbytes NF4): NF4 in memory, FP8 inside each matmul


def _nf4_fp8(x8: torch.Tensor, x_scale: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
             code: torch.Tensor, blocksize: int, shape: list[int], row_scale: torch.Tensor | None,
             scale_b: torch.Tensor, transpose: bool, bias: torch.Tensor | None, c: torch.Tensor | None,
             d: torch.Tensor | None, s: float, out_dtype: torch.dtype) -> torch.Tensor:
    """x8 W8^T (transpose: x8 W8) for W8 = W / row_scale in e4m3, W the NF4 weight: dequantized and
    cast inside the op, so under torch.compile no dense or FP8 copy is a value of the graph and none
    is kept for backward (QLoRA's saving, as lora_kernels' linear4bit_plus). absmax: the blocks'
    absmax already divided by their row's scale (row_scale None), or as stored (row_scale: divide
    here); scale_b as _scaled_mm's; plus c d s (and bias) as _rowwise_mm_plus. Under torch.compile it
    is one opaque op, nanotune::nf4_fp8_mm."""
    w8 = _nf4_e4m3(packed, absmax, code, blocksize, shape, row_scale, transpose)
    if c is None:
        y = _rowwise_mm(x8, x_scale, w8, scale_b, _mm_dtype(out_dtype, x8.device)).to(out_dtype)
        return y if bias is None else y.add_(bias)
    return _rowwise_mm_plus(x8, x_scale, w8, scale_b, c, d, s, bias)


def _nf4_fp8_fake(x8, x_scale, packed, absmax, code, blocksize, shape, row_scale, scale_b, transpose, bias, c, d, s,
                  out_dtype):
    return x8.new_empty((x8.shape[0], shape[1] if transpose else shape[0]), dtype=out_dtype if c is None else c.dtype)


opaque_op("nf4_fp8_mm", _nf4_fp8, _nf4_fp8_fake)


def _nf4_e4m3(packed, absmax, code, blocksize: int, shape: list[int], row_scale, transpose=False) -> torch.Tensor:
    """W8 = W / row scale in e4m3 (rows peak at 448), or its transpose, row-major: absmax holds the
    scales already (row_scale None: one pass on CUDA in either layout), or W is divided here, where
    blocks straddle rows."""
    if row_scale is None:
        return nf4_to_e4m3(packed, absmax, code, blocksize, shape, transpose)
    w = dequantize_packed(packed, absmax, code, None, None, None, blocksize, 0, shape, torch.float32)
    w8 = (w / row_scale).to(torch.float8_e4m3fn)
    return transposed(w8) if transpose else w8


class _Fp8Nf4Matmul(torch.autograd.Function):
    """x W^T + bias through an Fp8Nf4Linear, for peft's own forward (the LoRA kernels call the two
    matmuls themselves)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return layer.fp8_matmul(x)

    @staticmethod
    def backward(ctx, dy):
        return ctx.layer.fp8_grad_input(dy), None


def _row_scaled_absmax(nf4) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(the fp32 absmax of each NF4 block divided by its row's scale, None, the row scales): each row's
    largest |weight| mapped to 448. Where blocks straddle rows (in_features not a multiple of the
    block size) the absmax stays as stored and the second item is the row scales, for the op to divide."""
    _, absmax, _, absmax2, code2, offset, blocksize, blocksize2, _ = packed_4bit(nf4)
    absmax = block_absmax(absmax, absmax2, code2, offset, blocksize2)
    per_row = nf4.in_features % blocksize == 0
    row_amax = absmax.view(nf4.out_features, -1).amax(1) if per_row else \
        dequantize_packed(*packed_4bit(nf4), torch.float32).abs().amax(1)
    scale = torch.where(row_amax > 0, row_amax / E4M3_MAX, torch.ones_like(row_amax))
    if per_row:
        return (absmax.view(nf4.out_features, -1) / scale[:, None]).flatten(), None, scale
    return absmax, scale[:, None], scale


class Fp8Nf4Linear(torch.nn.Module):
    """A frozen bitsandbytes NF4 linear (--qlora) whose matmuls run in FP8: the weight stays NF4 in
    memory, and each matmul dequantizes it straight to e4m3. W's row scales are fixed once, from the
    NF4 blocks' absmax (a row's largest |weight| is its largest block absmax: NF4's code reaches +-1),
    and folded into those absmax, so the dequantized values are W / scale, ready to cast. The input
    gradient reuses them as Fp8FrozenLinear does: the scales go into dY, W8 is transposed."""

    def __init__(self, nf4: torch.nn.Module):
        super().__init__()
        self.nf4 = nf4  # the Linear4bit: its packed weight and quantization state, unchanged
        self.in_features, self.out_features, self.bias = nf4.in_features, nf4.out_features, nf4.bias
        _, _, code, _, _, _, self.blocksize, _, self.shape = packed_4bit(nf4)
        absmax, row_scale, scale = _row_scaled_absmax(nf4)
        buffers = {"absmax": absmax, "row_scale": row_scale, "code": code,
                   "w_scale": scale[None, :].contiguous(),  # as _scaled_mm's scale_b: 1 x out
                   "unit": torch.ones(1, self.in_features, device=scale.device)}  # W8^T's column scales
        for name, t in buffers.items():
            self.register_buffer(name, t, persistent=False)  # not in state dicts: derived from the NF4 weight

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (what peft and checks read as `.weight`; training never does)."""
        return dequantize_packed(*packed_4bit(self.nf4), torch.bfloat16)

    def fp8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W8, its row scales as 1 x out): the e4m3 weight each matmul builds, W ~ diag(scale) W8."""
        return _nf4_e4m3(self.nf4.weight, self.absmax, self.code, self.blocksize, self.shape, self.row_scale), \
            self.w_scale

    def _mm(self, x: torch.Tensor, transpose: bool, plus) -> torch.Tensor:
        out_dtype = _compute_dtype(x)
        if transpose:  # dY W = (dY diag(s)) W8: s folded into dY before it is quantized (traced: one kernel)
            x = x.float() * self.w_scale
        x8, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))  # traced: torch.compile fuses it into one kernel
        c, d, s, bias = plus if plus is not None else (None, None, 0.0, None if transpose else self.bias)
        mm = torch.ops.nanotune.nf4_fp8_mm if torch.compiler.is_compiling() else _nf4_fp8  # eager: no dispatch
        y = mm(x8, x_scale, self.nf4.weight, self.absmax, self.code, self.blocksize, self.shape, self.row_scale,
               self.unit if transpose else self.w_scale, transpose, bias, c, d, float(s), out_dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def fp8_matmul(self, x: torch.Tensor, plus=None) -> torch.Tensor:
        """x W^T, for the fused LoRA kernels' forward; plus = (c, d, s, bias) adds bias + s c d."""
        return self._mm(x, False, plus)

    def fp8_grad_input(self, dy: torch.Tensor, plus=None) -> torch.Tensor:
        """dY W; plus = (c, d, s, None) adds s c d."""
        return self._mm(dy, True, plus)

    def forward(self, x):
        return _Fp8Nf4Matmul.apply(x, self)


def _frozen_bases(model):
    """(parent LoRA layer, its frozen base) for every peft LoRA linear of the decoder: an nn.Linear, or
    a bitsandbytes 4-bit Linear4bit (--qlora)."""
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        linear = type(base) is torch.nn.Linear and not base.weight.requires_grad or is_4bit(base)
        if linear and hasattr(module, "lora_A"):
            yield module, base


def _fp8(base, cfg) -> torch.nn.Module:
    return Fp8Nf4Linear(base) if is_4bit(base) else Fp8FrozenLinear(base, cfg.fp8_base.fp8_base_transposed_copy)


def _in_last_layers(model, n: int) -> set[int]:
    """ids of every module inside the last n decoder layers."""
    from core.model import decoder_blocks

    blocks = decoder_blocks(model)
    return {id(m) for block in (blocks[len(blocks) - n:] if n else []) for m in block.modules()}


def apply(model, cfg, run):
    """--fp8-base: every adapted base linear becomes an Fp8FrozenLinear (after peft wrapped it), but in the
    last --fp8-base-keep-last decoder layers. Why those stay: on SmolLM2-135M-Instruct the last layer's
    down_proj writes outputs in the thousands that cancel a large residual channel, from inputs with
    outlier channels, so a few percent of weight error there moves the head's input; with all 210
    projections in FP8 the first step's loss rose 0.26-0.31 nats, with the last layer kept 0.01-0.06
    (tests/test_fp8_base.py holds the real checkpoint to 0.1)."""
    if cfg.lora.qlora and not cfg.lora_kernels.lora_kernels:
        raise UserError("--fp8-base on a --qlora base runs inside the fused LoRA kernels; add --lora-kernels "
                        "(on by default on a GPU; it needs --lora-dropout 0), or drop --fp8-base")
    swapped, keep = 0, _in_last_layers(model, cfg.fp8_base.fp8_base_keep_last)
    for layer, base in list(_frozen_bases(model)):
        if base.in_features % 16 or base.out_features % 16:
            continue  # _scaled_mm needs both dims divisible by 16; such a small layer gains nothing anyway
        if id(layer) in keep:
            continue
        layer.base_layer = _fp8(base, cfg)
        swapped += 1
    if swapped == 0:
        raise UserError("--fp8-base found no adapted linear to run in FP8; it needs --lora or --qlora on a model "
                        "whose projection sizes divide by 16, with more decoder layers than --fp8-base-keep-last")
    kept, nf4 = cfg.fp8_base.fp8_base_keep_last, cfg.lora.qlora
    run.say(f"fp8 base: {swapped} frozen projections in FP8 (e4m3, rowwise scales"
            + ("; NF4 in memory, quantized per matmul)" if nf4 else ")")
            + (f"; the last {kept} decoder layer{'s' * (kept > 1)} unquantized" if kept else ""))
    return model
