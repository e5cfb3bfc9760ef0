"""TiledMLP: the same loss and gradients as the untiled MLP (plain, LoRA, --lora-kernels, with
checkpointing), and no tokens x intermediate-size activation is kept for backward; under DDP and
FSDP2 (2 gloo ranks, gradient accumulation 2) the same step as one untiled process.

Distributed tolerances (fp32, as tests/test_distributed.py): losses to 1e-6 relative, gradients to
1e-6 of the largest gradient entry, grad norms to 1e-5 relative (only the order of float sums differs).
"""

import json

import pytest
import torch

import dist_worker
import ranks
from conftest import assert_same_grads, assert_same_metrics, config, read_metrics, run_train
from core import UserError
from core.batches import collate_padded
from features.activation_checkpointing import CheckpointingConfig, apply_checkpointing
from core.data import Sample
from core.loss import forward_loss_sum
from core.model import ModelConfig, load_config, load_model
from features.tiled_mlp import TiledMLPConfig, apply_tiled_mlp, auto_shards, validate


def _model(tok, preset="tiny-llama", lora=False, kernels=False):
    torch.manual_seed(0)
    model = load_model(ModelConfig(preset), load_config(ModelConfig(preset), tok), torch.device("cpu"))
    model = model.double()  # tiling changes the summation order: fp64 makes that noise negligible
    if lora:
        from features.lora import LoraConfig, apply_lora

        model = apply_lora(model, LoraConfig(lora=True, lora_rank=4))
        for name, p in model.named_parameters():  # peft starts B at zero: make the adapter matter
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    if kernels:
        from features.lora_kernels import apply_lora_kernels

        model = apply_lora_kernels(model)
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(4, 400, (n,), generator=g).tolist() for n in (40, 23, 57)]
    return collate_padded([Sample(d, d, 0) for d in docs], 0)


def _run(model, batch, intermediate):
    model.zero_grad()
    widths = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: widths.append(t.shape[-1:]) or t, lambda t: t):
        loss = forward_loss_sum(model, batch)
    loss.backward()
    big = sum(w == (intermediate,) for w in widths)  # saved tensors of the MLP's intermediate width
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, big


@pytest.mark.parametrize("preset, lora, kernels, ac, shards", [
    ("tiny-llama", False, False, "none", 3),
    ("tiny-llama", False, False, "none", 100),  # more tiles than tokens: one token each
    ("tiny-qwen2", True, False, "none", 4),
    ("tiny-llama", True, True, "none", 5),
    ("tiny-llama", True, False, "full", 2),
    ("tiny-gemma", True, True, "full", 7),
])
def test_tiled_mlp_keeps_loss_and_gradients(tok, preset, lora, kernels, ac, shards):
    batch = _batch()
    inter = _model(tok, preset).config.intermediate_size
    loss_ref, grads_ref, big_ref = _run(_model(tok, preset, lora, kernels), batch, inter)
    model = apply_tiled_mlp(_model(tok, preset, lora, kernels), TiledMLPConfig(tiled_mlp=True, tiled_mlp_shards=shards))
    if ac != "none":
        model = apply_checkpointing(model, CheckpointingConfig(ac=ac))
    loss, grads, big = _run(model, batch, inter)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-12)
    assert_same_grads(grads, grads_ref, rtol=1e-10, atol=1e-12)
    assert big_ref > 0 and big == 0  # the point: nothing of intermediate width is kept


def test_eval_and_auto_shards(tok):
    assert auto_shards(4096, 4096) == 1 and auto_shards(4097, 4096) == 2 and auto_shards(10, 128) == 1
    batch = _batch()
    ref = _model(tok)
    model = apply_tiled_mlp(_model(tok), TiledMLPConfig(tiled_mlp=True, tiled_mlp_shards=3))
    with torch.no_grad():
        torch.testing.assert_close(forward_loss_sum(model, batch), forward_loss_sum(ref, batch))


def test_bad_flags(tok):
    with pytest.raises(UserError, match="--tiled-mlp-shards must be >= 0"):
        validate(config(tiled_mlp=TiledMLPConfig(tiled_mlp=True, tiled_mlp_shards=-1)))
    with pytest.raises(UserError, match="add --tiled-mlp"):
        validate(config(tiled_mlp=TiledMLPConfig(tiled_mlp_shards=4)))


def test_train_py_tiled_mlp_matches_plain(tmp_path, small_data):
    common = ["--dataset", str(small_data), "--max-steps", "2", "--log-every", "1", "--micro-batch-size", "8",
              "--lora", "--lora-rank", "4", "--lora-kernels"]
    assert run_train(tmp_path / "plain", *common) == 0
    assert run_train(tmp_path / "tiled", *common, "--tiled-mlp", "--tiled-mlp-shards", "3") == 0
    for a, b in zip(read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "tiled"), strict=True):
        assert_same_metrics(a, b, ("loss", "val_loss", "grad_norm"), rel=1e-5)


def test_backward_recomputes_under_the_forward_autocast(tok):
    """bf16 autocast on CPU: the tiles are recomputed in bf16 as in forward (a dtype mismatch otherwise)."""
    batch = _batch()
    grads = []
    for tiled in (False, True):
        model = _model(tok).float()
        if tiled:
            model = apply_tiled_mlp(model, TiledMLPConfig(tiled_mlp=True, tiled_mlp_shards=4))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = forward_loss_sum(model, batch)
        loss.backward()
        grads.append(model.model.layers[1].mlp.up_proj.weight.grad)
    assert grads[1].dtype == grads[0].dtype == torch.float32
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() < 1e-2  # bf16 rounding only


def test_tiled_mlp_under_ddp_and_fsdp_two_ranks_match_one_untiled_process(tmp_path):
    """Full fine-tuning, every gradient compared (tests/dist_worker.py). DDP failed here while the tiles
    wrote .grad themselves: its per-parameter hooks fired once per tile ("marked ready twice")."""
    out = tmp_path / "tiled.json"
    ranks.run(dist_worker.run, 2, str(out), ["ddp:1,2,1,1:tiled", "fsdp:1,2,1,1:fsdp:tiled"])
    results = json.loads(out.read_text())
    assert sorted(results) == ["ddp", "fsdp"]
    for name, r in results.items():
        assert r["loss"][0] == pytest.approx(r["loss"][1], rel=1e-6), name
        assert r["grad_max_abs"] > 0 and r["grad_max_abs_err"] <= 1e-6 * r["grad_max_abs"], (name, r)
        assert r["norm"][0] == pytest.approx(r["norm"][1], rel=1e-5), name


@pytest.mark.slow
def test_train_py_tiled_mlp_and_alst_under_ddp_match_one_process(tmp_path, small_data):
    """train.py on 2 ranks x micro-batch 2 x accumulation 2 (DDP's no_sync on the first micro-batch),
    --tiled-mlp and --alst (+ chunked loss, --ac full, --offload cpu), vs one --tiled-mlp process x 8."""
    common = ["--dataset", str(small_data), "--max-steps", "2", "--log-every", "1", "--packing", "--seq-len", "256",
              "--eval-exact-match", "0", "--seed", "7", "--device", "cpu", "--lora", "--lora-rank", "4",
              "--tiled-mlp", "--tiled-mlp-shards", "3", "--skip-export"]
    assert run_train(tmp_path / "one", *common, "--micro-batch-size", "8") == 0
    two = [*common, "--micro-batch-size", "2", "--grad-accum", "2", "--ddp"]
    ranks.train(2, *two, "--output-dir", str(tmp_path / "tiled"))
    ranks.train(2, *two, "--alst", "--offload-min-kib", "0", "--output-dir", str(tmp_path / "alst"))
    for run in ("tiled", "alst"):
        for a, b in zip(read_metrics(tmp_path / run), read_metrics(tmp_path / "one"), strict=True):
            assert_same_metrics(a, b, ("loss", "val_loss"), rel=1e-6)
            assert_same_metrics(a, b, ("grad_norm",), rel=1e-5)
