"""Triton passes from bitsandbytes NF4 to float8 e4m3 (core.quantize.nf4_to_e4m3 launches them).

Each decodes two weights from a byte (the first in the high nibble), multiplies by its block's
absmax, rounds to bf16 (bitsandbytes' bf16 dequantization) and casts to e4m3. `flat` writes W
(out, in) row-major, one byte a lane; `transposed` writes W^T (in, out) row-major from tiles of W
transposed in registers.
"""
import triton
import triton.language as tl


@triton.jit
def _decode(byte, scale, code_ptr):
    hi = tl.load(code_ptr + (byte >> 4)) * scale
    lo = tl.load(code_ptr + (byte & 15)) * scale
    return tl.join(hi, lo).to(tl.bfloat16).to(tl.float32)  # (..., 2): weights 2j and 2j + 1


@triton.jit
def flat(q_ptr, absmax_ptr, code_ptr, out_ptr, n_bytes, BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_bytes
    byte = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + (offs * 2) // BLOCKSIZE, mask=mask, other=0.0)
    w = tl.reshape(_decode(byte, scale, code_ptr), (2 * BLOCK,))
    out_offs = tl.program_id(0) * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + out_offs, w.to(tl.float8e4nv), mask=out_offs < 2 * n_bytes)


@triton.jit
def transposed(q_ptr, absmax_ptr, code_ptr, out_ptr, rows, cols, BLOCKSIZE: tl.constexpr, R: tl.constexpr,
               C: tl.constexpr):
    """W^T from tiles of R rows by C columns of W (cols and C multiples of BLOCKSIZE: no block straddles
    two rows). The tile computes in the store's layout, a warp across 32 rows, so each row's absmax is
    loaded once a block and broadcast: loaded per weight, each load touched 32 cache lines (timed
    against that form: benchmarks/nf4_to_e4m3.py)."""
    r = tl.program_id(0) * R + tl.arange(0, R)
    pair = tl.program_id(1) * (C // 2) + tl.arange(0, C // 2)  # the tile's bytes, two weights each
    mask = (r[:, None] < rows) & (pair[None, :] < cols // 2)
    byte = tl.load(q_ptr + r[:, None] * (cols // 2) + pair[None, :], mask=mask, other=0).to(tl.int32)
    blk = tl.program_id(1) * (C // BLOCKSIZE) + tl.arange(0, C // BLOCKSIZE)
    in_rows = (r[:, None] < rows) & (blk[None, :] < cols // BLOCKSIZE)
    per_block = tl.load(absmax_ptr + r[:, None] * (cols // BLOCKSIZE) + blk[None, :], mask=in_rows, other=0.0)
    scale = tl.reshape(tl.broadcast_to(per_block[:, :, None], (R, C // BLOCKSIZE, BLOCKSIZE // 2)), (R, C // 2))
    w = tl.reshape(_decode(byte, scale, code_ptr), (R, C))
    c = tl.program_id(1) * C + tl.arange(0, C)
    keep = (c[:, None] < cols) & (r[None, :] < rows)
    tl.store(out_ptr + c[:, None] * rows + r[None, :], tl.trans(w).to(tl.float8e4nv), mask=keep)
