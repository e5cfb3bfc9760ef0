"""benchmarks/sequence_parallel.py: its search, memory plan and table with simulated tries
(the GPU path: 2, 4 and 8 H200s, a fake clock), and end to end on CPU with 2 gloo ranks of
tiny-llama (torchrun, train.py, the metrics it parses, the table)."""

import importlib.util
import sys

import pytest

from conftest import ROOT

K = 1024


def _bench():
    spec = importlib.util.spec_from_file_location("sp_bench", ROOT / "benchmarks" / "sequence_parallel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Clock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def _simulate(bench, monkeypatch, gpus: int, budget: float, oom_above: int, slow: float = 1.0):
    """Run main() on `gpus` H200s where a step takes the one-GPU record's time / N (Ulysses), x slow,
    and lengths above oom_above run out of memory. Returns (table text, the tries started)."""
    clock, started = _Clock(), []

    def fake_try(args, mode, seq_len, flags, tmp, timeout):
        started.append((mode, seq_len, timeout))
        keep, why = bench.plan_keep(args, mode, seq_len)
        if keep is None:
            return {"status": "memory (predicted)", "wall_s": 0.0, "error": why}
        step = slow * 633 * (seq_len / (512 * K)) ** 2 / gpus if mode == "ulysses" else 5 + seq_len / 4000
        wall = 70 + step
        if wall > timeout:
            clock.now += timeout
            return {"status": "time", "wall_s": timeout}
        clock.now += wall
        if seq_len > oom_above:
            return {"status": "oom", "wall_s": wall}
        return {"status": "ok", "wall_s": wall, "tokens_per_s": seq_len / step, "peak_gib": 100.0, "loss": 12.0,
                "offload_keep_gib": keep}

    monkeypatch.setattr(bench, "time", clock)
    monkeypatch.setattr(bench, "try_length", fake_try)
    monkeypatch.setattr(bench, "versions", lambda: "simulated")
    text = bench.main(["--gpus", str(gpus), "--budget-s", str(budget), "--host-gib", "280"])
    assert clock.now <= budget, (clock.now, started)  # never past the budget
    return text, started


@pytest.mark.parametrize("gpus", [2, 4, 8])
def test_search_fits_the_budget_and_starts_from_the_predicted_record(gpus, monkeypatch, capsys):
    bench = _bench()
    text, started = _simulate(bench, monkeypatch, gpus, budget=900, oom_above=16384 * K)
    ulysses = [n for mode, n, _ in started if mode == "ulysses"]
    # the probe: half the length whose predicted step fits 1/1.3 of the row's 720 s (633 s x (L/512K)^2 / N)
    predicted = 512 * K * ((720 / 1.3 - 90) * gpus / 633) ** 0.5
    assert 0.4 * predicted <= ulysses[0] <= 0.5 * predicted
    assert ulysses[1] > ulysses[0] and len(ulysses) == 2  # then one try as long as the time left allows
    assert all(timeout <= 900 for _, _, timeout in started)
    row = next(line for line in text.splitlines() if line.startswith("| Ulysses"))
    assert f"**{ulysses[1] // K}K**" in row, text  # the longest that trained is in the table
    assert text.splitlines()[0].startswith(f"| {gpus} GPUs: settings")


def test_a_slow_first_try_is_killed_within_the_share_and_a_failed_start_halved(monkeypatch, capsys):
    bench = _bench()
    # 3x slower than predicted: the probe is killed at 1.25 x predicted + 60 s, then the next is halved
    text, started = _simulate(bench, monkeypatch, 8, budget=900, oom_above=16384 * K, slow=3.0)
    ulysses = [(n, t) for mode, n, t in started if mode == "ulysses"]
    assert ulysses[0][1] < 900 and ulysses[1][0] == ulysses[0][0] // 2 // (8 * K) * (8 * K)
    # out of memory above 512K: the start fails, halves, and the table names the one that trained
    text, started = _simulate(bench, monkeypatch, 8, budget=900, oom_above=512 * K)
    row = next(line for line in text.splitlines() if line.startswith("| Ulysses"))
    assert "oom" in row and "none" not in row.split("|")[2]


def test_memory_plan_keeps_block_inputs_on_the_gpu_until_the_host_must_take_them():
    bench = _bench()
    args = bench.parse(["--gpus", "8", "--host-gib", "280"])
    keep, _ = bench.plan_keep(args, "ulysses", 1024 * K)  # 128K a rank: 32 x 1.15 GiB of block inputs, all kept
    assert keep == pytest.approx(32 * 1.15, abs=0.1)
    keep, why = bench.plan_keep(args, "ulysses", 4096 * K)  # 512K a rank: 128 GiB, ~45 kept, 83 > 280 / 8 host
    assert keep is None and "host memory" in why
    keep, _ = bench.plan_keep(bench.parse(["--gpus", "8", "--host-gib", "1200"]), "ulysses", 4096 * K)
    assert 30 < keep < 60  # what the GPU has room for beside the working set
    assert bench.plan_keep(args, "ring", 8 * 16 * K)[0] is None  # ring: 16K^2 scores x 32 heads do not fit
    assert bench.plan_keep(args, "ring", 8 * 8 * K)[0] is not None


@pytest.mark.slow
def test_cpu_run_of_the_benchmark_with_two_gloo_ranks(tmp_path):
    """The real thing on CPU: torchrun with 2 gloo ranks per try, train.py --cp 2 on tiny-llama
    (Ulysses and ring, --alst --fsdp) at length 256; the table lists both rows. (The doubling search
    over lengths: test_search_fits_the_budget_and_starts_from_the_predicted_record.)"""
    import json
    import subprocess

    out, logs = tmp_path / "sp.md", tmp_path / "sp.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sequence_parallel.py"), "--device", "cpu",
                           "--gpus", "2", "--start", "256", "--max-len", "256", "--budget-s", "500",
                           "--out", str(out), "--logs", str(logs)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    tries = [json.loads(line) for line in logs.read_text().splitlines()]
    assert [(t["mode"], t["seq_len"], t["status"]) for t in tries] == [("ulysses", 256, "ok"), ("ring", 256, "ok")]
    # the same tokens on both: one document, the same loss up to bf16 attention differences
    assert tries[0]["loss"] == pytest.approx(tries[1]["loss"], rel=1e-3)
    print(out.read_text())
    lines = out.read_text().splitlines()
    assert lines[0].startswith("| 2 CPU processes: settings")
    assert lines[2].startswith("| Ulysses") and "**256** (256)" in lines[2] and "256 ok" in lines[2]
    assert lines[3].startswith("| ring") and "**256** (256)" in lines[3]
