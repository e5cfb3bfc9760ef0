"""Summarize train.py run directories as one Markdown table (last logged step of each run).

    python benchmarks/e2e_table.py runs/a runs/b ...
"""

import json
import sys
from pathlib import Path


def row(run: Path) -> str:
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    last, first = steps[-1], steps[0]
    argv = " ".join(json.loads((run / "run.json").read_text())["argv"][1:])
    mfu = f"{100 * last['mfu']:.1f}%" if last.get("mfu") is not None else "-"
    return (f"| {run.name} | `{argv}` | {last['tokens_per_s']:,.0f} | {mfu} | {last['peak_mem_gib']:.1f} | "
            f"{first['loss']:.3f} -> {last['loss']:.3f} | {last['grad_norm']:.2f} |")


if __name__ == "__main__":
    print("| run | flags | tokens/s (last window) | MFU | peak GiB | loss first -> last | grad norm |")
    print("|---|---|---|---|---|---|---|")
    for path in sys.argv[1:]:
        try:
            print(row(Path(path)))
        except (OSError, ValueError, IndexError, KeyError) as e:
            print(f"| {Path(path).name} | failed: {type(e).__name__} | | | | | |")
