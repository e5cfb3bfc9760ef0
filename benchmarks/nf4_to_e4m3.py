"""NF4 to float8 e4m3 on one CUDA GPU: core.quantize.nf4_to_e4m3 (its Triton passes in
core/nf4_kernels.py) beside the passes they were chosen over, on the Llama-3.1-8B projection shapes.

    python benchmarks/nf4_to_e4m3.py [--out table.md]

Each candidate's output is checked bit for bit against the repo's; the time is CUDA events over 50
back-to-back calls. A table row per candidate: microseconds a call per shape, and ms per micro-step
for 31 decoder layers (each layer: 2 of q/o, 2 of k/v, 2 of gate/up, 1 down). Small shapes read
the host's launch time as much as the GPU's.
"""

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from core.nf4_kernels import _decode  # noqa: E402
from core.quantize import nf4_to_e4m3  # noqa: E402

SHAPES = {"q/o": ((4096, 4096), 2), "k/v": ((1024, 4096), 2), "gate/up": ((14336, 4096), 2), "down": ((4096, 14336), 1)}
NF4 = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609, 0.2461, 0.3379, 0.4407,
       0.5626, 0.7230, 1.0]


@triton.jit
def tile_pass(q_ptr, absmax_ptr, code_ptr, out_ptr, rows, cols, BLOCKSIZE: tl.constexpr, R: tl.constexpr,
              C: tl.constexpr, ROW_STRIDES: tl.constexpr):
    """W (not transposed) from 2-D tiles; ROW_STRIDES: the block index from per-row strides."""
    r = tl.program_id(0) * R + tl.arange(0, R)
    pair = tl.program_id(1) * (C // 2) + tl.arange(0, C // 2)
    mask = (r[:, None] < rows) & (pair[None, :] < cols // 2)
    byte = tl.load(q_ptr + r[:, None] * (cols // 2) + pair[None, :], mask=mask, other=0).to(tl.int32)
    if ROW_STRIDES:
        block = r[:, None] * (cols // BLOCKSIZE) + (2 * pair[None, :]) // BLOCKSIZE
    else:
        block = (r[:, None] * cols + 2 * pair[None, :]) // BLOCKSIZE
    w = tl.reshape(_decode(byte, tl.load(absmax_ptr + block, mask=mask, other=0.0), code_ptr), (R, C))
    c = tl.program_id(1) * C + tl.arange(0, C)
    keep = (r[:, None] < rows) & (c[None, :] < cols)
    tl.store(out_ptr + r[:, None] * cols + c[None, :], w.to(tl.float8e4nv), mask=keep)


@triton.jit
def transposed_per_weight_scales(q_ptr, absmax_ptr, code_ptr, out_ptr, rows, cols, BLOCKSIZE: tl.constexpr,
                                 R: tl.constexpr, C: tl.constexpr):
    """W^T as core/nf4_kernels.py's `transposed`, but with an absmax load per weight (its earlier form):
    the tile computes in the store's layout, a warp across 32 rows, so each such load touches 32 cache
    lines."""
    r = tl.program_id(0) * R + tl.arange(0, R)
    pair = tl.program_id(1) * (C // 2) + tl.arange(0, C // 2)
    mask = (r[:, None] < rows) & (pair[None, :] < cols // 2)
    byte = tl.load(q_ptr + r[:, None] * (cols // 2) + pair[None, :], mask=mask, other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + (r[:, None] * cols + 2 * pair[None, :]) // BLOCKSIZE, mask=mask, other=0.0)
    w = tl.reshape(_decode(byte, scale, code_ptr), (R, C))
    c = tl.program_id(1) * C + tl.arange(0, C)
    keep = (c[:, None] < cols) & (r[None, :] < rows)
    tl.store(out_ptr + c[:, None] * rows + r[None, :], tl.trans(w).to(tl.float8e4nv), mask=keep)


@triton.jit
def byte_transpose(x_ptr, y_ptr, rows, cols, R: tl.constexpr, C: tl.constexpr):
    r = tl.program_id(0) * R + tl.arange(0, R)
    c = tl.program_id(1) * C + tl.arange(0, C)
    x = tl.load(x_ptr + r[:, None] * cols + c[None, :], mask=(r[:, None] < rows) & (c[None, :] < cols))
    tl.store(y_ptr + c[:, None] * rows + r[None, :], tl.trans(x), mask=(c[:, None] < cols) & (r[None, :] < rows))


def repo(parts, transpose):
    return nf4_to_e4m3(*parts, transpose)


def tiles(parts, row_strides):
    q, absmax, code, blocksize, (rows, cols) = parts
    out = torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=q.device)
    tile_pass[(triton.cdiv(rows, 64), triton.cdiv(cols, 128))](q, absmax, code, out, rows, cols, blocksize, 64, 128,
                                                               row_strides)
    return out


def per_weight_scales(parts):
    q, absmax, code, blocksize, (rows, cols) = parts
    out = torch.empty((cols, rows), dtype=torch.float8_e4m3fn, device=q.device)
    transposed_per_weight_scales[(triton.cdiv(rows, 64), triton.cdiv(cols, 128))](q, absmax, code, out, rows, cols,
                                                                                  blocksize, 64, 128)
    return out


def flat_then_transpose(parts, with_triton):
    rows, cols = parts[4]
    w8 = nf4_to_e4m3(*parts).view(torch.uint8)
    if not with_triton:
        return w8.t().contiguous().view(torch.float8_e4m3fn)
    out = torch.empty((cols, rows), dtype=torch.uint8, device=w8.device)
    byte_transpose[(triton.cdiv(rows, 32), triton.cdiv(cols, 32))](w8, out, rows, cols, 32, 32)
    return out.view(torch.float8_e4m3fn)


CANDIDATES = {  # name: (layout, fn)
    "repo: flat pass (W)": ("W", lambda p: repo(p, False)),
    "2-D tiles 64x128 (W)": ("W", lambda p: tiles(p, False)),
    "2-D tiles 64x128, block index from row strides (W)": ("W", lambda p: tiles(p, True)),
    "repo: 2-D tiles transposed in registers, absmax loaded a block at a time (W^T)": ("W^T", lambda p: repo(p, True)),
    "2-D tiles transposed, absmax loaded per weight (W^T)": ("W^T", per_weight_scales),
    "flat pass + Triton byte transpose 32x32 (W^T)": ("W^T", lambda p: flat_then_transpose(p, True)),
    "flat pass + torch byte transpose (W^T)": ("W^T", lambda p: flat_then_transpose(p, False)),
}


def microseconds(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1000


def random_nf4(rows: int, cols: int) -> tuple:
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randint(0, 256, (rows * cols // 2,), dtype=torch.uint8, device="cuda", generator=g)
    absmax = torch.rand(rows * cols // 64, device="cuda", generator=g) * 300  # e4m3 holds up to 448
    return q, absmax, torch.tensor(NF4, device="cuda"), 64, [rows, cols]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    args = p.parse_args()
    parts = {name: random_nf4(*shape) for name, (shape, _) in SHAPES.items()}
    lines = ["| pass | layout | bit for bit | " + " | ".join(f"{n} us" for n in SHAPES) + " | ms per micro-step |",
             "|---|---|---|" + "---|" * len(SHAPES) + "---|"]
    for name, (layout, fn) in CANDIDATES.items():
        same, times, total = True, [], 0.0
        for shape_name, (_, count) in SHAPES.items():
            part = parts[shape_name]
            want = repo(part, layout == "W^T").view(torch.uint8)
            same &= torch.equal(fn(part).view(torch.uint8), want)
            times.append(microseconds(lambda: fn(part)))  # noqa: B023 (called before the loop moves on)
            total += times[-1] * count
        lines.append(f"| {name} | {layout} | {same} | " + " | ".join(f"{t:.1f}" for t in times)
                     + f" | {31 * total / 1000:.2f} |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
