"""Chunked cross entropy: the same loss and gradients as full-logit cross entropy."""

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_same_metrics, read_metrics, run_train
from features.chunked_loss import chunked_cross_entropy_sum
from core.loss import cross_entropy_sum, shifted_targets


def _inputs(dtype, frozen_weight=False):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 16, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, dtype=dtype, requires_grad=not frozen_weight)
    labels = torch.randint(0, 50, (3, 11), generator=g)
    labels[0, :4] = -100  # masked prompt
    labels[2, 7:] = -100  # padding
    return hidden, weight, labels


@pytest.mark.parametrize("chunk", [1, 7, 33, 1000])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_chunked_matches_full_cross_entropy(chunk, dtype, tol):
    hidden, weight, labels = _inputs(dtype)
    ref = cross_entropy_sum(F.linear(hidden, weight), labels)
    ref.backward()
    ref_h, ref_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    out = chunked_cross_entropy_sum(hidden, weight, labels, chunk)
    (2.5 * out).backward()  # the step's scale (world size / tokens) must pass through
    torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(hidden.grad, 2.5 * ref_h, rtol=tol, atol=tol)
    torch.testing.assert_close(weight.grad, 2.5 * ref_w, rtol=tol, atol=tol)


def test_frozen_head_gets_no_gradient_and_eval_keeps_none():
    hidden, weight, labels = _inputs(torch.float32, frozen_weight=True)
    chunked_cross_entropy_sum(hidden, weight, labels, 5).backward()
    assert weight.grad is None and hidden.grad is not None
    with torch.no_grad():
        value = chunked_cross_entropy_sum(hidden, weight, labels, 5)
    assert torch.isclose(value, cross_entropy_sum(F.linear(hidden, weight), labels).detach())


@pytest.mark.parametrize("extra", [[], ["--lora", "--lora-rank", "4"]])
def test_train_py_chunked_equals_plain(tmp_path, small_data, extra):
    common = ["--dataset", str(small_data), "--max-steps", "3", "--log-every", "1", "--micro-batch-size", "8",
              "--eval-exact-match", "8", *extra]
    assert run_train(tmp_path / "ce", *common) == 0
    assert run_train(tmp_path / "chunked", *common, "--loss", "chunked", "--loss-chunk", "50") == 0
    for a, b in zip(read_metrics(tmp_path / "ce"), read_metrics(tmp_path / "chunked"), strict=True):
        assert_same_metrics(a, b, ("loss", "val_loss", "grad_norm", "exact_match"), rel=1e-5)


def test_final_model_from_chunked_run_has_its_head(tmp_path, small_data):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert run_train(out, "--dataset", str(small_data), "--max-steps", "2", "--micro-batch-size", "4",
                     "--loss", "chunked") == 0
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    logits = model(torch.tensor([[5, 6, 7]])).logits
    assert logits.shape[-1] == model.config.vocab_size


def test_bf16_gradients_run_in_bf16_and_match_plain_cross_entropy():
    """In bf16 every matmul of the chunked loss runs in bf16 (an fp32 weight-gradient GEMM is a slow
    SIMT kernel on GPUs), and the gradients stay within bf16 rounding of plain cross entropy."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
                self.seen.add(args[-1].dtype)
            return func(*args, **(kwargs or {}))

    hidden, weight, labels = _inputs(torch.bfloat16)
    with MatmulDtypes() as mode:
        chunked_cross_entropy_sum(hidden, weight, labels, chunk=8).backward()
    assert mode.seen == {torch.bfloat16}
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref = F.cross_entropy((h32 @ w32.T).flatten(0, 1), shifted_targets(labels).flatten(), reduction="sum")
    ref.backward()
    torch.testing.assert_close(weight.grad.float(), w32.grad, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(hidden.grad.float(), h32.grad, rtol=3e-2, atol=3e-2)
