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
    return [l for l in table.splitlines() if l.startswith(f"| {row} |")]


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
