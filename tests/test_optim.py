"""--optimizer adamw-8bit: bitsandbytes' 8-bit AdamW trains, keeps 8-bit moments, and resumes exactly."""

import shutil

import torch

from conftest import read_metrics, run_train
from core.optim import OptimConfig, build_optimizer

ARGS = ["--max-steps", "6", "--log-every", "1", "--micro-batch-size", "8", "--lr", "3e-3", "--warmup-steps", "2",
        "--seed", "3", "--optimizer", "adamw-8bit", "--skip-export"]


def test_8bit_moments_for_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.LayerNorm(128))
    opt = build_optimizer(model, OptimConfig(optimizer="adamw-8bit", lr=2e-3), torch.device("cpu"))
    model(torch.randn(4, 128)).square().sum().backward()
    opt.step()
    state = opt.state[model[0].weight]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    assert state["state1"].numel() == model[0].weight.numel()  # 1 byte per moment per parameter


def test_trains_and_resumes_exactly(tmp_path, small_data):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_train(full, "--dataset", str(small_data), *ARGS, "--save-every", "3", "--keep-checkpoints", "0") == 0
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_00000003", cut / "checkpoints" / "step_00000003")
    assert run_train(cut, "--dataset", str(small_data), *ARGS, "--save-every", "3", "--resume", "auto") == 0
    a = {m["step"]: m for m in read_metrics(full) if "loss" in m}
    b = {m["step"]: m for m in read_metrics(cut) if "loss" in m}
    assert a[6]["loss"] < a[1]["loss"]  # it trains
    assert sorted(b) == [4, 5, 6]
    for step in b:  # the 8-bit state (moments, quantization maps, absmax) round-trips through the checkpoint
        assert b[step]["loss"] == a[step]["loss"] and b[step]["grad_norm"] == a[step]["grad_norm"], step
