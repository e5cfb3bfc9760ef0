"""QAT (torchao): the fake-quantized model predicts what the converted (really quantized) model
computes, the export reloads to the same outputs, --qat-start-step switches the fake quantizers on
through an optimizer hook, LoRA trains on a fake-quantized base, bad flags are refused."""

import copy

import pytest
import torch

pytest.importorskip("torchao")

import train  # noqa: E402
from conftest import config, read_metrics, run_train  # noqa: E402
from core import UserError
from features import lora, qat  # noqa: E402
from core.model import ModelConfig, load_config, load_model  # noqa: E402

SCHEMES = ["int8-int4", "int4", "int3", "int2"]


def tiny(tok, preset="tiny-llama", precision="fp32", seed=0):
    torch.manual_seed(seed)
    mcfg = ModelConfig(preset, precision=precision)
    return load_model(mcfg, load_config(mcfg, tok), torch.device("cpu"))


def ids(seed=1):
    return torch.randint(3, 400, (2, 24), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x):
    return model(input_ids=x).logits.float()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])
def test_fake_quant_predicts_the_converted_model(tok, tmp_path, scheme, preset):
    model, x = tiny(tok, preset), ids()
    plain = logits(model, x)
    cfg = qat.QatConfig(qat=True, qat_scheme=scheme, qat_group_size=32)
    qat.apply_qat(model, cfg)
    swapped = [n for n, m in model.named_modules() if type(m).__name__ == "FakeQuantizedLinear"]
    assert len(swapped) == 7 * model.config.num_hidden_layers  # every decoder linear, not lm_head
    fake = logits(model, x)
    assert (fake - plain).abs().max() > 1e-3  # int4 weights really change the outputs
    qat.export(model, tok, tmp_path / "q", cfg)
    reloaded = qat.load_quantized(tmp_path / "q")
    layer = reloaded.model.layers[0].mlp.down_proj
    assert type(layer) is torch.nn.Linear and "Tensor" in type(layer.weight).__name__  # a torchao tensor
    assert type(layer.weight) is not torch.nn.Parameter or layer.weight.dtype != torch.float32
    real = logits(reloaded, x)
    # same integer grid: fake quantization computes the quantized model's function up to fp32 rounding
    torch.testing.assert_close(fake, real, atol=1e-4, rtol=1e-4)
    assert reloaded.generate(x[:, :8], max_new_tokens=4, do_sample=False).shape == (2, 12)  # it runs


@pytest.mark.parametrize("scheme,bits", [("int4", 4), ("int3", 3), ("int2", 2)])
def test_weight_bits_of_the_converted_model(tok, scheme, bits):
    """int3 / int2 store signed 3- / 2-bit integers (in int8), one scale per group of --qat-group-size."""
    model = tiny(tok)
    cfg = qat.QatConfig(qat=True, qat_scheme=scheme, qat_group_size=64)
    weight = qat.convert(qat.apply_qat(model, cfg), cfg).model.layers[0].mlp.down_proj.weight  # 512 inputs
    assert weight.target_dtype == getattr(torch, f"int{bits}")
    assert weight.qdata.min() >= -(2 ** (bits - 1)) and weight.qdata.max() <= 2 ** (bits - 1) - 1
    assert len(weight.qdata.unique()) == 2 ** bits  # the whole grid is used, nothing wider
    assert weight.scale.shape == (128, 512 // 64)


def test_bf16_fake_quant_is_close_to_converted(tok):
    model, x = tiny(tok, precision="bf16"), ids()
    cfg = qat.QatConfig(qat=True, qat_scheme="int8-int4")
    qat.apply_qat(model, cfg)
    fake = logits(model, x)
    real = logits(qat.convert(model, cfg), x)
    # bf16 rounds the dequantized weights and activations differently from the fake path
    assert (fake - real).abs().max() < 0.05 * fake.abs().max()


def test_start_step_hook_switches_fake_quant_on(tok):
    model, x = tiny(tok), ids()
    plain = logits(model, x)
    qat.apply_qat(model, qat.QatConfig(qat=True, qat_start_step=3))
    torch.testing.assert_close(logits(model, x), plain, atol=0, rtol=0)  # off before step 3
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: only the quantizers' state changes
    handle = qat.schedule(model, opt, qat.QatConfig(qat=True, qat_start_step=3))
    assert handle is not None
    opt.step()  # step 1 done: step 2 still plain
    torch.testing.assert_close(logits(model, x), plain, atol=0, rtol=0)
    opt.step()  # step 2 done: step 3 fake-quantizes
    assert (logits(model, x) - plain).abs().max() > 1e-3
    # a run resumed after step 5 starts with the quantizers on, no hook left behind
    qat.set_fake_quant(model, False)
    assert qat.schedule(model, opt, qat.QatConfig(qat=True, qat_start_step=3), steps_done=5) is None
    assert (logits(model, x) - plain).abs().max() > 1e-3


def test_lora_on_fake_quantized_base(tok, tmp_path):
    model, x = tiny(tok), ids()
    cfg = qat.QatConfig(qat=True, qat_scheme="int4")
    model = lora.apply_lora(qat.apply_qat(model, cfg), lora.LoraConfig(lora=True, lora_rank=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    labels = x.clone()
    model(input_ids=x, labels=labels).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())  # lora_A's is zero: lora_B starts at zero
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    with torch.no_grad():  # a non-zero adapter, so that merging matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    fake_merged = logits(copy.deepcopy(model).merge_and_unload(), x)  # fake quantizers see base + update
    qat.export(model, tok, tmp_path / "q", cfg)
    real = logits(qat.load_quantized(tmp_path / "q"), x)
    # the export quantizes base + adapter update (training fake-quantized the base alone)
    torch.testing.assert_close(fake_merged, real, atol=1e-4, rtol=1e-4)


def test_refusals(tok):
    for bad, fix in [(qat.QatConfig(qat_group_size=64), "add --qat"),
                     (qat.QatConfig(qat=True, qat_group_size=48), "power of two"),
                     (qat.QatConfig(qat=True, qat_start_step=0), "--qat-start-step"),
                     ]:
        with pytest.raises(UserError, match=fix):
            qat.validate(config(qat=bad))
    with pytest.raises(UserError, match="--qat with --qlora: the base is already quantized"):  # core/compat.py
        train.validate(config(**{"qat.qat": True, "lora.qlora": True}))
    with pytest.raises(UserError, match="--qat-group-size 256 does not divide"):
        qat.apply_qat(tiny(tok), qat.QatConfig(qat=True, qat_group_size=256))  # hidden size 128


def test_train_py_qat_run_exports_both_models(tok, small_data, tmp_path):
    out = tmp_path / "run"
    assert run_train(out, "--dataset", str(small_data), "--qat", "--qat-start-step", "3", "--max-steps", "6",
                     "--micro-batch-size", "16", "--log-every", "2") == 0
    assert (out / "final" / "config.json").is_file()
    model = qat.load_quantized(out / "final-quantized")
    assert "Tensor" in type(model.model.layers[0].self_attn.q_proj.weight).__name__
    assert model.config.use_cache and (out / "final-quantized" / "generation_config.json").is_file()  # generates
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert run_train(tmp_path / "bad", "--qat", "--qlora") == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", SCHEMES)
def test_gpu_bf16_prepare_convert(tok, scheme):
    torch.manual_seed(0)
    mcfg = ModelConfig("tiny-llama", precision="bf16")
    model, x = load_model(mcfg, load_config(mcfg, tok), torch.device("cuda")), ids().cuda()
    cfg = qat.QatConfig(qat=True, qat_scheme=scheme)
    qat.apply_qat(model, cfg)
    model(input_ids=x, labels=x).loss.backward()  # fake quantization trains on CUDA
    fake = logits(model, x)
    real = logits(qat.convert(model, cfg), x)
    assert (fake - real).abs().max() < 0.05 * fake.abs().max()


def test_quantize_dir_equals_convert(tok, tmp_path):
    """The sharded-run fallback (quantize the gathered final/ with the scheme's config) = convert."""
    model, x = tiny(tok), ids()
    cfg = qat.QatConfig(qat=True, qat_scheme="int8-int4")
    qat.apply_qat(model, cfg)
    with torch.no_grad():  # a training step's worth of change, so the weights are not the init
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "final")
    from_dir = logits(qat.quantize_dir(tmp_path / "final", cfg), x)
    torch.testing.assert_close(from_dir, logits(qat.convert(model, cfg), x), atol=1e-5, rtol=1e-5)
