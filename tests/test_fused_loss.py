"""--loss cce / liger: refused where they cannot run; the glue (shift, flattening, argument order,
head swap) reproduces plain cross entropy with reference kernels on CPU; the real kernels match
cross entropy within bf16 tolerance on GPU (marked gpu)."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_same_grads, config, run_train
from core import UserError
from core.batches import collate_padded
from core.loss import hidden_head, validate
from core.data import Sample
from features.fused_loss import forward_fused_loss_sum, fused_cross_entropy_sum
from core.loss import IGNORE, cross_entropy_sum, forward_loss_sum
from core.model import ModelConfig, load_config, load_model


def _reference_cce(e, c, targets, ignore_index, reduction):
    return F.cross_entropy((e @ c.T).float(), targets, ignore_index=ignore_index, reduction=reduction)


class _ReferenceLiger(torch.nn.Module):
    def __init__(self, ignore_index, reduction):
        super().__init__()
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, lin_weight, _input, target):  # Liger's order: weight first
        return _reference_cce(_input, lin_weight, target, self.ignore_index, self.reduction)


@pytest.fixture
def reference_kernels(monkeypatch):
    """Stand-ins with the libraries' call signatures, computing plain cross entropy."""
    cce = types.ModuleType("cut_cross_entropy")
    cce.linear_cross_entropy = lambda e, c, t, ignore_index, reduction: _reference_cce(e, c, t, ignore_index, reduction)
    liger = types.ModuleType("liger_kernel.transformers.fused_linear_cross_entropy")
    liger.LigerFusedLinearCrossEntropyLoss = _ReferenceLiger
    for name, module in {"cut_cross_entropy": cce, "liger_kernel": types.ModuleType("liger_kernel"),
                         "liger_kernel.transformers": types.ModuleType("liger_kernel.transformers"),
                         "liger_kernel.transformers.fused_linear_cross_entropy": liger}.items():
        monkeypatch.setitem(sys.modules, name, module)


def _model(tok):
    torch.manual_seed(0)
    return load_model(ModelConfig("tiny-qwen2"), load_config(ModelConfig("tiny-qwen2"), tok), torch.device("cpu"))


def _batch():
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(4, 400, (n,), generator=g).tolist() for n in (40, 23, 57)]
    batch = collate_padded([Sample(d, d, 0) for d in docs], 0)
    batch["labels"][0, :5] = IGNORE  # a masked prompt
    return batch


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kernel", ["cce", "liger"])
def test_glue_matches_plain_cross_entropy(tok, reference_kernels, kernel):
    batch = _batch()
    ref = _model(tok)
    loss_ref = forward_loss_sum(ref, batch)
    loss_ref.backward()
    model = hidden_head(_model(tok), f"--loss {kernel}")  # tied head (Qwen2): one weight
    loss = forward_fused_loss_sum(model, batch, kernel=kernel)
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    grads, grads_ref = _grads(model), _grads(ref)
    assert_same_grads(grads, grads_ref, rtol=1e-5, atol=1e-7)


def test_refused_without_the_package(monkeypatch):
    validate(config(**{"loss.loss": "chunked", "train.device": "cpu"}))
    with pytest.raises(UserError, match=r"--loss-chunk must be at least 1 \(got 0\)"):
        validate(config(**{"loss.loss": "chunked", "loss.loss_chunk": 0}))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install liger-kernel"):
        validate(config(**{"loss.loss": "liger"}))


def test_train_py_refuses_cce_on_cpu(tmp_path, small_data, capsys):
    assert run_train(tmp_path / "r", "--dataset", str(small_data), "--device", "cpu", "--loss", "cce") == 2
    err = capsys.readouterr().err  # one line naming the flag (core/compat.py words it for train.py)
    assert err.startswith("error: --loss cce") and "CUDA" in err and len(err.splitlines()) == 1


# ---- GPU: the real kernels against fp32 cross entropy of the same bf16 inputs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel, package", [("cce", "cut_cross_entropy"), ("liger", "liger_kernel")])
def test_kernel_matches_cross_entropy_within_bf16_tolerance(kernel, package):
    """Tolerance: loss within 0.2% relative; gradients within 2% relative (Frobenius norm): bf16
    operands and bf16 gradients (CCE also skips gradient blocks below bf16 precision)."""
    pytest.importorskip(package)
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(2, 1024, 512, device="cuda", generator=g).bfloat16().requires_grad_()
    weight = (0.05 * torch.randn(8192, 512, device="cuda", generator=g)).bfloat16().requires_grad_()
    labels = torch.randint(0, 8192, (2, 1024), device="cuda", generator=g)
    labels[0, :100] = IGNORE
    ref = cross_entropy_sum(F.linear(hidden.float(), weight.float()), labels)
    ref.backward()
    ref_grads = hidden.grad.float().clone(), weight.grad.float().clone()
    hidden.grad = weight.grad = None
    out = fused_cross_entropy_sum(hidden, weight, labels, kernel)
    out.backward()
    assert out.item() == pytest.approx(ref.item(), rel=2e-3)
    for got, want in zip((hidden.grad.float(), weight.grad.float()), ref_grads):
        assert ((got - want).norm() / want.norm()).item() < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel, package", [("cce", "cut_cross_entropy"), ("liger", "liger_kernel")])
def test_train_py_fused_loss_follows_plain_on_gpu(tmp_path, small_data, kernel, package):
    pytest.importorskip(package)
    from conftest import read_metrics

    common = ["--dataset", str(small_data), "--max-steps", "3", "--log-every", "1", "--micro-batch-size", "8",
              "--device", "cuda"]
    assert run_train(tmp_path / "ce", *common) == 0
    assert run_train(tmp_path / kernel, *common, "--loss", kernel) == 0
    for a, b in zip(read_metrics(tmp_path / "ce"), read_metrics(tmp_path / kernel), strict=True):
        for key in ("loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-2), key
