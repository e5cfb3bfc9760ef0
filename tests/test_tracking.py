"""--wandb: an offline W&B run holds the same metrics as metrics.jsonl under grouped keys, plus the config."""

import json
import struct
import sys
import time

import pytest

from conftest import read_metrics, run_train

wandb = pytest.importorskip("wandb")  # in requirements-dev.txt: CI has it
from wandb.proto import wandb_internal_pb2  # noqa: E402


def wandb_records(path):
    """The records of an offline run's .wandb file (a LevelDB-style log of 32 KiB blocks of protobufs).

    wandb 0.31 no longer ships a reader; the format: a 7-byte ':W&B' header, then chunks with a
    7-byte (crc32, length, type) header; type 1 = a whole record, 2/3/4 = its first/middle/last part."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block padding
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def finished_records(path, timeout=60.0):
    """The records once the run's exit record is on disk (W&B's service process writes the file
    asynchronously: `run.finish()` can return before the last records are flushed)."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def _items(update):
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in update}


def test_wandb_offline_run_has_grouped_metrics_config_and_code(tmp_path, small_data, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)  # its files under the run directory
    out = tmp_path / "run"
    assert run_train(out, "--dataset", str(small_data), "--max-steps", "4", "--micro-batch-size", "8",
                     "--log-every", "2", "--skip-export", "--wandb", "--run-name", "lr-test",
                     "--wandb-group", "abl", "--wandb-tags", "t1", "t2") == 0
    [wandb_file] = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = finished_records(wandb_file)
    assert any(r.WhichOneof("record_type") == "exit" for r in records)  # the run was finished, not left open
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.display_name, run.run_group, list(run.tags)) == ("lr-test", "abl", ["t1", "t2"])
    assert run.run_id == (out / "wandb_id.txt").read_text().strip()
    config = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind in ("run", "config"):
            config.update(_items((r.run.config if kind == "run" else r.config).update))
    run_json = json.loads((out / "run.json").read_text())
    assert config["train"]["max_steps"] == 4 and config["tracking"]["wandb"] is True
    assert config["run"]["git_sha"] == run_json["git_sha"] and config["run"]["argv"] == run_json["argv"]

    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = _items(r.history.item)
            history[row["_step"]] = row
    metrics = read_metrics(out)
    assert sorted(history) == [m["step"] for m in metrics] == [0, 1, 2, 4]
    expected = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                "tokens_per_s": "perf/tokens_per_s", "tokens": "perf/tokens", "peak_mem_gib": "mem/peak_gib",
                "val_loss": "eval/val_loss", "eta_s": "perf/eta_s"}
    for m in metrics:
        row = history[m["step"]]
        for key, wandb_key in expected.items():
            if m.get(key) is not None:
                assert row[wandb_key] == pytest.approx(m[key]), (m["step"], key)
    assert {"train/loss", "perf/tokens_per_s", "mem/peak_gib"} <= set(history[4])
    assert "perf/mfu" not in history[4]  # None on a CPU: not logged
    assert "eval/val_loss" in history[0] and "train/loss" not in history[0]
    code = [r for r in records if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "code"]
    assert code and {"train.py", "core/tracking.py"} <= {f.path for f in code[0].artifact.manifest.contents}


def test_resumed_run_keeps_its_wandb_id(tmp_path, monkeypatch):
    from core.tracking import _run_id

    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    first = _run_id(tmp_path)
    assert first == _run_id(tmp_path) and len(first) == 8
    monkeypatch.setenv("WANDB_RUN_ID", "sweeprun")  # a sweep agent's id wins for a new run dir
    (tmp_path / "new").mkdir()
    assert _run_id(tmp_path / "new") == "sweeprun" and _run_id(tmp_path) == first


def test_wandb_flags_are_checked(monkeypatch):
    import train
    from core import UserError

    with pytest.raises(UserError, match=r"^--wandb-project / .* do nothing without --wandb; add --wandb, or drop"):
        train.parse_config(["--wandb-tags", "a"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(UserError, match="pip install wandb"):
        train.parse_config(["--wandb"])


def test_metric_keys_are_grouped():
    from core.tracking import wandb_key

    assert [wandb_key(k) for k in ("loss", "mfu", "peak_mem_gib", "exact_match", "skipped_steps", "eval/x")] == \
        ["train/loss", "perf/mfu", "mem/peak_gib", "eval/exact_match", "train/skipped_steps", "eval/x"]


def test_the_code_artifact_takes_source_files_and_skips_links_out_of_the_repository(tmp_path, monkeypatch):
    """A run directory inside the repository (runs/, the default) holds W&B's own link to a log file outside
    it; walking the repository must not follow it out (it raised, and --wandb crashed)."""
    from core import tracking

    repo, elsewhere = tmp_path / "repo", tmp_path / "elsewhere.log"
    (repo / "core").mkdir(parents=True)
    (repo / "core" / "x.py").write_text("")
    (repo / "runs" / "r" / "wandb").mkdir(parents=True)
    elsewhere.write_text("")
    (repo / "runs" / "r" / "wandb" / "debug-core.log").symlink_to(elsewhere)
    monkeypatch.setattr(tracking, "_REPO", repo)
    assert tracking._source_file(str(repo / "core" / "x.py"))
    assert not tracking._source_file(str(repo / "runs" / "r" / "wandb" / "debug-core.log"))
    assert not tracking._source_file(str(tmp_path / "elsewhere.log"))


@pytest.mark.parametrize("sweep", [False, True])
def test_a_sweep_agent_names_the_run_and_the_output_is_quiet(tmp_path, monkeypatch, sweep, capsys):
    import types

    import wandb

    import train
    from core import tracking

    seen = {}

    def init(**kwargs):
        seen.update(kwargs)
        return types.SimpleNamespace(log_code=lambda *a, **k: None, dir=str(tmp_path / "files"),
                                     url="https://wandb.ai/me/nanotune/runs/agentrun", offline=False)

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setenv("WANDB_RUN_ID", "agentrun")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-files"))  # W&B's own variable places its files
    if sweep:
        monkeypatch.setenv("WANDB_SWEEP_ID", "sw1")
    else:
        monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    log = types.SimpleNamespace(enabled=True, add_sink=lambda sink: None)
    tracking.apply_tracking(log, train.parse_config(["--wandb"]), tmp_path)
    assert seen["id"] == (None if sweep else "agentrun") and seen["settings"].silent  # W&B's lines: ours instead
    assert "wandb: https://wandb.ai/me/nanotune/runs/agentrun\n" in capsys.readouterr().out
    assert seen["dir"] == str(tmp_path / "wandb-files")
    assert (tmp_path / "wandb_id.txt").read_text() == "agentrun"  # kept for a resumed run either way
