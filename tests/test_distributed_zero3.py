"""DeepSpeed ZeRO-3 on gloo ranks (CPU): the final export of a model that ties its head to its input
embeddings, and the losses that read the head's weight outside the model's forward (refused before
anything loads, where ZeRO-3 would hold only a partition of it)."""

import importlib.util
import json

import pytest

import ranks
from conftest import config, run_train
from core import UserError

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="pip install deepspeed")


@needs_deepspeed
def test_zero3_export_of_tied_embeddings_is_the_one_process_export(tmp_path, small_data):
    """tiny-qwen2 ties lm_head to embed_tokens (as SmolLM2 and Llama 3.2): the weights gathered from the ZeRO-3
    partitions of 2 ranks save as one process saves them, the head not written as a second table."""
    import torch
    from safetensors.torch import load_file

    common = ["--model", "tiny-qwen2", "--dataset", str(small_data), "--max-steps", "1", "--packing", "--seq-len",
              "256", "--seed", "7", "--device", "cpu", "--val-dataset", "none", "--eval-exact-match", "0"]
    assert run_train(tmp_path / "one", *common, "--micro-batch-size", "8") == 0
    ranks.train(2, *common, "--micro-batch-size", "4", "--deepspeed", "zero3", "--output-dir", str(tmp_path / "z3"))
    one, z3 = (load_file(tmp_path / n / "final" / "model.safetensors") for n in ("one", "z3"))
    assert "lm_head.weight" not in one and sorted(z3) == sorted(one)
    for key in one:
        torch.testing.assert_close(z3[key], one[key], rtol=1e-4, atol=1e-5)  # one step, sums in another order


@pytest.mark.parametrize("loss", ["chunked", "cce", "liger"])
def test_zero3_refuses_the_losses_that_read_the_head_after_the_forward(tmp_path, loss):
    """Through the module's validate (cce and liger are refused on CPU for their kernels before it), and for
    the chunked loss through train.parse_config, --alst (which turns it on) included."""
    import train
    from features import deepspeed_zero

    stage3 = tmp_path / "stage3.json"
    stage3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    for deepspeed in ("zero3", str(stage3)):
        with pytest.raises(UserError, match=f"--loss {loss} with ZeRO-3 .* use --loss ce"):
            deepspeed_zero.validate(config(**{"deepspeed.deepspeed": deepspeed, "loss.loss": loss}))
    deepspeed_zero.validate(config(**{"deepspeed.deepspeed": "zero2", "loss.loss": loss}))  # whole weights
    if loss == "chunked":
        for argv in (["--loss", "chunked"], ["--alst"]):
            with pytest.raises(UserError, match="--loss chunked with ZeRO-3"):
                train.parse_config(["--deepspeed", "zero3", *argv])
        train.parse_config(["--deepspeed", "zero2", "--loss", "chunked"])


def test_a_deepspeed_json_that_does_not_parse_is_one_line(tmp_path):
    import train

    broken = tmp_path / "ds.json"
    broken.write_text('{"zero_optimization": {"stage": 3}')  # cut short
    with pytest.raises(UserError, match=r"--deepspeed .*ds\.json: not a JSON object of DeepSpeed settings"):
        train.validate(config(**{"deepspeed.deepspeed": str(broken)}))
