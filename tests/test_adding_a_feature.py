"""docs/adding-a-feature.md is true: its toy feature, added the way it says, runs and passes the checks.

The test copies the code into a temporary folder, writes the guide's `features/embed_scale.py`
verbatim, makes the guide's edits (the import and the config line, one `if` in build_model, one
matrix row), checks that train.py stays within tests/test_layout.py's cap and that ruff passes,
and trains with and without the flag.
"""

import json
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from test_layout import TRAIN_PY_MAX_LINES

GUIDE = ROOT / "docs" / "adding-a-feature.md"


def _guide() -> str:
    return GUIDE.read_text()


def _edit(path, anchor: str, new: str, before: bool = True) -> None:
    text = path.read_text()
    assert text.count(anchor) == 1, f"{path.name}: the anchor {anchor!r} is not there exactly once"
    path.write_text(text.replace(anchor, new + anchor if before else anchor + new))


def _add_toy_feature(repo) -> None:
    guide = _guide()
    code = re.search(r"```python\n# features/embed_scale.py\n(.*?)```", guide, re.S).group(1)
    (repo / "features" / "embed_scale.py").write_text(code)
    steps = re.findall(r"`([^`\n]+)`", guide)  # the guide's one-line edits, in its own words
    config_line = next(s for s in steps if s.startswith("embed_scale: "))
    if_line = next(s for s in steps if s.startswith("if cfg.embed_scale.embed_scale:"))
    matrix_row = next(s for s in steps if s.startswith('Feature("--embed-scale"'))
    train = repo / "train.py"
    text = train.read_text()  # the last name of `from features import (...)`, before its closing parenthesis
    imports = re.findall(r"^from features import \([^)]*\)", text, re.M)
    assert len(imports) == 1, "train.py: no single `from features import (...)` block"
    train.write_text(text.replace(imports[0], imports[0][:-1] + ", embed_scale)"))
    _edit(train, "    auto: tyro.conf.Suppress", f"    {config_line}\n")
    cond, call = if_line.split(": ", 1)
    _edit(train, "    if core.config.adapters_on(cfg.lora):\n", f"    {cond}:\n        {call}\n")
    _edit(repo / "core" / "compat.py", "FEATURES = [\n", f"    {matrix_row},\n", before=False)


def _train(repo, out, *flags) -> subprocess.CompletedProcess:
    args = [sys.executable, "train.py", "--max-steps", "3", "--log-every", "1", "--eval-exact-match", "0",
            "--skip-export", "--output-dir", str(out), *flags]
    return subprocess.run(args, cwd=repo, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_guide_toy_feature_runs(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".*", "runs", "benchmarks", "docs", "__pycache__",
                                                              "tests"))
    _add_toy_feature(repo)

    lines = len((repo / "train.py").read_text().splitlines())
    assert lines <= TRAIN_PY_MAX_LINES, f"train.py with the toy feature has {lines} lines (cap {TRAIN_PY_MAX_LINES})"
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "train.py", "features/embed_scale.py",
                           "core/compat.py"], cwd=repo, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr

    help_text = subprocess.run([sys.executable, "train.py", "--help"], cwd=repo, capture_output=True, text=True)
    assert "--embed-scale" in help_text.stdout and "--embed-scale-factor" in help_text.stdout, help_text.stderr

    plain, scaled = _train(repo, tmp_path / "plain"), _train(repo, tmp_path / "scaled", "--embed-scale",
                                                             "--embed-scale-factor", "3")
    assert plain.returncode == 0 and scaled.returncode == 0, scaled.stderr[-2000:]
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
               if "loss" in json.loads(line)] for run in ("plain", "scaled")]
    assert losses[0][0] != losses[1][0], "the flag did not change the model"

    refused = _train(repo, tmp_path / "bad", "--embed-scale", "--embed-scale-factor", "0")
    assert refused.returncode == 2 and "error: --embed-scale-factor must be positive" in refused.stderr

    show = "import train; from core import compat; print(compat.markdown(train.Config()))"  # docs/compatibility.py's
    table = subprocess.run([sys.executable, "-c", show], cwd=repo, capture_output=True, text=True)
    assert "--embed-scale" in table.stdout, table.stderr
