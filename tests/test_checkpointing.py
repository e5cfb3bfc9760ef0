"""Activation checkpointing: the same loss and gradients as without, with less saved for backward."""

import pytest
import torch

from conftest import assert_same_grads, three_doc_batch, with_live_lora

from core.model import decoder_blocks
from features.activation_checkpointing import CheckpointingConfig, apply_checkpointing
from core.loss import forward_loss_sum
from core.model import ModelConfig, load_config, load_model


def _model(tok, preset="tiny-llama", lora=False):
    torch.manual_seed(0)
    model = load_model(ModelConfig(preset), load_config(ModelConfig(preset), tok), torch.device("cpu"))
    if lora:
        model = with_live_lora(model)
    return model


def _run(model, batch):
    model.zero_grad()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        loss = forward_loss_sum(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(saved)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("mode, every", [("full", 1), ("full", 2), ("selective", 1)])
def test_checkpointing_keeps_loss_and_gradients(tok, preset, lora, mode, every):
    batch = three_doc_batch()
    loss_ref, grads_ref, saved_ref = _run(_model(tok, preset, lora), batch)
    model = apply_checkpointing(_model(tok, preset, lora), CheckpointingConfig(ac=mode, ac_every=every))
    loss, grads, saved = _run(model, batch)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    assert_same_grads(grads, grads_ref, rtol=1e-5, atol=1e-7)
    assert saved < saved_ref  # the point of it: less kept for backward (outer graph)


def test_every_nth_block_and_bad_value(tok):
    model = apply_checkpointing(_model(tok), CheckpointingConfig(ac="full", ac_every=2))
    assert [b.gradient_checkpointing for b in decoder_blocks(model)] == [True, False, True, False]
    from core import UserError

    with pytest.raises(UserError, match="--ac-every must be at least 1"):
        apply_checkpointing(_model(tok), CheckpointingConfig(ac="full", ac_every=0))


def test_train_py_with_checkpointing_matches_without(tmp_path, small_data):
    from conftest import assert_same_metrics, read_metrics, run_train

    common = ["--dataset", str(small_data), "--max-steps", "3", "--log-every", "1", "--micro-batch-size", "8"]
    assert run_train(tmp_path / "plain", *common) == 0
    assert run_train(tmp_path / "ac", *common, "--ac", "full") == 0
    for a, b in zip(read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "ac"), strict=True):
        assert_same_metrics(a, b, ("loss", "val_loss", "grad_norm"), rel=1e-5)
