"""--offload-keep-gib: the first activations of a forward stay on the device while they fit the
budget, the rest leave; the math is the same either way."""

import pytest
import torch

from conftest import assert_same_grads, config, loss_and_grads, three_doc_batch
from core import UserError
from features.activation_checkpointing import CheckpointingConfig, apply_checkpointing
from core.model import ModelConfig, load_config, load_model
from features.activation_offload import OffloadConfig, apply_offload, validate

CPU = torch.device("cpu")


def _offloaded(tok, keep_gib: float):
    torch.manual_seed(0)
    model = load_model(ModelConfig("tiny-llama"), load_config(ModelConfig("tiny-llama"), tok), CPU)
    model = apply_checkpointing(model, CheckpointingConfig(ac="full"))
    # min 64 KiB: only the (tokens, hidden) block inputs (86 KiB here) and larger are offloaded
    return apply_offload(model, OffloadConfig(offload="cpu", offload_min_kib=64, offload_keep_gib=keep_gib), CPU)


def _block_input_bytes(model, batch) -> int:
    return batch["input_ids"].numel() * model.config.hidden_size * 4  # one fp32 (tokens, hidden) tensor


@pytest.mark.parametrize("keep_gib", [0.0, 1.0])
def test_same_loss_and_gradients_whatever_the_budget(tok, keep_gib):
    batch = three_doc_batch()
    loss_ref, grads_ref = loss_and_grads(_offloaded(tok, 0.0), batch)
    model = _offloaded(tok, keep_gib)
    loss, grads = loss_and_grads(model, batch)
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
    assert_same_grads(grads, grads_ref, rtol=0, atol=0)
    assert (model._offloader.copied_bytes == 0) == (keep_gib > 0)  # 1 GiB holds all of a tiny model's


def test_a_budget_of_one_block_input_keeps_exactly_that(tok):
    batch = three_doc_batch()
    everything = _offloaded(tok, 0.0)
    loss_and_grads(everything, batch)
    one = _block_input_bytes(everything, batch)
    model = _offloaded(tok, one / 2**30)
    loss_and_grads(model, batch)
    assert 0 < model._offloader.copied_bytes == everything._offloader.copied_bytes - one


def test_the_budget_needs_offload():
    with pytest.raises(UserError, match="--offload-keep-gib"):
        validate(config(offload=OffloadConfig(offload_keep_gib=2.0)))
    with pytest.raises(UserError, match="--offload-keep-gib"):
        validate(config(offload=OffloadConfig(offload="cpu", offload_keep_gib=-1.0)))
