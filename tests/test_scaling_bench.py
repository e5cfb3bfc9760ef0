"""benchmarks/scaling.py on CPU: tiny-llama at world sizes 1 and 2 (gloo), FSDP2 and DDP rows against
the 1-process baseline on one global batch; the table has every row, efficiencies, and per-step losses
equal within the fp32 tolerance (1e-4; layouts differ only in the order of float sums). A row that
cannot run (--fp8 on CPU) and a failing run are single table lines, not a crash of the harness."""

import re
import subprocess
import sys

import pytest

from conftest import ROOT


def _lines(table: str, row: str) -> list[str]:
    return [line for line in table.splitlines() if line.startswith(f"| {row} |")]


@pytest.mark.slow
def test_scaling_harness_cpu(tmp_path):
    out = tmp_path / "scaling.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--model", "tiny-llama", "--device", "cpu",
           "--worlds", "1,2", "--seq-len", "64", "--global-batch", "4", "--steps", "3", "--warmup", "1",
           "--rows", "fsdp-full,ddp-full,fp8-fsdp",
           "--logs", str(tmp_path / "logs"), "--out", str(out), "--budget-s", "240"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = out.read_text()
    assert proc.stdout.rstrip().endswith(table.rstrip().splitlines()[-1])  # the table is printed last
    base = _lines(table, "single-full")
    assert len(base) == 1 and "(baseline)" in base[0]
    for row in ("fsdp-full", "ddp-full"):
        (line,) = _lines(table, row)
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == "2" and cells[2] == "2", line  # 2 ranks, grad accum 4 / 2: the same global batch
        assert float(cells[3].replace(",", "")) > 0, line  # tokens/s per GPU
        assert re.fullmatch(r"\d+\.\d%", cells[4]), line  # scaling efficiency
        assert float(cells[7]) <= 1e-4 and cells[8] == "yes", line  # max |loss diff| vs 1 process
    (fp8,) = _lines(table, "fp8-fsdp")
    assert "skipped: needs CUDA" in fp8


def test_failure_is_one_row(tmp_path):
    """A run that exits with an error becomes one table line with the error's last line."""
    out = tmp_path / "scaling.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--model", "tiny-llama", "--device", "cpu",
           "--worlds", "1", "--seq-len", "64", "--global-batch", "2", "--steps", "1", "--rows", "fsdp-full",
           "--extra=--lr -1", "--logs", str(tmp_path / "logs"), "--out", str(out), "--budget-s", "120"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (line,) = _lines(out.read_text(), "single-full")
    assert "exit" in line and "--lr must be positive" in line, line


def test_reuse_needs_a_finished_run(tmp_path):
    """--reuse takes a run's metrics only from a run that finished: a timed-out run leaves the steps it
    logged (a 2-GPU ZeRO-3 LoRA run killed at step 5 of 6 was reused as if whole), so it runs again."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import scaling

    out, slow = tmp_path / "logs" / "r-n1", tmp_path / "slow"
    script = ("import json, pathlib, sys, time; out = pathlib.Path(sys.argv[1]); "
              "out.mkdir(parents=True, exist_ok=True)\n"
              "lines = [json.dumps(dict(step=s, loss=1.0, tokens=100 * s, tokens_per_s=100.0)) for s in (1, 2)]\n"
              "(out / 'metrics.jsonl').write_text('\\n'.join(lines) + '\\n')\n"
              "time.sleep(60 if pathlib.Path(sys.argv[2]).exists() else 0)")
    run = scaling.Run("r-n1", "fsdp-full", 1, cmd=[sys.executable, "-c", script, str(out), str(slow)])
    args = scaling.parse(["--device", "cpu", "--logs", str(tmp_path / "logs"), "--warmup", "0"])
    (tmp_path / "logs").mkdir()
    slow.touch()
    assert "timeout" in scaling.execute(run, args, timeout=3)["error"]
    slow.unlink()
    again = scaling.execute(run, args, timeout=60)
    assert "error" not in again and not again.get("reused"), again  # ran again, not the killed run's steps
    assert scaling.execute(run, args, timeout=60)["reused"]  # a finished run with the same command is reused
