"""--fp8-base: the frozen base's matmuls in FP8 under LoRA, checked on CPU (torch's CPU _scaled_mm).

Exact where it can be: each FP8 matmul equals the fp32 product of its quantized operands. Lossy by
a stated tolerance against the unquantized base: each matmul within 6% (relative Frobenius error;
e4m3 keeps 3 mantissa bits), a short LoRA run's losses within 2% of the bf16/fp32 base's, and a
real checkpoint's first-step loss within REAL_NATS of its unquantized base's.
"""

import inspect

import pytest
import torch

from conftest import ROOT, read_metrics, run_train
from core.model import count_params
from features import fp8_base
from features.fp8_base import Fp8FrozenLinear, quantize_rows

MATMUL_TOL = 0.06  # relative error of one FP8 matmul against the unquantized one
RUN_TOL = 0.02  # relative difference of a LoRA run's losses
REAL_NATS = 0.1  # the real checkpoint's first-step loss (answer tokens, before any update) against its plain base


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def test_quantize_rows_maps_each_row_absmax_to_the_e4m3_max():
    t = torch.randn(8, 64) * torch.logspace(-3, 3, 8)[:, None]
    q, scale = quantize_rows(t)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (8, 1)
    assert torch.allclose(q.float().abs().amax(-1), torch.full((8,), 448.0))
    assert _rel(q.float() * scale, t) < 0.05
    zero_q, zero_scale = quantize_rows(torch.zeros(2, 16))
    assert zero_scale.eq(1).all() and zero_q.float().eq(0).all()


def test_fp8_matmuls_are_the_products_of_their_quantized_operands():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 48, bias=False)
    x, dy = torch.randn(3, 7, 96), torch.randn(3, 7, 48)
    f = Fp8FrozenLinear(linear)
    x8, xs = quantize_rows(x.reshape(-1, 96))
    expected = (x8.float() * xs) @ (f.w8.float() * f.w_scale.t()).t()
    assert torch.allclose(f.fp8_matmul(x).reshape(-1, 48), expected, rtol=1e-5, atol=1e-6)
    # the input gradient reuses W's one quantized copy: its row scales go into dY before dY is quantized
    g8, gs = quantize_rows(dy.reshape(-1, 48) * f.w_scale)
    expected_dx = (g8.float() * gs) @ f.w8.float()
    assert torch.allclose(f.fp8_grad_input(dy).reshape(-1, 96), expected_dx, rtol=1e-5, atol=1e-6)
    assert torch.allclose(f.weight, linear.weight, rtol=0.07, atol=1e-3)  # the dequantized view


def test_the_transposed_copy_changes_memory_only():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 48, bias=False)
    one, two = Fp8FrozenLinear(linear), Fp8FrozenLinear(linear, transposed_copy=True)
    fp8_bytes = [sum(b.nbytes for b in m.buffers() if b.dtype == torch.float8_e4m3fn) for m in (one, two)]
    assert fp8_bytes == [96 * 48, 2 * 96 * 48]  # one byte a weight, or two: a bf16 weight's memory
    dy = torch.randn(5, 48)
    assert torch.equal(one.fp8_grad_input(dy), two.fp8_grad_input(dy))


def test_fp8_linear_is_within_tolerance_of_the_plain_one_and_trains_no_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64, bias=True).requires_grad_(False)
    fp8 = Fp8FrozenLinear(linear)
    x = torch.randn(4, 32, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = fp8(x), linear(x_ref)
    assert _rel(y, y_ref) < MATMUL_TOL
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert _rel(x.grad, x_ref.grad) < MATMUL_TOL
    assert not any(p.requires_grad for p in fp8.parameters())
    assert count_params(fp8) == count_params(linear)  # the FP8 copies stand for the weight (FLOPs, MFU)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fp8(x).dtype == torch.bfloat16  # the activations' compute dtype, as nn.Linear under autocast


ARGS = ["--lora", "--max-steps", "8", "--log-every", "1", "--val-dataset", "none", "--skip-export"]


@pytest.fixture(scope="module")
def plain_losses(tmp_path_factory) -> list[float]:
    """The plain bf16/fp32 base through peft: the reference of every --fp8-base run below."""
    out = tmp_path_factory.mktemp("plain")
    assert run_train(out, *ARGS) == 0
    return [m["loss"] for m in read_metrics(out) if "loss" in m]


# Compiled, the FP8 ops run in test_a_compiled_qlora_run_... and test_compiled_blocks_over_an_fp8_base_...
# on CPU, and in test_gpu_lora_run_with_an_fp8_base_... on a GPU.
@pytest.mark.parametrize("extra", [[], ["--lora-kernels"]])
def test_a_lora_run_with_an_fp8_base_tracks_the_plain_base(tmp_path, plain_losses, extra):
    assert run_train(tmp_path / "fp8", *ARGS, *extra, "--fp8-base") == 0
    fp8 = [m["loss"] for m in read_metrics(tmp_path / "fp8") if "loss" in m]
    assert len(fp8) == len(plain_losses) == 8
    worst = max(abs(b - a) / a for a, b in zip(plain_losses, fp8, strict=True))
    assert worst < RUN_TOL, f"--fp8-base losses differ by up to {100 * worst:.2f}% from the plain base's"
    assert fp8 != plain_losses, "--fp8-base changed nothing: was the base swapped?"


QLORA = ["--qlora", "--lora-kernels"]


@pytest.fixture(scope="module")
def plain_qlora_losses(tmp_path_factory) -> list[float]:
    pytest.importorskip("bitsandbytes")
    out = tmp_path_factory.mktemp("plain-qlora")
    assert run_train(out, *ARGS[1:], *QLORA) == 0
    return [m["loss"] for m in read_metrics(out) if "loss" in m]


@pytest.mark.slow
def test_a_compiled_qlora_run_with_an_fp8_base_tracks_the_nf4_base(tmp_path, plain_qlora_losses):
    """--qlora --fp8-base: the NF4 weights dequantized and quantized to e4m3 inside each matmul's op, an
    opaque op in the compiled blocks (the eager op: test_nf4_fp8_matmuls_are_the_products_...). Traced
    by aot_eager (the op's fake and autograd, the blocks' graphs), which spares the minutes of
    inductor's CPU build; inductor compiles the op on a GPU (test_gpu_nf4_fp8_linear_..., compiled)."""
    assert run_train(tmp_path / "fp8", *ARGS[1:], *QLORA, "--compile", "--compile-backend", "aot_eager",
                     "--fp8-base") == 0
    fp8 = [m["loss"] for m in read_metrics(tmp_path / "fp8") if "loss" in m]
    assert len(fp8) == len(plain_qlora_losses) == 8
    worst = max(abs(b - a) / a for a, b in zip(plain_qlora_losses, fp8, strict=True))
    assert worst < RUN_TOL, f"--qlora --fp8-base losses differ by up to {100 * worst:.2f}% from NF4's"
    assert fp8 != plain_qlora_losses, "--fp8-base changed nothing: was the base swapped?"


def _nf4_linear(linear: torch.nn.Linear):
    import bitsandbytes as bnb

    nf4 = bnb.nn.Linear4bit(linear.in_features, linear.out_features, linear.bias is not None, torch.float32,
                            quant_type="nf4", device="meta")
    nf4.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4", module=nf4)
    if linear.bias is not None:
        nf4.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
    nf4.support_avx512bf16_for_cpu = False
    return nf4.to("cpu")  # quantizes


@pytest.mark.parametrize("in_features", [128, 96])  # 96: NF4 blocks of 64 straddle rows
def test_nf4_fp8_matmuls_are_the_products_of_their_quantized_operands(in_features):
    pytest.importorskip("bitsandbytes")
    from core.quantize import dequantize_packed, packed_4bit
    from features.fp8_base import Fp8Nf4Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, 48, bias=True).requires_grad_(False)
    nf4 = _nf4_linear(linear)
    f = Fp8Nf4Linear(nf4)
    w = dequantize_packed(*packed_4bit(nf4), torch.float32)  # the NF4 weight, exactly
    w8, ws = f.fp8_weight()
    assert torch.allclose(ws.t(), w.abs().amax(1, keepdim=True) / 448, rtol=1e-6)  # each row's absmax -> 448
    assert torch.allclose(w8.float().abs().amax(1), torch.full((48,), 448.0))
    assert _rel(w8.float() * ws.t(), w) < 0.05  # e4m3's rounding of the NF4 weight
    x, dy = torch.randn(3, 7, in_features), torch.randn(3, 7, 48)
    x8, xs = quantize_rows(x.reshape(-1, in_features))
    expected = (x8.float() * xs) @ (w8.float() * ws.t()).t() + linear.bias
    assert torch.allclose(f(x).reshape(-1, 48), expected, rtol=1e-5, atol=1e-5)
    g8, gs = quantize_rows(dy.reshape(-1, 48) * ws)  # W's row scales folded into dY, as Fp8FrozenLinear
    expected_dx = (g8.float() * gs) @ w8.float()
    assert torch.allclose(f.fp8_grad_input(dy).reshape(-1, in_features), expected_dx, rtol=1e-5, atol=1e-5)
    xg = x.clone().requires_grad_(True)  # peft's own forward: the same two matmuls through autograd
    f(xg).backward(dy)
    assert torch.allclose(xg.grad.reshape(-1, in_features), expected_dx, rtol=1e-5, atol=1e-5)
    xr = x.clone().requires_grad_(True)  # within the FP8 tolerance of bitsandbytes' own NF4 matmul
    y_nf4 = nf4(xr)
    y_nf4.backward(dy)
    assert _rel(f(x), y_nf4) < MATMUL_TOL and _rel(xg.grad, xr.grad) < MATMUL_TOL


def _nf4_parts(device: str, out_features: int = 48, in_features: int = 128):
    """(packed, absmax scaled so the weight peaks at 448, code, blocksize, shape) of a random NF4 weight."""
    from core.quantize import block_absmax, packed_4bit

    nf4 = _nf4_linear(torch.nn.Linear(in_features, out_features, bias=False))
    packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, shape = packed_4bit(nf4)
    absmax = block_absmax(absmax, absmax2, code2, offset, blocksize2)
    absmax = absmax * (448 / absmax.max()) * torch.rand_like(absmax).clamp_min(0.1)  # rows below 448 too
    return [t.to(device) if torch.is_tensor(t) else t for t in (packed, absmax, code, blocksize, shape)]


def test_nf4_to_e4m3_is_bitsandbytes_dequantization_cast_to_e4m3():
    pytest.importorskip("bitsandbytes")
    from core.quantize import dequantize_packed, nf4_to_e4m3

    torch.manual_seed(0)
    packed, absmax, code, blocksize, shape = _nf4_parts("cpu")
    w8 = nf4_to_e4m3(packed, absmax, code, blocksize, shape)
    bnb = dequantize_packed(packed, absmax, code, None, None, None, blocksize, 0, shape, torch.bfloat16)
    assert w8.shape == tuple(shape) and torch.equal(w8.view(torch.uint8), bnb.to(torch.float8_e4m3fn).view(torch.uint8))
    w8t = nf4_to_e4m3(packed, absmax, code, blocksize, shape, transpose=True)  # the input gradient's layout
    assert w8t.is_contiguous() and torch.equal(w8t.view(torch.uint8), w8.view(torch.uint8).t())


def test_fp8_base_on_qlora_without_the_lora_kernels_is_refused():
    from types import SimpleNamespace

    from core import UserError
    from features import fp8_base as fp8

    cfg = SimpleNamespace(lora=SimpleNamespace(qlora=True), lora_kernels=SimpleNamespace(lora_kernels=False),
                          fp8_base=fp8.Fp8BaseConfig(fp8_base=True))
    with pytest.raises(UserError, match="add --lora-kernels"):
        fp8.apply(torch.nn.Module(), cfg, None)


REAL_ARGS = ["--lora", "--max-steps", "1", "--log-every", "1", "--val-dataset", "none", "--eval-exact-match", "0",
             "--skip-export", "--seq-len", "512", "--micro-batch-size", "2", "--grad-accum", "1", "--packing",
             "--device", "cpu"]


def _first_loss(out, model, *extra) -> float:
    data = out.parent / "train.jsonl"
    if not data.exists():  # the demo data's first 400 samples: one step needs about 65
        data.write_text("\n".join((ROOT / "data" / "train.jsonl").read_text().splitlines()[:400]) + "\n")
    assert run_train(out, "--model", str(model), "--dataset", str(data), *REAL_ARGS, *extra) == 0
    return next(m["loss"] for m in read_metrics(out) if "loss" in m)


@pytest.mark.slow
def test_a_real_checkpoint_keeps_its_loss_with_the_last_layer_unquantized(tmp_path, smollm2):
    """SmolLM2-135M-Instruct, one step of 2 packed 512-token rows of the demo data: the first step's
    loss is the quantized forward alone (the adapters start at zero). With every layer in FP8 it sits
    0.26-0.31 nats above the plain base's on the batches tried, most of it the last layer's down_proj;
    the default keeps that layer unquantized (0.01-0.06 nats)."""
    plain = _first_loss(tmp_path / "plain", smollm2)
    kept = _first_loss(tmp_path / "fp8", smollm2, "--fp8-base")
    every = _first_loss(tmp_path / "every", smollm2, "--fp8-base", "--fp8-base-keep-last", "0")
    assert abs(kept - plain) <= REAL_NATS, f"--fp8-base moved the first loss by {kept - plain:+.3f} nats"
    assert every - plain > 2 * REAL_NATS, f"every layer in FP8: {every - plain:+.3f} nats (the reason for the rule)"


@pytest.mark.parametrize("argv, message", [
    (["--lora", "--fp8-base", "--fp8-base-keep-last", "-1"], "--fp8-base-keep-last must be 0 or more"),
    (["--lora", "--fp8-base-transposed-copy"], "add --fp8-base or drop it"),
])
def test_fp8_base_options_that_cannot_apply_are_refused(argv, message):
    from core import UserError
    from train import parse_config

    with pytest.raises(UserError, match=message):
        parse_config(argv)


# ---------------------------------------------------------------------------- GPU (FP8: Ada, Hopper, Blackwell)

FP8_GPU = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                             reason="needs a CUDA GPU with FP8 matmuls")


def _check_on_gpu(fp8: torch.nn.Module, reference: torch.nn.Module, compiled: bool) -> None:
    """An FP8 layer against its reference on CUDA (bf16 out): forward and input gradient within
    MATMUL_TOL, and the forward the FP8 product of its quantized operands, up to its bf16 output."""
    call = torch.compile(fp8) if compiled else fp8
    x = torch.randn(2, 256, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = call(x), reference(x_ref)
    assert y.dtype == torch.bfloat16 and _rel(y, y_ref) < MATMUL_TOL
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert _rel(x.grad, x_ref.grad) < MATMUL_TOL
    w8, ws = fp8.fp8_weight()
    x8, xs = quantize_rows(x.detach().reshape(-1, 1024))
    exact = ((x8.float() * xs) @ (w8.float() * ws.t()).t()).reshape(y.shape)
    assert _rel(y, exact) < 0.01


@pytest.mark.gpu
@FP8_GPU
@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_fp8_linear_is_within_tolerance_of_bf16(compiled):
    """CUDA's rowwise _scaled_mm (bf16 out), eager and under torch.compile (the quantization traced)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(1024, 512, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    _check_on_gpu(Fp8FrozenLinear(linear), linear, compiled)


@pytest.mark.gpu
@FP8_GPU
@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_nf4_fp8_linear_is_within_tolerance_of_bitsandbytes(compiled):
    """--qlora --fp8-base on CUDA (the Triton pass from NF4 to e4m3), eager and compiled."""
    import bitsandbytes as bnb

    from features.fp8_base import Fp8Nf4Linear

    torch.manual_seed(0)
    nf4 = bnb.nn.Linear4bit(1024, 512, False, torch.bfloat16, quant_type="nf4", device="meta")
    nf4.weight = bnb.nn.Params4bit(torch.randn(512, 1024) / 32, requires_grad=False, quant_type="nf4", module=nf4)
    nf4 = nf4.to("cuda")  # quantizes, with double quantization of the absmax
    _check_on_gpu(Fp8Nf4Linear(nf4), nf4, compiled)


@pytest.mark.gpu
@FP8_GPU
# 1000 x 192: Triton tiles cut short both ways; 100 x 96: blocks of 64 straddle rows; 64 x 63: so do bytes
@pytest.mark.parametrize("shape", [(48, 128), (1000, 192), (100, 96), (64, 63)])
def test_gpu_nf4_to_e4m3_kernel_is_the_torch_path_bit_for_bit(shape):
    from core.quantize import dequantize_packed, nf4_to_e4m3

    torch.manual_seed(0)
    packed, absmax, code, blocksize, shape = _nf4_parts("cpu", *shape)
    cuda_parts = [t.cuda() if torch.is_tensor(t) else t for t in (packed, absmax, code)]
    for transpose in (False, True):
        cpu = nf4_to_e4m3(packed, absmax, code, blocksize, shape, transpose)
        gpu = nf4_to_e4m3(*cuda_parts, blocksize, shape, transpose)
        assert torch.equal(gpu.view(torch.uint8).cpu(), cpu.view(torch.uint8)), f"transpose={transpose}"
    bnb = dequantize_packed(*cuda_parts, None, None, None, blocksize, 0, shape, torch.bfloat16)  # bnb's CUDA kernel
    gpu = nf4_to_e4m3(*cuda_parts, blocksize, shape)
    assert torch.equal(gpu.view(torch.uint8), bnb.to(torch.float8_e4m3fn).view(torch.uint8))


@pytest.mark.gpu
@FP8_GPU
def test_gpu_lora_run_with_an_fp8_base_tracks_the_bf16_base(tmp_path):
    """The CUDA defaults (bf16 base, LoRA kernels, compile) with and without --fp8-base, one preset."""
    args = ["--model", "llama3.2-1b", "--packing", "--seq-len", "1024", "--micro-batch-size", "4",
            "--max-steps", "20", "--log-every", "5", "--lr", "3e-4", "--warmup-steps", "5", "--val-dataset", "none",
            "--skip-export"]
    assert run_train(tmp_path / "bf16", "--lora", *args) == 0
    assert run_train(tmp_path / "fp8", "--lora", "--fp8-base", *args) == 0
    bf16, fp8 = ([m["loss"] for m in read_metrics(tmp_path / n) if "loss" in m] for n in ("bf16", "fp8"))
    print("bf16 base:", [round(v, 4) for v in bf16], "\nfp8 base:", [round(v, 4) for v in fp8])
    assert len(fp8) == len(bf16) == 5 and fp8 != bf16  # steps 1, 5, 10, 15, 20
    assert max(abs(b - a) / a for a, b in zip(bf16, fp8, strict=True)) < RUN_TOL


def test_the_lora_kernels_low_rank_sum_runs_inside_the_fp8_op():
    """bias + s c d is added into the FP8 product (forward and input gradient), eager and traced."""
    torch.manual_seed(0)
    f = Fp8FrozenLinear(torch.nn.Linear(96, 48, bias=True))
    x, dy, c, d = torch.randn(14, 96), torch.randn(14, 48), torch.randn(14, 8), torch.randn(8, 48)
    want = f.fp8_matmul(x) + f.bias + 0.5 * c @ d
    assert torch.allclose(f.fp8_matmul(x, (c, d, 0.5, f.bias)), want, rtol=1e-5, atol=1e-5)
    traced = torch.compile(lambda x: f.fp8_matmul(x, (c, d, 0.5, f.bias)), backend="aot_eager", fullgraph=True)
    assert torch.allclose(traced(x), want, rtol=1e-5, atol=1e-5)
    c2, d2 = torch.randn(14, 8), torch.randn(8, 96)
    want_dx = f.fp8_grad_input(dy) + 2.0 * c2 @ d2
    assert torch.allclose(f.fp8_grad_input(dy, (c2, d2, 2.0, None)), want_dx, rtol=1e-5, atol=1e-5)


def test_compiled_blocks_over_an_fp8_base_copy_no_lora_outputs():
    """Under --compile the LoRA kernels over FP8 base copies add s c d in place inside the op: no
    (tokens, out) copy per LoRA linear (benchmarks/count_copies.py; tests/test_lora_kernels.py holds
    the bf16 base to the same)."""
    import torch._dynamo

    from benchmarks import count_copies as cc

    torch._dynamo.reset()
    copies = cc.compiled_copies(cc.build(2, fp8_base=True), cc.batch(1024))
    torch._dynamo.reset()
    lines, first = inspect.getsourcelines(fp8_base.transposed)  # the weight's transpose per backward, by design
    weight_transpose = {f"features/fp8_base.py:{n}" for n in range(first, first + len(lines))}
    copies = {k: n for k, n in copies.items() if k[1] not in weight_transpose}
    assert not [k for k in copies if k[0] == "addmm input copy" or k[1].startswith("features/")], copies
    assert sum(copies.values()) <= 2 * 2, copies  # 2 blocks: RoPE's cat of q, the clone of q's gradient


def test_curve_table_compares_the_steps_both_runs_logged(tmp_path):
    """fp8_base.py table: a curve stopped early is judged on the steps both runs reached, its tail the
    last quarter of those; a window beyond the tolerance in nats reads OUTSIDE."""
    import json
    from types import SimpleNamespace

    from benchmarks import fp8_base as bench

    def write(name, losses):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "loss": v}) + "\n" for s, v in losses) + '{"step": 0, "val_loss": 1}\n')

    write("nf4-base", [(1, 3.0), (10, 2.0), (20, 1.0), (30, 1.0), (40, 1.0)])
    write("fp8-base", [(1, 3.1), (10, 2.0), (20, 1.0), (30, 1.02)])  # stopped before step 40
    text = bench.curve_table(SimpleNamespace(method="qlora"), tmp_path)
    assert [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()] == \
        ["| 1", "| 10", "| 20", "| 30"]
    assert "0.1000 nats" in text and "mean over steps after 22: NF4 base 1.0000, FP8 base 1.0200, +2.00%" in text
    assert text.endswith("within the stated tolerance")
    (tmp_path / "fp8-base" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.3}) + "\n")
    assert bench.curve_table(SimpleNamespace(method="qlora"), tmp_path).endswith("OUTSIDE the stated tolerance")
