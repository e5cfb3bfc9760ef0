"""--liger: refused on CPU; the swaps (norm modules holding the same weights, fused-GLU MLP
forwards under peft, the RoPE name) reproduce the plain model with reference kernels on CPU; the
real kernels match within a stated tolerance on GPU (marked gpu)."""

import importlib
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_same_grads, config, loss_and_grads, three_doc_batch, with_live_lora

from core import UserError
from features.liger import LigerConfig, apply_liger, validate
from core.model import ModelConfig, load_config, load_model


class _ReferenceRMSNorm(torch.nn.Module):
    """LigerRMSNorm's constructor and math (offset, llama / gemma casting), in PyTorch."""

    def __init__(self, hidden_size, eps=1e-6, offset=0.0, casting_mode="llama", init_fn="ones"):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size) if init_fn == "ones" else torch.zeros(hidden_size))
        self.eps, self.offset, self.casting_mode = eps, offset, casting_mode

    def forward(self, x):
        h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.casting_mode == "gemma":
            return (h * (self.offset + self.weight.float())).type_as(x)
        return (self.offset + self.weight) * h.type_as(x)


def _glu(act):
    return types.SimpleNamespace(apply=lambda a, b: act(a) * b)


@pytest.fixture
def reference_liger(monkeypatch):
    """liger_kernel stand-ins with the same names and signatures; RoPE is transformers' own."""
    from transformers.models.gemma import modeling_gemma
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2 import modeling_qwen2

    for modeling in (modeling_llama, modeling_qwen2, modeling_gemma):  # restored after the test
        monkeypatch.setattr(modeling, "apply_rotary_pos_emb", modeling.apply_rotary_pos_emb)
    mods = {name: types.ModuleType(name) for name in (
        "liger_kernel", "liger_kernel.ops", "liger_kernel.ops.swiglu", "liger_kernel.ops.geglu",
        "liger_kernel.transformers", "liger_kernel.transformers.rms_norm", "liger_kernel.transformers.rope")}
    mods["liger_kernel.transformers.rms_norm"].LigerRMSNorm = _ReferenceRMSNorm
    mods["liger_kernel.ops.swiglu"].LigerSiLUMulFunction = _glu(F.silu)
    mods["liger_kernel.ops.geglu"].LigerGELUMulFunction = _glu(lambda a: F.gelu(a, approximate="tanh"))
    rope = modeling_llama.apply_rotary_pos_emb
    mods["liger_kernel.transformers.rope"].liger_rotary_pos_emb = lambda q, k, cos, sin, *a, **kw: rope(q, k, cos, sin)
    for name, module in mods.items():
        monkeypatch.setitem(sys.modules, name, module)
    return mods


def _model(tok, preset, lora=False, liger=False):
    torch.manual_seed(0)
    model = load_model(ModelConfig(preset), load_config(ModelConfig(preset), tok), torch.device("cpu"))
    with torch.no_grad():  # norms start at 1 (0 for Gemma): make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    if liger:
        model = apply_liger(model, LigerConfig(liger=True))
    if lora:
        model = with_live_lora(model)
    return model


@pytest.mark.parametrize("preset, lora", [("tiny-llama", False), ("tiny-qwen2", True), ("tiny-gemma", True)])
def test_swaps_keep_names_loss_and_gradients(tok, reference_liger, preset, lora):
    batch = three_doc_batch()
    loss_ref, grads_ref = loss_and_grads(_model(tok, preset, lora), batch)
    model = _model(tok, preset, lora, liger=True)
    modeling = importlib.import_module(type(model.get_base_model() if lora else model).__module__)
    assert modeling.apply_rotary_pos_emb is not None and "lambda" in modeling.apply_rotary_pos_emb.__qualname__
    assert any(isinstance(m, _ReferenceRMSNorm) for m in model.modules())
    loss, grads = loss_and_grads(model, batch)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    assert_same_grads(grads, grads_ref, rtol=1e-5, atol=1e-6)  # the same parameter names


def test_refused_on_cpu_and_for_other_architectures(tok, reference_liger):
    with pytest.raises(UserError, match="--liger runs Triton kernels and needs a CUDA GPU"):
        validate(config(**{"liger.liger": True, "train.device": "cpu"}))
    model = _model(tok, "tiny-llama")
    model.config.model_type = "gpt2"
    with pytest.raises(UserError, match="--liger supports llama, mistral, qwen2, gemma models, not gpt2"):
        apply_liger(model, LigerConfig(liger=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_kernels_match_on_gpu(tok):
    """Tolerance: fp32 weights and activations; Liger's kernels reorder the reductions, so loss
    within 1e-5 relative and gradients within 1e-3 relative + 1e-5 absolute."""
    pytest.importorskip("liger_kernel")
    from transformers.models.llama import modeling_llama

    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in three_doc_batch().items()}
    original = modeling_llama.apply_rotary_pos_emb
    loss_ref, grads_ref = loss_and_grads(_model(tok, "tiny-llama", lora=True).cuda(), batch)
    try:
        model = _model(tok, "tiny-llama", lora=True, liger=True).cuda()
        loss, grads = loss_and_grads(model, batch)
    finally:
        modeling_llama.apply_rotary_pos_emb = original
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-4)
    assert_same_grads(grads, grads_ref, rtol=1e-3, atol=1e-5)


def test_train_py_refuses_liger_on_cpu(tmp_path, small_data, capsys):
    from conftest import run_train

    assert run_train(tmp_path / "r", "--dataset", str(small_data), "--device", "cpu", "--liger") == 2
    err = capsys.readouterr().err  # one line naming the flag (core/compat.py words it for train.py)
    assert err.startswith("error: --liger") and "CUDA GPU" in err and len(err.splitlines()) == 1


def test_composes_with_alst_and_lora(tok, reference_liger, tmp_path):
    """--liger --alst --lora: train.py's order (Liger swaps, adapters, tiled MLP, checkpointing,
    offload) on the reference kernels gives the plain LoRA model's loss and gradients; the
    compatibility matrix accepts the flags on CUDA."""
    import tyro

    import train
    from core import compat
    from features.alst import expand
    from features.activation_checkpointing import CheckpointingConfig, apply_checkpointing
    from features.activation_offload import OffloadConfig, apply_offload
    from features.tiled_mlp import TiledMLPConfig, apply_tiled_mlp

    cfg = tyro.cli(train.Config, args=["--liger", "--alst", "--lora"], config=train.CLI)
    assert expand(cfg) and cfg.liger.liger and cfg.tiled_mlp.tiled_mlp and cfg.offload.offload == "cpu"
    compat.check(cfg, cuda=True)  # not refused
    batch = three_doc_batch()
    loss_ref, grads_ref = loss_and_grads(_model(tok, "tiny-llama", lora=True), batch)
    model = apply_tiled_mlp(_model(tok, "tiny-llama", lora=True, liger=True), TiledMLPConfig(True, 3))
    model = apply_checkpointing(model, CheckpointingConfig(ac="full"))
    model = apply_offload(model, OffloadConfig(offload="cpu", offload_min_kib=0), torch.device("cpu"))
    loss, grads = loss_and_grads(model, batch)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    assert_same_grads(grads, grads_ref, rtol=1e-5, atol=1e-6)
    assert model._offloader.copied_bytes > 0
