"""core/runlog.py: the per-step record, the human line, and metrics.jsonl on resume."""

import json

import pytest
import torch

from conftest import read_metrics, run_train
from core.runlog import MetricsLog, StepMeter, format_line, peak_for


def test_step_meter_reduces_a_window_and_resets():
    meter = StepMeter(torch.device("cpu"), world_size=1, flops=(6.0, 12.0), total_steps=10, start_step=2,
                      tokens=100)
    for _ in range(2):
        meter.count(targets=5, tokens=8, sum_sq_len=32)
        meter.add_loss(torch.tensor(10.0))
        meter.step_done()
    reduced = []
    record = meter.record(4, lr=1e-3, grad_norm=torch.tensor(2.0), reduce=lambda t: reduced.append(t) or t)
    assert reduced[0].tolist() == [20.0, 10.0, 16.0, 64.0]  # loss sum, targets, tokens, sum of squares
    assert record["loss"] == 2.0 and record["tokens"] == 116 and record["grad_norm"] == 2.0
    assert record["mfu"] is None  # no GPU peak on CPU
    assert record["eta_s"] >= 0 and record["tokens_per_s"] > 0
    again = meter.record(5, lr=1e-3, grad_norm=torch.tensor(1.0), reduce=lambda t: t)
    assert again["tokens"] == 116 and again["loss"] == 0.0  # the window was reset


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA T4", None),
])
def test_mfu_peak_by_gpu_name_takes_the_variant_before_its_family(name, peak):
    assert peak_for(name) == peak


def test_format_line_names_every_number():
    line = format_line({"step": 3, "loss": 1.23456, "val_loss": 1.1, "lr": 2e-4, "grad_norm": 0.5,
                        "tokens_per_s": 12345.6, "mfu": 0.412, "peak_mem_gib": 3.25, "eta_s": 125}, 10)
    assert line == ("step 3/10 | loss 1.2346 | val 1.1000 | lr 2.00e-04 | gnorm 0.500 | 12,346 tok/s | "
                    "mfu 41.2% | mem 3.2GiB | eta 2m05s")


def test_format_line_of_the_evaluation_before_training():
    assert format_line({"step": 0, "val_loss": 6.0348716, "exact_match": 0.125}, 20) == \
        "step 0/20 | val 6.0349 | exact match 12.5%"
    assert format_line({"step": 0, "val_loss": 2.5}, 20) == "step 0/20 | val 2.5000"
    assert format_line({"step": 0, "val_loss": 2.5, "exact_match": 0.5, "eval_s": 83.4}, 20) == \
        "step 0/20 | val 2.5000 | exact match 50.0% | eval 1m23s"


def test_an_evaluation_reports_its_own_time(tmp_path, small_data):
    assert run_train(tmp_path / "run", "--dataset", str(small_data), "--max-steps", "2", "--micro-batch-size", "4") == 0
    evals = [m for m in read_metrics(tmp_path / "run") if "val_loss" in m]
    assert [m["step"] for m in evals] == [0, 2] and all(m["eval_s"] > 0 for m in evals)


def test_evaluations_follow_eval_every_not_the_log_steps(tmp_path, small_data):
    """--eval-every 3 with --log-every 4: evaluations at 0, 3, 6 (each also logs), training lines at 1, 4."""
    assert run_train(tmp_path / "r", "--dataset", str(small_data), "--max-steps", "6", "--eval-every", "3",
                     "--log-every", "4", "--micro-batch-size", "4", "--eval-exact-match", "0", "--skip-export") == 0
    metrics = read_metrics(tmp_path / "r")
    assert [m["step"] for m in metrics] == [0, 1, 3, 4, 6]
    assert [m["step"] for m in metrics if "val_loss" in m] == [0, 3, 6]


def test_metrics_log_keeps_history_up_to_the_resumed_step(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(8)))
    log = MetricsLog(tmp_path, total_steps=10, start_step=4, enabled=True)
    log.log({"step": 5, "loss": 0.5, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0, "eta_s": 1})
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5]
