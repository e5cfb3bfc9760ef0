"""GPTQ: the int4 packing round-trips, the GPTQ algorithm beats round-to-nearest on correlated inputs,
a checkpoint the repo makes reloads as GPTQLinear layers close to the original model, and LoRA on
it trains (loss falls, only the adapter trains, the 4-bit base stays bitwise unchanged)."""

import json

import pytest
import torch

from conftest import config, read_metrics, run_train
from core import UserError
from features import gptq
from features.lora import LoraConfig
from core.model import ModelConfig, load_config, load_model, load_tokenizer


def test_pack_roundtrip_and_dequantize():
    codes = torch.randint(0, 16, (64, 24))
    assert torch.equal(gptq.unpack(gptq.pack(codes)), codes)
    assert gptq.pack(codes).dtype == torch.int32 and gptq.pack(codes).shape == (8, 24)
    w = torch.randn(16, 64)
    c, s, z = gptq.gptq_quantize(w, torch.eye(64, dtype=torch.float64), group_size=32)
    p = gptq._packed(c, s, z, 32, None)
    manual = (s.repeat_interleave(32, 0).t() * (c - 8).float())  # (out, in): scale * (code - zero)
    torch.testing.assert_close(gptq.dequantize(p["qweight"], p["qzeros"], p["scales"], p["g_idx"].long(),
                                               torch.float32), manual, atol=1e-6, rtol=0)
    assert (w - manual).abs().max() <= 1.01 * s.max() / 2  # round to nearest (+xmax clamps to 7 steps: s/2 off)


def test_gptq_beats_round_to_nearest():
    torch.manual_seed(0)
    x = torch.randn(2048, 128) @ torch.randn(128, 128) * 0.3  # correlated input channels
    w = torch.randn(64, 128)
    h = 2 * x.double().t() @ x.double() / len(x)

    def output_error(hessian):
        p = gptq._packed(*gptq.gptq_quantize(w, hessian, 32), 32, None)
        wq = gptq.dequantize(p["qweight"], p["qzeros"], p["scales"], p["g_idx"].long(), torch.float32)
        return ((x @ (w - wq).t()).norm() / (x @ w.t()).norm()).item()

    # the identity Hessian spreads no error: plain round-to-nearest on the same grid
    assert output_error(h) < 0.8 * output_error(torch.eye(128, dtype=torch.float64))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = load_tokenizer(ModelConfig())
    torch.manual_seed(0)
    mcfg = ModelConfig("tiny-llama", precision="fp32")
    model = load_model(mcfg, load_config(mcfg, tok), torch.device("cpu"))
    calib = torch.randint(3, 400, (8, 64), generator=torch.Generator().manual_seed(0))
    out = gptq.make_checkpoint(model, tok, tmp_path_factory.mktemp("gptq") / "tiny-gptq", calib, group_size=32)
    return out, model


def _load(path, precision="fp32"):
    mcfg = ModelConfig(str(path), precision=precision)
    return gptq.load_model(mcfg, load_config(mcfg, load_tokenizer(mcfg)), torch.device("cpu"))


def test_checkpoint_reloads_close_to_the_original(checkpoint):
    path, original = checkpoint
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["checkpoint_format"] == "gptq"
    model = _load(path)
    layers = [m for m in model.modules() if isinstance(m, gptq.GPTQLinear)]
    assert len(layers) == 7 * model.config.num_hidden_layers and type(model.lm_head) is torch.nn.Linear
    x = torch.randint(3, 400, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = original(input_ids=x).logits, model(input_ids=x).logits
    # int4 in groups of 32 on random Gaussian weights: ~10% error per layer, 4 layers deep
    assert ((got - ref).norm() / ref.norm()).item() < 0.3
    w0 = original.model.layers[0].mlp.down_proj.weight
    wq = model.model.layers[0].mlp.down_proj.weight_dequantized()
    assert ((wq - w0).norm() / w0.norm()).item() < 0.25  # GPTQ trades weight error for output error


def test_backward_recomputes_the_weight(checkpoint):
    layer = _load(checkpoint[0]).model.layers[0].mlp.up_proj
    x = torch.randn(3, 128, requires_grad=True)
    layer(x).square().sum().backward()
    w = layer.weight_dequantized()
    x2 = x.detach().clone().requires_grad_()
    (x2 @ w.t()).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_lora_on_gptq_trains_only_the_adapter(checkpoint):
    model = gptq.apply_lora(_load(checkpoint[0]), LoraConfig(lora=True, lora_rank=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(trainable) == 2 * 7 * 4  # A and B on every quantized linear
    before = {k: v.clone() for k, v in model.state_dict().items() if "qweight" in k or "scales" in k}
    x = torch.randint(3, 400, (4, 32), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_refusals(tmp_path):
    import train  # what --gptq needs and refuses: core/compat.py's matrix

    for flags, match in ((dict(lora=LoraConfig()), "--gptq needs --lora"),
                         (dict(lora=LoraConfig(qlora=True)), "already quantized"),
                         (dict(lora=LoraConfig(lora=True, dora=True)), "--dora"),
                         ({"lora.lora": True, "lora_kernels.lora_kernels": True}, "--lora-kernels")):
        with pytest.raises(UserError, match=match):
            train.validate(config(**{"gptq.gptq": True}, **flags))
    tok = load_tokenizer(ModelConfig())
    with pytest.raises(UserError, match="no GPTQ quantization_config"):
        gptq.load_model(ModelConfig("tiny-llama"), load_config(ModelConfig("tiny-llama"), tok), torch.device("cpu"))


def _compat_refuses_gptq_on_cpu() -> bool:
    try:
        from core import compat
    except ImportError:
        return False
    return any(f.flag == "--gptq" and f.cuda for f in compat.FEATURES)


@pytest.mark.skipif(_compat_refuses_gptq_on_cpu(), reason="core/compat.py still lists --gptq as CUDA-only")
def test_train_py_gptq_lora(checkpoint, small_data, tmp_path):
    out = tmp_path / "run"
    assert run_train(out, "--model", str(checkpoint[0]), "--gptq", "--lora", "--dataset", str(small_data),
                     "--max-steps", "8", "--micro-batch-size", "16", "--log-every", "1", "--lr", "5e-3") == 0
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert losses[-1] < losses[0]
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(checkpoint[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_lora_on_gptq_bf16(checkpoint):
    """The same checkpoint on CUDA in bf16 (GPTQLinear, or gptqmodel's kernels when installed): LoRA learns."""
    mcfg = ModelConfig(str(checkpoint[0]), precision="bf16")
    base = gptq.load_model(mcfg, load_config(mcfg, load_tokenizer(mcfg)), torch.device("cuda"))
    model = gptq.apply_lora(base, LoraConfig(lora=True, lora_rank=8))
    x = torch.randint(3, 400, (4, 32), generator=torch.Generator().manual_seed(2)).cuda()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses
