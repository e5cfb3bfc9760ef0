"""launch/ablate.py + launch/compare.py: a 2-config x 2-seed ablation runs end to end and yields a table
and plots whose numbers come from the runs; the SLURM array renders from slurm.sbatch and runs the right
flags per task; compare groups runs without ablate's tags and reads a W&B group."""

import json
import os
import re
import shlex
import statistics
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest

from conftest import ROOT, read_metrics

sys.path.insert(0, str(ROOT / "launch"))
import ablate  # noqa: E402
import compare  # noqa: E402

NUMBER = r"[\d,.]+%?"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def table_rows(results_md: str) -> dict[str, list[str]]:
    lines = [line for line in results_md.splitlines() if line.startswith("| ") and "---" not in line]
    head, *rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert head[:2] == ["config", "seeds"]
    return {row[0]: dict(zip(head, row)) for row in rows}


def parse_cell(cell: str) -> tuple[float, float | None]:
    """'4.5780 ± 0.0377' -> (4.578, 0.0377); '12.5%' -> (0.125, None)."""
    match = re.fullmatch(rf"({NUMBER})(?: ± ({NUMBER}))?", cell)
    assert match, cell
    num = [None if v is None else float(v.replace(",", "").rstrip("%")) / (100 if v.endswith("%") else 1)
           for v in match.groups()]
    return num[0], num[1]


@pytest.mark.slow
def test_two_configs_two_seeds_end_to_end(tmp_path, small_data, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two runs at a time (--jobs 2), one core each
    common = ["--dataset", str(small_data), "--max-steps", "4", "--micro-batch-size", "8", "--log-every", "2",
              "--eval-exact-match", "4", "--skip-export"]
    argv = ["lr", "--vary", "--lr 1e-3 | --lr 3e-3", "--seeds", "0", "1", "--out", str(tmp_path), "--jobs", "2",
            "--", *common]
    assert ablate.main(argv) == 0
    root = tmp_path / "lr"
    runs = {(c, s): root / c / f"seed{s}" for c in ("lr=1e-3", "lr=3e-3") for s in (0, 1)}
    for (config, seed), run_dir in runs.items():
        tag = json.loads((run_dir / "ablation.json").read_text())
        assert (tag["ablation"], tag["config"], tag["seed"], tag["exit_code"]) == ("lr", config, seed, 0)
        cfg = json.loads((run_dir / "config.json").read_text())
        assert cfg["optim"]["lr"] == float(config.split("=")[1]) and cfg["train"]["seed"] == seed
        assert cfg["tracking"]["run_name"] == f"lr/{config}/seed{seed}"
    # seeds differ, configs differ: the runs really were distinct
    finals = {k: read_metrics(d)[-1] for k, d in runs.items()}
    assert finals[("lr=1e-3", 0)]["loss"] != finals[("lr=1e-3", 1)]["loss"]
    assert finals[("lr=3e-3", 0)]["loss"] < finals[("lr=1e-3", 0)]["loss"]

    text = (root / "results.md").read_text()
    assert text.startswith("# Ablation: lr") and "launch/ablate.py lr --vary" in text and "- git: " in text
    rows = table_rows(text)
    assert set(rows) == {"lr=1e-3", "lr=3e-3"}
    for config, row in rows.items():
        assert row["seeds"] == "0, 1"
        losses = [finals[(config, s)]["loss"] for s in (0, 1)]
        mean, spread = parse_cell(row["train loss (last window)"])
        assert mean == pytest.approx(statistics.fmean(losses), abs=1e-4)
        assert spread == pytest.approx(statistics.stdev(losses), abs=1e-4)
        vals = [finals[(config, s)]["val_loss"] for s in (0, 1)]
        assert parse_cell(row["val loss (final)"])[0] == pytest.approx(statistics.fmean(vals), abs=1e-4)
        for column in ("val loss (best)", "exact match", "tokens/s", "peak mem (GiB)"):
            assert parse_cell(row[column])[0] >= 0
        assert parse_cell(row["tokens/s"])[0] > 0
    for name in ("loss.png", "throughput.png"):
        path = root / name
        assert png_size(path) == (700, 400) and path.stat().st_size > 10_000  # curves drawn, not a blank canvas

    # the same command again: nothing reruns, the table is rebuilt from the same runs
    before = {k: (d / "metrics.jsonl").stat().st_mtime_ns for k, d in runs.items()}
    assert ablate.main(argv) == 0
    assert before == {k: (d / "metrics.jsonl").stat().st_mtime_ns for k, d in runs.items()}


def test_grid_labels_and_planned_commands(tmp_path):
    assert ablate.label(["--lr", "1e-3", "--packing"]) == "lr=1e-3,packing"
    assert ablate.label([]) == "base"
    configs = ablate.grid([" | --packing", "--attn sdpa | --attn eager"])
    assert [c[0] for c in configs] == ["attn=sdpa", "attn=eager", "packing,attn=sdpa", "packing,attn=eager"]
    args = ablate.parse_args(["pk", "--vary", " | --packing", "--seeds", "3", "--out", str(tmp_path),
                              "--", "--max-steps", "5", "--wandb"])
    [base, packed] = ablate.plan(args)
    assert packed["train_args"] == ["--max-steps", "5", "--wandb", "--packing", "--seed", "3", "--output-dir",
                                    str(tmp_path / "pk/packing/seed3"), "--run-name", "pk/packing/seed3",
                                    "--wandb-group", "pk", "--wandb-tags", "pk", "packing"]
    assert base["config"] == "base" and "--packing" not in base["train_args"]
    with pytest.raises(SystemExit):
        ablate.grid(["--lr 1e-3 | --lr 1e-3"])  # two configs with one name


def test_slurm_array_renders_from_slurm_sbatch(tmp_path, monkeypatch):
    from test_launch import FAKES, calls

    monkeypatch.chdir(ROOT)
    argv = ["pk", "--vary", "--lr 1e-3 | --lr 3e-3", "--seeds", "0", "1", "--out", str(tmp_path), "--slurm",
            "--gpus-per-node", "2", "--parallel", "2", "--", "--max-steps", "50"]
    assert ablate.main(argv) == 0
    script = (tmp_path / "pk/array.sbatch").read_text()
    header = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert {"#SBATCH --array=0-3%2", "#SBATCH --job-name=ablate-pk", "#SBATCH --nodes=1",
            "#SBATCH --gpus-per-node=2", "#SBATCH --cpus-per-task=16", "#SBATCH --requeue"} <= set(header)
    assert "#SBATCH --exclusive" not in header  # 2 of a node's 8 GPUs: tasks share nodes
    assert len({line.split("=")[0] for line in header}) == len(header)  # no option twice
    runs = ablate.plan(ablate.parse_args(argv))
    assert all(json.loads((tmp_path / f"pk/{r['config']}/seed{r['seed']}/ablation.json").read_text())["config"]
               == r["config"] for r in runs)

    stale = tmp_path / "pk/lr=1e-3/seed1/metrics.jsonl"
    stale.write_text("{}\n")
    assert ablate.main(argv) == 0 and stale.exists()  # kept: a run dir is only ever resumed...
    assert ablate.main([*argv[:argv.index("--")], "--force", *argv[argv.index("--"):]]) == 0
    assert not stale.exists() and (stale.parent / "ablation.json").is_file()  # ...unless --force

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    for task in (1, 4):
        log = tmp_path / f"calls{task}.log"
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log), "FAKE_EXIT": "3",
               "SLURM_JOB_ID": "77", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": str(task),
               "SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "2",
               "SLURM_SUBMIT_DIR": str(ROOT), "TORCHRUN": str(bin_dir / "torchrun")}
        proc = subprocess.run(["bash", str(tmp_path / "pk/array.sbatch")], env=env, capture_output=True,
                              text=True, timeout=60)
        if task == 4:  # past the end of the array
            assert proc.returncode == 1 and "no run for array task 4" in proc.stderr
            continue
        assert proc.returncode == 3, proc.stderr  # the run's own exit code, recorded as a local run's is
        assert json.loads((Path(runs[task]["run_dir"]) / "ablation.json").read_text())["exit_code"] == 3
        [torchrun] = calls(log, "torchrun")
        assert torchrun[:10] == ["--nnodes", "1", "--nproc_per_node", "2", "--rdzv_id", "77", "--rdzv_backend",
                                 "c10d", "--rdzv_endpoint", f"gpu-node-07:{29500 + task}"]  # a port per task
        assert torchrun[10:] == [f"{ROOT}/train.py", "--resume", "auto", *runs[task]["train_args"]]
        assert shlex.join(runs[task]["train_args"]).endswith(
            f"--lr 1e-3 --seed 1 --output-dir {tmp_path}/pk/lr=1e-3/seed1 --run-name pk/lr=1e-3/seed1")


def _fake_run(run_dir, lr, seed, losses, tok_s, mem, exit_code=None, total_steps=None, ablation=None):
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"optim": {"lr": lr}, "train": {"seed": seed,
                                                     "output_dir": str(run_dir)}, "auto": [f"--x {seed} (auto)"]}))
    if exit_code is not None:  # tagged as launch/ablate.py tags its runs
        (run_dir / "ablation.json").write_text(json.dumps({"config": f"lr={lr}", "seed": seed, "exit_code": exit_code,
                                                           **({"ablation": ablation} if ablation else {})}))
    (run_dir / "run.json").write_text(json.dumps({"git_sha": "abc123", "device": "cpu", "world_size": 1,
                                                  "versions": {"torch": "2.x"},
                                                  "total_steps": total_steps or len(losses)}))
    rows = [{"step": 0, "val_loss": 9.0}] + [
        {"step": s + 1, "loss": loss, "tokens_per_s": tok, "peak_mem_gib": mem}
        for s, (loss, tok) in enumerate(zip(losses, tok_s))]
    rows[-1]["val_loss"] = losses[-1] + 0.5
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_compare_groups_untagged_runs_by_differing_flags(tmp_path):
    _fake_run(tmp_path / "a", 0.001, 0, [3.0, 2.0, 1.0], [999, 100, 300], 1.0)
    _fake_run(tmp_path / "b", 0.001, 1, [3.0, 2.0, 1.2], [999, 200, 400], 1.5)
    _fake_run(tmp_path / "c", 0.003, 0, [3.0, 1.0, 0.5], [999, 100, 100], 2.0)
    assert compare.main([str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    rows = table_rows((tmp_path / "report/results.md").read_text())
    assert set(rows) == {"lr=0.001", "lr=0.003"}
    a = rows["lr=0.001"]
    assert a["seeds"] == "0, 1"
    assert parse_cell(a["train loss (last window)"]) == pytest.approx((1.1, statistics.stdev([1.0, 1.2])), abs=1e-4)
    assert parse_cell(a["val loss (best)"]) == pytest.approx((1.6, statistics.stdev([1.5, 1.7])), abs=1e-4)
    assert parse_cell(a["tokens/s"])[0] == pytest.approx(250)  # windows after step 1: (200 + 300) / 2 per run
    assert parse_cell(a["peak mem (GiB)"]) == pytest.approx((1.25, statistics.stdev([1.0, 1.5])), abs=1e-2)
    assert rows["lr=0.003"]["train loss (last window)"] == "0.5000"  # one seed: no spread
    assert png_size(tmp_path / "report/loss.png") == (700, 400)
    (tmp_path / "d").mkdir()  # a run that failed before its first step: run.json, no metrics
    (tmp_path / "d" / "run.json").write_text(json.dumps({"total_steps": 3}))
    assert compare.main([str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    assert str(tmp_path / "d") in (tmp_path / "report/results.md").read_text()  # listed under the table


def test_compare_takes_the_manifests_grid_and_lists_failed_runs_apart(tmp_path):
    root = tmp_path / "abl"
    _fake_run(root / "lr=0.001" / "seed0", 0.001, 0, [3.0, 2.0, 1.0], [999, 100, 300], 1.0, exit_code=0)
    _fake_run(root / "lr=0.003" / "seed0", 0.003, 0, [3.0, 9.0, 9.0], [999, 100, 100], 2.0, exit_code=1)
    _fake_run(root / "lr=0.01" / "seed0", 0.01, 0, [3.0, 1.0, 0.5], [999, 100, 100], 2.0, exit_code=0)  # stale
    listed = [{"config": c, "seed": 0, "run_dir": str(root / c / "seed0")} for c in ("lr=0.001", "lr=0.003")]
    (root / "ablation.json").write_text(json.dumps({"name": "abl", "command": "python launch/ablate.py abl",
                                                    "runs": listed}))
    assert compare.main([str(root)]) == 0
    text = (root / "results.md").read_text()
    assert set(table_rows(text)) == {"lr=0.001"}  # not the failed run, not the earlier grid's
    assert f"- failed: lr=0.003 seed 0 (exit 1), see {root / 'lr=0.003' / 'seed0' / 'train.log'}" in text


def test_compare_leaves_out_stopped_and_unstarted_runs_and_names_mixed_settings(tmp_path):
    root = tmp_path / "abl"
    _fake_run(root / "lr=0.001" / "seed0", 0.001, 0, [3.0, 2.0, 1.0], [999, 100, 300], 1.0, exit_code=0)
    _fake_run(root / "lr=0.001" / "seed1", 0.001, 1, [3.0, 2.0], [999, 100], 1.0, exit_code=0, total_steps=3)
    (root / "lr=0.003" / "seed0").mkdir(parents=True)  # failed at start-up: a tag, no metrics
    (root / "lr=0.003" / "seed0" / "ablation.json").write_text(json.dumps({"config": "lr=0.003", "seed": 0,
                                                                           "exit_code": 2}))
    listed = [{"config": c, "seed": k, "run_dir": ""} for c, k in (("lr=0.001", 0), ("lr=0.001", 1), ("lr=0.003", 0))]
    (root / "ablation.json").write_text(json.dumps({"name": "abl", "runs": listed}))
    assert compare.main([str(root)]) == 0
    text = (root / "results.md").read_text()
    assert table_rows(text)["lr=0.001"]["seeds"] == "0"  # the stopped seed is not averaged in
    assert f"- stopped at step 2 of 3: lr=0.001 seed 1 (rerun to resume it), {root / 'lr=0.001' / 'seed1'}" in text
    assert "- failed: lr=0.003 seed 0 (exit 2)" in text
    assert not ablate.finished({"run_dir": str(root / "lr=0.001" / "seed1")})  # exit 0, yet not finished
    assert ablate.finished({"run_dir": str(root / "lr=0.001" / "seed0")})

    mixed = tmp_path / "mixed"  # two ablations with one config name; and a config whose runs differ
    _fake_run(mixed / "a", 0.001, 0, [3.0, 1.0], [999, 100], 1.0, exit_code=0, ablation="short")
    _fake_run(mixed / "b", 0.001, 0, [3.0, 2.0, 0.5], [999, 100, 100], 1.0, exit_code=0, ablation="long")
    _fake_run(mixed / "c", 0.001, 1, [3.0, 2.0, 0.6], [999, 100, 100], 1.0, exit_code=0, ablation="long")
    config = json.loads((mixed / "c" / "config.json").read_text())
    (mixed / "c" / "config.json").write_text(json.dumps({**config, "optim": {"lr": 0.001, "warmup_steps": 9}}))
    assert compare.main([str(mixed)]) == 0
    text = (mixed / "results.md").read_text()
    assert set(table_rows(text)) == {"short/lr=0.001", "long/lr=0.001"}
    assert "- long/lr=0.001: its runs differ in more than the seed (optim.warmup_steps)" in text


def test_cells_say_how_many_seeds_have_a_value():
    assert compare._cell([1.0, None], "{:.1f}") == "1.0 (n=1)"
    assert compare._cell([1.0, 3.0, None], "{:.1f}") == "2.0 ± 1.4 (n=2)"
    assert compare._cell([1.0, 3.0], "{:.1f}") == "2.0 ± 1.4"


def test_ablate_refuses_reused_run_dirs_of_other_flags_and_flags_it_sets(tmp_path, capsys):
    argv = ["lr", "--vary", "--lr 1e-3", "--out", str(tmp_path), "--", "--max-steps", "20"]
    [run] = ablate.plan(ablate.parse_args(argv))
    ablate.tag_run(run, exit_code=0)  # as a finished run of this command is tagged
    changed = ["lr", "--vary", "--lr 1e-3", "--out", str(tmp_path), "--", "--max-steps", "40"]
    assert ablate.main(changed) == 2
    assert "ran with other flags than this command gives it; --force reruns" in capsys.readouterr().err
    assert ablate.ran_otherwise(ablate.plan(ablate.parse_args(argv))) == []
    ablate.tag_run(run, exit_code=2)  # a run that failed (a bad flag, say) runs again with the fixed flags
    assert ablate.ran_otherwise(ablate.plan(ablate.parse_args(changed))) == []
    for flag in ("--seed", "--output-dir", "--run-name", "--wandb-group"):
        with pytest.raises(SystemExit):
            ablate.parse_args(["x", "--vary", "--lr 1e-3", "--", flag, "5"])
    args = ablate.parse_args(["x", "--vary", "--lr 1e-3", "--", "--wandb", "--wandb-tags", "mine", "too"])
    assert ablate.plan(args)[0]["train_args"][-5:] == ["--wandb-tags", "mine", "too", "x", "lr=1e-3"]


def test_ablate_refuses_a_stopped_run_of_other_flags_and_keeps_a_run_killed_after_its_final_model(tmp_path):
    argv = ["lr", "--vary", "--lr 1e-3", "--out", str(tmp_path), "--", "--max-steps", "20"]
    [run] = ablate.plan(ablate.parse_args(argv))
    ablate.tag_run(run)  # ablate.py itself was stopped: no exit code recorded, a checkpoint saved
    step = Path(run["run_dir"]) / "checkpoints" / "step_10"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text("{}")
    changed = ablate.plan(ablate.parse_args([*argv[:-1], "40"]))
    assert ablate.ran_otherwise(changed) == changed  # --resume auto would continue it under other flags
    assert ablate.ran_otherwise(ablate.plan(ablate.parse_args(argv))) == []  # the same command continues it
    (Path(run["run_dir"]) / "run.json").write_text(json.dumps({"total_steps": 20}))
    (Path(run["run_dir"]) / "metrics.jsonl").write_text(json.dumps({"step": 20, "loss": 1.0}) + "\n")
    ablate.tag_run(run, exit_code=-9)  # killed after saving final/ (written whole or not at all)
    assert not ablate.finished(run)
    (Path(run["run_dir"]) / "final").mkdir()
    assert ablate.finished(run)  # not rerun into --resume auto's refusal of a finished run


def test_ablate_refuses_a_config_whose_flags_train_py_would_refuse_before_any_run(tmp_path, capsys):
    argv = ["bog", "--vary", "--lr 1e-3 | --bogus 1", "--out", str(tmp_path), "--", "--max-steps", "2"]
    assert ablate.main(argv) == 2
    err = capsys.readouterr().err
    assert "Unrecognized options: --bogus, 1" in err and "run train.py --help" in err
    assert "error: config bogus=1: train.py refuses its flags (above)" in err
    assert not (tmp_path / "bog").exists()  # nothing ran, nothing written


@pytest.mark.parametrize("argv, message", [
    (["--submit", "--nodes", "4"], "--submit, --nodes go with --slurm"),
    (["--vary", "--lr 'oops | --lr 2"], "No closing quotation; close each quote within its alternative"),
    (["--", "--force"], "--force is ablate.py's own option: put it before `--`"),
    (["--vary", "--lr 2e-3 | --packing"], "--lr varies on two --vary axes ('--lr 1e-3' and '--lr 2e-3 | --packing')"),
])
def test_ablate_refuses_options_that_would_not_do_what_they_say(argv, message, capsys):
    with pytest.raises(SystemExit):
        ablate.parse_args(["x", "--vary", "--lr 1e-3", *argv])
    assert message in capsys.readouterr().err


def test_sigterm_to_ablate_stops_its_runs_which_save_and_continue(tmp_path):
    """ablate.py stopped by SIGTERM passes it to the run it started, records how it ended and exits; the
    same command then continues the run from its checkpoint to the end."""
    import signal
    import time

    argv = [sys.executable, str(ROOT / "launch/ablate.py"), "t", "--vary", "--lr 1e-3", "--out", str(tmp_path),
            "--", "--max-steps", "3000", "--log-every", "10", "--val-dataset", "none", "--skip-export"]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "t/lr=1e-3/seed0/train.log"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and "step 10/" in log.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    assert re.search(r"\[1/1\] lr=1e-3 seed 0: stopped at step \d+ of 3000 \(the same command continues it\)", out)
    tag = json.loads((log.parent / "ablation.json").read_text())
    assert tag["exit_code"] == 0 and list((log.parent / "checkpoints").glob("step_*"))
    assert not [line for line in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
                .splitlines() if str(log.parent) in line]  # no train.py left running on its own


def test_compare_reads_a_wandb_group(tmp_path, monkeypatch):
    history = [{"_step": 0, "eval/val_loss": 5.0}, {"_step": 1, "train/loss": 4.0, "perf/tokens_per_s": 10.0},
               {"_step": 2, "train/loss": 3.0, "perf/tokens_per_s": 30.0, "mem/peak_gib": 2.0, "eval/val_loss": 2.5}]
    fake_run = types.SimpleNamespace(url="https://wandb.ai/e/p/runs/x", scan_history=lambda: history,
                                     config={"optim": {"lr": 0.001}, "train": {"seed": 0}, "run": {"device": "H100"}})
    seen = {}

    class Api:
        def runs(self, path, filters):
            seen.update(path=path, filters=filters)
            return [fake_run]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Api=Api))
    assert compare.main(["--wandb-group", "e/p/lr", "--out", str(tmp_path)]) == 0
    assert seen == {"path": "e/p", "filters": {"group": "lr"}}
    text = (tmp_path / "results.md").read_text()
    row = table_rows(text)["all runs"]
    assert (row["train loss (last window)"], row["val loss (best)"], row["tokens/s"]) == ("3.0000", "2.5000", "30")
    assert "device: H100" in text


def test_dry_run_prints_commands_that_run_from_the_callers_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert ablate.main(["lr", "--vary", "--lr 1e-3 | --lr 3e-3", "--seeds", "0", "--dry-run"]) == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert len(commands) == 2 and all((tmp_path / c[1]).resolve() == ROOT / "train.py" for c in commands)


def test_best_validation_loss_is_of_a_trained_model():
    """The evaluation before training (step 0) is no candidate: a run that only got worse has no better 'best'."""
    metrics = [{"step": 0, "val_loss": 1.0}, {"step": 5, "loss": 2.5, "tokens_per_s": 10.0},
               {"step": 5, "val_loss": 2.0}, {"step": 10, "val_loss": 3.0}]
    assert compare.summarize(metrics)["best_val_loss"] == 2.0
