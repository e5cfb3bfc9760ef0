"""train.py end to end on CPU: every tiny architecture and data format, and the embedded default."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, read_metrics, run_train

METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "peak_mem_gib"}


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gemma"])
def test_each_tiny_architecture_trains(tmp_path, small_data, preset):
    out = tmp_path / preset
    assert run_train(out, "--model", preset, "--dataset", str(small_data), "--max-steps", "12",
                     "--micro-batch-size", "8", "--log-every", "4", "--lr", "3e-3") == 0
    metrics = read_metrics(out)
    assert metrics[0]["step"] == 0 and "val_loss" in metrics[0]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 4, 8, 12]
    assert all(METRIC_KEYS <= set(m) for m in steps)
    assert steps[-1]["loss"] < steps[0]["loss"] and metrics[-1]["val_loss"] < metrics[0]["val_loss"]
    assert all(m["grad_norm"] > 0 for m in steps)


@pytest.mark.parametrize("name, extra", [("chat", []), ("completion", []), ("text", []),
                                         ("text", ["--dataset-format", "pretrain", "--seq-len", "32"]),
                                         ("alpaca", ["--train-on-inputs"])])
def test_each_format_trains(tmp_path, name, extra):
    out = tmp_path / name
    assert run_train(out, "--dataset", str(ROOT / f"data/examples/{name}.jsonl"), "--max-steps", "3",
                     "--micro-batch-size", "2", "--val-size", "4", *extra) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["data"]["train"]["samples"] > 0 and run["data"]["val"]["samples"] > 0


def test_run_directory_describes_the_run(tmp_path, small_data):
    out = tmp_path / "run"
    assert run_train(out, "--dataset", str(small_data), "--max-steps", "2", "--micro-batch-size", "4") == 0
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["dataset"] == str(small_data) and config["train"]["max_steps"] == 2
    run = json.loads((out / "run.json").read_text())
    assert {"argv", "git_sha", "git_dirty", "versions", "device", "world_size"} <= set(run)
    assert run["versions"]["torch"] and run["total_steps"] == 2
    assert (out / "final" / "config.json").is_file()


@pytest.mark.slow
def test_default_run_learns_within_three_minutes(tmp_path):
    """`python train.py`, no flags: the embedded demo. Falling validation loss, rising exact match."""
    proc = subprocess.run([sys.executable, "train.py", "--output-dir", str(tmp_path / "default")], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)  # a hang guard, not a timing test
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = read_metrics(tmp_path / "default")
    before, after = metrics[0], metrics[-1]
    assert after["val_loss"] < 0.5 * before["val_loss"]
    assert after["exact_match"] >= before["exact_match"] + 0.2
    assert "held-out exact match" in proc.stdout


def test_fine_tune_from_a_local_hf_directory(tmp_path, small_data):
    """--model <dir>: the from_pretrained path (offline), here on the HF export of a previous run."""
    first = tmp_path / "first"
    assert run_train(first, "--dataset", str(small_data), "--max-steps", "3", "--micro-batch-size", "4") == 0
    second = tmp_path / "second"
    assert run_train(second, "--model", str(first / "final"), "--dataset", str(small_data),
                     "--max-steps", "3", "--micro-batch-size", "4") == 0
    before_second = read_metrics(second)[0]["val_loss"]
    assert before_second == pytest.approx(read_metrics(first)[-1]["val_loss"], rel=1e-5)  # same weights
