"""benchmarks/bf16_weights.py on CPU with the demo preset: three runs of one full fine-tune (fp32 weights,
bf16 weights with AdamW, with adamw-sr) give a table with every logged step of each and each tail's
mean against the fp32 run."""

import re
import subprocess
import sys

from conftest import ROOT


def test_bf16_weights_harness_cpu(tmp_path):
    out = tmp_path / "bf16-weights.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bf16_weights.py"), "--model", "tiny-llama", "--steps", "20",
           "--seq-len", "64", "--logs", str(tmp_path / "logs"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = out.read_text()
    assert table.splitlines()[0] == "| step | fp32 weights (fp32) | bf16 weights, AdamW | bf16 weights, adamw-sr |"
    assert [line.split(" | ")[0] for line in table.splitlines() if re.match(r"\| \d", line)] == \
        ["| 1", "| 10", "| 20"]
    means = re.findall(r"^mean over steps after 15, (.+): [\d.]+ \(([+-][\d.]+)% against", table, re.M)
    assert [name for name, _ in means] == ["fp32 weights (fp32)", "bf16 weights, AdamW", "bf16 weights, adamw-sr"]
    assert means[0][1] == "+0.00"
