"""A frozen base in 4 bits (NF4, --qlora) or 8 bits (LLM.int8, --lora-8bit), through bitsandbytes.

`quantization_config` is what from_pretrained takes; presets, built by from_config (which takes
none), are quantized in place by `quantize_base`, bit for bit the same (tests/test_lora.py).
"""

import torch

from core import UserError

TILE_ROWS, TILE_COLS = 64, 128  # the transposed NF4-to-e4m3 pass's tile of W


def quantization_config(cfg, device: torch.device = torch.device("cpu")):
    """transformers' BitsAndBytesConfig for --qlora / --lora-8bit (None otherwise; `cfg`: features.lora.LoraConfig).

    Probes bitsandbytes on `device` first, so a missing or unusable install fails here with the fix
    instead of deep inside from_pretrained.
    """
    if not (cfg.qlora or cfg.lora_8bit):
        return None
    _probe_bitsandbytes("--qlora" if cfg.qlora else "--lora-8bit", device)
    from transformers import BitsAndBytesConfig

    if cfg.qlora:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


def _probe_bitsandbytes(flag: str, device: torch.device) -> None:
    try:
        import bitsandbytes.functional as F

        w = torch.randn(64, 64, device=device)
        F.dequantize_4bit(*F.quantize_4bit(w, quant_type="nf4", compress_statistics=True))
        F.int8_vectorwise_quant(w.half())
    except Exception as e:  # ImportError, or a build without kernels for this device
        raise UserError(f"{flag} needs bitsandbytes with kernels for {device.type} ({type(e).__name__}: "
                        f"{(str(e).strip().splitlines() or [''])[0]}); pip install -U bitsandbytes "
                        f"(CUDA; CPU too, checked with 0.50.2), or use --lora") from e


def quantize_base(model, qconfig):
    """Swap the decoder's nn.Linear layers (not lm_head) for bitsandbytes 4/8-bit ones, in place.

    For models built by from_config (presets); from_pretrained does the same given the config.
    Each weight is quantized when moved to its device, as transformers' loader does.
    """
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if type(module) is torch.nn.Linear and module is not head:
            model.set_submodule(name, _quantized_linear(bnb, module, qconfig))
    setattr(model, "is_loaded_in_4bit" if qconfig.load_in_4bit else "is_loaded_in_8bit", True)  # peft reads these
    return model


def _quantized_linear(bnb, linear: torch.nn.Linear, qc):
    w, device, bias = linear.weight.data, linear.weight.device, linear.bias is not None
    if qc.load_in_4bit:  # quant_storage: bf16 under --fsdp (FSDP2 on torch 2.11 shards only float params)
        storage = getattr(qc, "bnb_4bit_quant_storage", None) or torch.uint8
        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias, qc.bnb_4bit_compute_dtype,
                                compress_statistics=qc.bnb_4bit_use_double_quant,
                                quant_type=qc.bnb_4bit_quant_type, quant_storage=storage, device="meta")
        new.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=qc.bnb_4bit_quant_type,
                                       compress_statistics=qc.bnb_4bit_use_double_quant, quant_storage=storage,
                                       module=new)
    else:  # Int8Params quantizes only on a move away from the CPU, or to it (bitsandbytes 0.50.2)
        new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias, has_fp16_weights=False,
                                  threshold=qc.llm_int8_threshold, device="meta")
        new.weight = bnb.nn.Int8Params(w.cpu(), requires_grad=False, has_fp16_weights=False)
    if bias:
        new.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
    return new.to(device)  # quantizes


# ---- a 4-bit weight as plain tensors: what the opaque matmul ops of features/ take


def is_4bit(base) -> bool:
    return any(c.__name__ == "Linear4bit" for c in type(base).__mro__)  # bnb's, without importing it


def packed_4bit(base) -> tuple:
    """A bitsandbytes 4-bit weight as the opaque ops take it: (packed, absmax, code, absmax2, code2,
    offset, blocksize, blocksize2, shape), the second level None / 0 without double quantization."""
    qs = base.weight.quant_state
    nested = qs.state2 is not None
    return (base.weight, qs.absmax, qs.code, qs.state2.absmax if nested else None,
            qs.state2.code if nested else None, qs.offset if nested else None, qs.blocksize,
            qs.state2.blocksize if nested else 0, list(qs.shape))


def dequantize_packed(packed, absmax, code, absmax2, code2, offset, blocksize: int, blocksize2: int,
                      shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """The dense (out, in) weight of packed_4bit's tuple, in dtype."""
    import bitsandbytes.functional as bnbF

    state2 = bnbF.QuantState(absmax2, code=code2, blocksize=blocksize2, dtype=torch.float32) \
        if absmax2 is not None else None
    qs = bnbF.QuantState(absmax, shape=torch.Size(shape), code=code, blocksize=blocksize, quant_type="nf4",
                         dtype=dtype, offset=offset, state2=state2)
    return bnbF.dequantize_4bit(packed, qs).to(dtype)


def block_absmax(absmax, absmax2, code2, offset, blocksize2: int) -> torch.Tensor:
    """The fp32 absmax of each 4-bit block: absmax itself, or its double quantization undone."""
    if absmax2 is None:
        return absmax.float()
    import bitsandbytes.functional as bnbF

    state2 = bnbF.QuantState(absmax2, code=code2, blocksize=blocksize2, dtype=torch.float32)
    return bnbF.dequantize_blockwise(absmax, state2).float() + offset


def nf4_to_e4m3(packed, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, shape: list[int],
                transpose: bool = False) -> torch.Tensor:
    """The (out, in) NF4 weight as float8 e4m3 (transpose: its (in, out) transpose, row-major):
    code[nibble] * absmax of its block, rounded to bf16 and then to e4m3, as bitsandbytes' bf16
    dequantization followed by a cast; absmax (fp32, one a block) must keep every value within
    e4m3's range (|v| <= 448). One Triton pass on CUDA (reads half a byte, writes one per weight,
    in either layout; W^T of rows that blocks straddle takes the flat pass and a byte transpose),
    torch ops elsewhere (bitsandbytes packs the first of each pair of weights in a byte's high nibble)."""
    q = packed.view(torch.uint8).reshape(-1)
    # the transposed pass reads each block's absmax once, so no block may straddle two rows or two tiles
    if q.is_cuda and transpose and shape[1] % blocksize == 0 and TILE_COLS % blocksize == 0:
        return _transposed_cuda(q, absmax, code, blocksize, shape)
    w8 = _flat_cuda(q, absmax, code, blocksize, shape) if q.is_cuda else _flat_torch(q, absmax, code, blocksize, shape)
    return w8.view(torch.uint8).t().contiguous().view(w8.dtype) if transpose else w8


def _flat_torch(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, shape: list[int]):
    nibbles = torch.stack([q >> 4, q & 15], dim=-1).reshape(-1).long()
    w = code.float()[nibbles] * absmax.float().repeat_interleave(blocksize)[:nibbles.numel()]
    return w.to(torch.bfloat16).to(torch.float8_e4m3fn).reshape(shape)


def _flat_cuda(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, shape: list[int]):
    from core import nf4_kernels  # Triton: imported on CUDA only

    w8 = torch.empty(shape, dtype=torch.float8_e4m3fn, device=q.device)
    n_bytes, block = q.numel(), 4096
    nf4_kernels.flat[(-(-n_bytes // block),)](q, absmax, code, w8, n_bytes, blocksize, block)
    return w8


def _transposed_cuda(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, shape: list[int]):
    from core import nf4_kernels

    rows, cols = shape
    out = torch.empty((cols, rows), dtype=torch.float8_e4m3fn, device=q.device)
    grid = (-(-rows // TILE_ROWS), -(-cols // TILE_COLS))
    nf4_kernels.transposed[grid](q, absmax, code, out, rows, cols, blocksize, TILE_ROWS, TILE_COLS)
    return out
