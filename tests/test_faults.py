"""Faults: preemption signals, SIGKILL mid-save, corrupt checkpoints, disk full, non-finite steps, OOM.

The kills run train.py in a real subprocess (tests/fault_hooks.py); the rest run in-process.
"""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, read_metrics, run_train
from core import compat, faults
from core.checkpoint import MANIFEST, checkpoints, resolve_resume, verify
from core.distributed import Dist

ARGS = ["--micro-batch-size", "4", "--log-every", "1", "--seed", "5", "--warmup-steps", "2"]


def _popen(out, *args, hook=()):
    cmd = [sys.executable, "tests/fault_hooks.py", *hook, "--", "--output-dir", str(out), "--eval-exact-match", "0",
           *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, proc, timeout=240):
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"train.py exited ({proc.returncode}) before the fault was injected:\n{proc.communicate()}")
        assert time.time() < deadline, "timed out waiting for the subprocess"
        time.sleep(0.05)


def _logged_steps(run_dir) -> list[int]:
    try:
        return [json.loads(line).get("step", 0) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    except (FileNotFoundError, ValueError):  # not written yet, or a line half written
        return []


def _by_step(run_dir) -> dict:
    return {m["step"]: m for m in read_metrics(run_dir) if "loss" in m}


# ---- preemption


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])  # SIGINT: Ctrl-C
def test_a_stop_signal_finishes_the_step_saves_exits_0_and_resume_matches(tmp_path, small_data, stop):
    full, cut = tmp_path / "full", tmp_path / "cut"
    common = ["--dataset", str(small_data), "--max-steps", "8", "--val-dataset", "none", *ARGS]
    assert run_train(full, *common) == 0
    proc = _popen(cut, *common, hook=["--step-sleep", "0.25"])
    _wait_for(lambda: max(_logged_steps(cut), default=0) >= 2, proc)
    proc.send_signal(stop)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr
    assert re.search(rf"{stop.name} received: stopped after a complete step and saved .*step_\d+; resume with the "
                     r"same flags plus --resume auto", stdout), stdout
    assert "Traceback" not in stderr, stderr
    [(stopped, path)] = checkpoints(cut)
    assert 2 <= stopped < 8 and verify(path) is None and not (cut / "final").exists()

    assert run_train(cut, *common, "--resume", "auto") == 0
    a, b = _by_step(full), _by_step(cut)
    assert sorted(b) == list(range(1, 9))  # steps up to the stop, then the resumed ones
    for step in range(stopped + 1, 9):  # bit-exact on CPU: the same data position, RNG and optimizer state
        assert (b[step]["loss"], b[step]["lr"], b[step]["grad_norm"]) == \
               (a[step]["loss"], a[step]["lr"], a[step]["grad_norm"]), step
    from safetensors.torch import load_file

    fa, fb = load_file(full / "final" / "model.safetensors"), load_file(cut / "final" / "model.safetensors")
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


def test_sigusr1_sets_the_stop_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGUSR1)
    guard = faults.StepGuard(faults.FaultsConfig(), Dist())
    assert not guard.update_ok(torch.tensor(float("nan")), torch.tensor(1.0), 1) and not guard.stop
    os.kill(os.getpid(), signal.SIGUSR1)
    assert guard.update_ok(torch.tensor(1.0), torch.tensor(2.0), 2)  # the step in flight is still applied
    assert guard.stop and guard.signal == "SIGUSR1"
    given = guard.stop_message(Path("runs/a/checkpoints/step_00000002"), output_dir_given=True)
    assert "SIGUSR1 received" in given and given.endswith("resume with the same flags plus --resume auto")
    chosen = guard.stop_message(Path("runs/20261205-001029/checkpoints/step_00000002"), output_dir_given=False)
    assert chosen.endswith("plus --output-dir runs/20261205-001029 --resume auto")  # the directory the run chose
    guard.close()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_a_second_ctrl_c_stops_at_once_in_one_line(capsys):
    import train

    guard = faults.StepGuard(faults.FaultsConfig(), Dist())
    os.kill(os.getpid(), signal.SIGINT)  # the first: finish the step, then save
    assert guard.update_ok(torch.tensor(1.0), torch.tensor(2.0), 1) and guard.stop and guard.signal == "SIGINT"
    assert "press Ctrl-C again to stop at once" in capsys.readouterr().err

    def interrupted_twice(cfg):
        os.kill(os.getpid(), signal.SIGINT)
        pytest.fail("the second Ctrl-C did not stop the run")

    try:
        assert faults.run(lambda: train.parse_config([]), interrupted_twice) == 130
    finally:
        guard.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["stopped at once by Ctrl-C: nothing saved since the last checkpoint"], err


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_bug_is_recorded_for_torchrun_and_a_vanished_peer_said_once_and_not(tmp_path, capsys, monkeypatch, rank):
    """A bug keeps its traceback and hands torchrun its last line; a rank whose collective broke because
    another exited says so from rank 0 only and records nothing, so torchrun's root cause stays the rank
    that failed first (its own record is the earlier)."""
    import train

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv("RANK", rank)

    def buggy(cfg):
        raise KeyError("the missing key")

    with pytest.raises(KeyError):
        faults.run(lambda: train.parse_config([]), buggy)
    assert json.loads(error_file.read_text())["message"]["message"] == "KeyError: 'the missing key'"
    error_file.unlink()
    capsys.readouterr()

    def peer_gone(cfg):
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500")

    assert faults.run(lambda: train.parse_config([]), peer_gone) == 1
    said = capsys.readouterr().err.strip().splitlines()
    assert said == (["error: rank 0 stopped: another rank exited first (its error says why)"] if rank == "0" else [])
    assert not error_file.exists()


def test_a_stop_signal_during_start_up_stops_the_first_step_instead_of_killing_the_run():
    """SIGUSR1 while the model loads (before the step loop's handlers): kept, and the first step stops."""
    import train

    guards = []

    def starting(cfg):
        os.kill(os.getpid(), signal.SIGUSR1)  # default action: terminate the process
        guard = faults.StepGuard(faults.FaultsConfig(), Dist())
        guards.append((guard.update_ok(torch.tensor(1.0), torch.tensor(2.0), 1), guard.stop, guard.signal))
        guard.close()

    before = signal.getsignal(signal.SIGUSR1)
    assert faults.run(lambda: train.parse_config([]), starting) == 0
    assert guards == [(True, True, "SIGUSR1")] and signal.getsignal(signal.SIGUSR1) == before


def test_stop_and_skip_are_agreed_over_ranks(tmp_path):
    """Only rank 1 gets the signal and only rank 0 sees a NaN loss: both ranks skip step 1 and stop after step 2."""
    import torch.multiprocessing as mp

    import fault_hooks

    mp.spawn(fault_hooks.guard_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["ok"] == [False, True] and got["skipped"] == 1 and got["stop"], (rank, got)
        assert got["signal"] == ("SIGUSR1" if rank == 1 else None)  # rank 0 stops on rank 1's signal


# ---- checkpoints: SIGKILL mid-save, corruption, disk full


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path, small_data):
    out, marker = tmp_path / "run", tmp_path / "saving"
    common = ["--dataset", str(small_data), "--max-steps", "6", "--save-every", "2", "--val-dataset", "none", *ARGS]
    proc = _popen(out, *common, hook=["--slow-save-at", "4", "--marker", str(marker)])
    _wait_for(marker.exists, proc)
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert (out / "checkpoints" / ".tmp-step_00000004").is_dir()  # the half-written save is there ...
    assert [s for s, _ in checkpoints(out)] == [2]  # ... but only the previous one counts
    assert resolve_resume("auto", out).name == "step_00000002" and verify(out / "checkpoints" / "step_00000002") is None
    assert run_train(out, *common, "--resume", "auto") == 0  # it loads, and the run completes
    assert sorted(_by_step(out)) == list(range(1, 7))
    assert [s for s, _ in checkpoints(out)] == [4, 6] and not list((out / "checkpoints").glob(".tmp-*"))


def _flip_byte(f):
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


CORRUPTIONS = {  # name -> (damage the step-4 checkpoint, the reason the warning gives)
    "bit flip in the weights": (lambda c: _flip_byte(next(c.glob("*.distcp"))), "fails its SHA-256 checksum"),
    "truncated weights": (lambda c: os.truncate(next(c.glob("*.distcp")), 100), "is truncated"),
    "missing file": (lambda c: (c / "rng_rank0.pt").unlink(), "rng_rank0.pt is missing"),
    "missing manifest": (lambda c: (c / MANIFEST).unlink(), "no manifest.json"),
    "garbled manifest": (lambda c: (c / MANIFEST).write_text('{"files": '), "manifest.json is damaged"),
    "garbled trainer state": (lambda c: (c / "trainer_state.json").write_text("{}"), "trainer_state.json is truncated"),
}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (built once, copied per test)."""
    root = tmp_path_factory.mktemp("ckpts")
    lines = (ROOT / "data" / "train.jsonl").read_text().splitlines()[:96]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    args = ["--dataset", str(root / "train.jsonl"), "--max-steps", "4", "--save-every", "2", "--keep-checkpoints", "0",
            "--val-dataset", "none", *ARGS]
    assert run_train(root / "run", *args) == 0
    return root / "run", args


@pytest.mark.parametrize("damage", list(CORRUPTIONS))
def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(tmp_path, two_checkpoints, capsys, damage):
    src, _ = two_checkpoints
    out = tmp_path / "run"
    shutil.copytree(src, out)
    corrupt, reason = CORRUPTIONS[damage]
    corrupt(out / "checkpoints" / "step_00000004")
    assert resolve_resume("auto", out).name == "step_00000002"
    err = capsys.readouterr().err
    assert re.search(r"warning: skipping checkpoint .*step_00000004: .*" + re.escape(reason), err), err


def test_resume_auto_continues_from_the_last_valid_checkpoint(tmp_path, two_checkpoints, capsys):
    src, args = two_checkpoints
    out = tmp_path / "run"
    shutil.copytree(src, out)
    _flip_byte(next((out / "checkpoints" / "step_00000004").glob("*.distcp")))
    assert run_train(out, *args, "--resume", "auto") == 0
    captured = capsys.readouterr()
    assert "skipping checkpoint" in captured.err and "resumed from" in captured.out and "step_00000002" in captured.out
    a, b = _by_step(src), _by_step(out)
    assert [b[s]["loss"] for s in (3, 4)] == [a[s]["loss"] for s in (3, 4)]  # steps 3-4 redone identically


def test_explicit_resume_of_a_corrupt_checkpoint_is_refused(tmp_path, two_checkpoints, capsys):
    src, args = two_checkpoints
    out = tmp_path / "run"
    shutil.copytree(src, out)
    ckpt = out / "checkpoints" / "step_00000004"
    os.truncate(next(ckpt.glob("*.distcp")), 10)
    assert run_train(out, *args, "--resume", str(ckpt)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is truncated" in err[0] and "pass an older checkpoint" in err[0], err


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["torch.save", "os.fsync", "write_manifest"])
def test_disk_full_during_save_fails_clearly_and_keeps_the_last_good_checkpoint(
        tmp_path, small_data, capsys, monkeypatch, where):
    """The step-2 save succeeds; during the step-4 save the disk is full: at the RNG / DCP tensor file
    (torch.save), at DCP's fsync of the weights (raised as DCP's CheckpointException), or at the manifest."""
    import core.checkpoint as ckpt

    target = {"torch.save": torch, "os.fsync": os, "write_manifest": ckpt}[where]
    real_save = ckpt._save

    def save(root, step, *args, **kwargs):
        if step == 4:
            monkeypatch.setattr(target, where.split(".")[-1], _enospc)
        return real_save(root, step, *args, **kwargs)

    monkeypatch.setattr(ckpt, "_save", save)
    out = tmp_path / "run"
    args = ["--dataset", str(small_data), "--max-steps", "4", "--save-every", "2", "--val-dataset", "none", *ARGS]
    assert run_train(out, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert re.search(r"error: saving checkpoint step_00000004 in .* failed: No space left on device; the last good "
                     r"checkpoint .*step_00000002 is kept\. Free disk space", err[0]), err[0]
    assert [s for s, _ in checkpoints(out)] == [2] and verify(out / "checkpoints" / "step_00000002") is None
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the partial save is removed


# ---- numerics


def test_repeated_non_finite_steps_stop_the_run(tmp_path, small_data, capsys):
    out = tmp_path / "run"  # lr 1e30: the first update sends the weights to ~1e30, every later loss is inf/nan
    rc = run_train(out, "--dataset", str(small_data), "--max-steps", "20", "--lr", "1e30", "--val-dataset", "none",
                   "--max-bad-steps", "4", *ARGS)
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"steps \d+-\d+: 4 steps in a row had a non-finite loss or gradient norm "
                                       r"\(--max-bad-steps 4\); their updates were skipped\. Lower --lr", err[0]), err
    m = _by_step(out)
    skipped = [s for s in m if m[s]["skipped_steps"] > 0]
    assert [m[s]["skipped_steps"] for s in skipped] == [1, 2, 3] and len(m) == skipped[-1]  # step 4 stopped the run
    assert all(m[s]["loss"] != m[s]["loss"] for s in skipped)  # nothing trained in these windows: loss NaN


def test_one_non_finite_step_is_skipped_and_training_goes_on(tmp_path, small_data, monkeypatch):
    import core.loss

    args = ["--dataset", str(small_data), "--max-steps", "6", "--val-dataset", "none", *ARGS]
    assert run_train(tmp_path / "clean", *args) == 0
    real, calls = core.loss.forward_loss_sum, {"n": 0}

    def nan_on_third_step(model, batch, **kw):
        loss = real(model, batch, **kw)
        calls["n"] += torch.is_grad_enabled()
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(core.loss, "forward_loss_sum", nan_on_third_step)
    assert run_train(tmp_path / "nan", *args) == 0
    clean, nan = _by_step(tmp_path / "clean"), _by_step(tmp_path / "nan")
    assert [nan[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert nan[1]["loss"] == clean[1]["loss"] and nan[2]["loss"] == clean[2]["loss"]
    assert nan[3]["loss"] != nan[3]["loss"]  # the skipped step's window: no trained tokens
    # no optimizer or schedule step at step 3: step 4 runs with the lr step 3 had in the clean run
    assert [nan[s]["lr"] for s in (4, 5, 6)] == [clean[s]["lr"] for s in (3, 4, 5)]
    assert all(nan[s]["loss"] == nan[s]["loss"] for s in (4, 5, 6))
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "nan" / "final" / "model.safetensors").values())


def test_max_bad_steps_must_be_positive(tmp_path, capsys):
    assert run_train(tmp_path / "r", "--max-bad-steps", "0") == 2
    assert "--max-bad-steps must be at least 1" in capsys.readouterr().err


# ---- out of memory


@pytest.mark.parametrize("extra, advised, not_advised", [
    ([], ["lower --micro-batch-size", "--ac full", "--loss chunked"], []),
    (["--ac", "full", "--loss", "chunked"], ["lower --micro-batch-size"], ["--ac full", "--loss chunked"]),
])
def test_out_of_memory_is_one_message_with_sizes_and_memory_flags(tmp_path, small_data, capsys, monkeypatch,
                                                                  extra, advised, not_advised):
    import features.chunked_loss
    import core.loss
    import train

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity "
                                     "of 79.19 GiB of which 1.06 GiB is free.")

    monkeypatch.setattr(core.loss, "forward_loss_sum", oom)
    monkeypatch.setattr(train.chunked_loss, "forward_chunked_loss_sum", oom)
    assert features.chunked_loss  # (train imports the chunked loss by name; both are patched above)
    assert run_train(tmp_path / "r", "--dataset", str(small_data), "--max-steps", "2", *ARGS, *extra) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: out of memory (tried to allocate 2.50 GiB"), err
    assert "--micro-batch-size 4" in err[0] and "--seq-len 512" in err[0]
    assert all(a in err[0] for a in advised) and not any(a in err[0] for a in not_advised), err[0]


@pytest.mark.parametrize("argv, advised, not_advised", [
    ([], ["--ac full", "--loss chunked"], ["--lora-kernels", "--qlora", "--offload-embeddings"]),  # full fine-tune
    (["--lora"], ["--lora-kernels", "--qlora in place of --lora", "--offload-embeddings"], []),
    (["--lora", "--dora"], ["--qlora in place of --lora"], ["--lora-kernels"]),  # the kernels refuse DoRA
    (["--lora-8bit"], ["--offload-embeddings"], ["--qlora", "--lora-kernels"]),
    (["--qlora", "--lora-kernels"], ["--ac full"], ["--qlora", "--lora-kernels"]),
])
def test_memory_advice_offers_only_flags_the_matrix_accepts_with_the_run(argv, advised, not_advised):
    import train

    cfg = train.parse_config(argv)
    assert all(compat.field_value(cfg, path)[1] for path, *_ in faults._MEMORY_FLAGS)
    advice = " ".join(faults.memory_advice(cfg))
    assert all(a in advice for a in advised) and not any(a in advice for a in not_advised), advice


def test_out_of_memory_with_the_prefetch_thread_busy_exits_3_cleanly(tmp_path, small_data):
    """A real process: the out-of-memory error stops the run while the prefetch thread is inside torch
    calls; the thread is stopped first, so the interpreter's exit is not aborted (exit 134)."""
    proc = _popen(tmp_path / "run", "--dataset", str(small_data), "--max-steps", "6", "--val-dataset", "none", *ARGS,
                  hook=["--oom-at-step", "2"])
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 3, stderr[-3000:]
    err = stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: out of memory (tried to allocate 2.50 GiB"), err
    assert "terminate called" not in stderr and "Traceback" not in stdout + stderr


def test_out_of_memory_on_one_of_two_torchrun_ranks_ends_in_one_line_each(tmp_path, small_data):
    """torchrun (launch/torchrun.py, as launch/torchrun.sh and slurm.sbatch run it), 2 gloo ranks, rank 0
    out of memory: rank 0 prints the advice and exits 3, rank 1 (whose collective breaks) one line, and
    the launcher one line naming rank 0's error, then exits 3: no traceback anywhere."""
    cmd = [sys.executable, "launch/torchrun.py", "--standalone", "--nproc_per_node", "2",
           "tests/fault_hooks.py", "--oom-at-step", "2", "--", "--output-dir", str(tmp_path / "run"),
           "--eval-exact-match", "0", "--dataset", str(small_data), "--max-steps", "6", "--val-dataset", "none", *ARGS]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = proc.stderr
    assert proc.returncode == 3, err[-3000:]
    ours = [line for line in err.splitlines() if line.startswith("error: ")]
    oom = [line for line in ours if line.startswith("error: out of memory")]
    assert len(oom) == 1, err[-3000:]
    # rank 1's line, unless torchrun's SIGTERM ends it first
    assert [line for line in ours if line not in oom] in \
        ([], ["error: rank 1 stopped: another rank exited first (its error says why)"]), ours
    assert "terminate called" not in err and "[rank" not in err and "Traceback" not in err, err[-3000:]
    assert "ChildFailedError" not in err and "Root Cause" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == f"torchrun: tests/fault_hooks.py failed on rank 0 (exit code 3): {oom[0]}"


@pytest.mark.parametrize("bad, said", [
    (["--bogus-flag", "3"], "error: the command line did not parse"),  # tyro's own message, then ours
    (["--lr", "-1"], "error: --lr must be positive (got -1.0)"),
])
def test_bad_input_under_torchrun_is_said_once_and_named_by_the_launcher(tmp_path, bad, said):
    """Every rank parses the same command line: rank 0 says what is wrong, the launcher's last line names
    it, and neither torchrun's own failure report nor a second rank's copy of the message is printed."""
    cmd = [sys.executable, "launch/torchrun.py", "--standalone", "--nproc_per_node", "2", "train.py",
           "--output-dir", str(tmp_path / "run"), *bad]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the launcher sets it, quietly
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2, lines
    assert re.fullmatch(rf"torchrun: train.py failed on rank \d \(exit code 2\): {re.escape(said)}.*", lines[-1])
    assert sum("Unrecognized options: --bogus-flag" in line or line.startswith(said) for line in lines) == 1, lines
    assert not [line for line in lines if re.match(r"^[WE]\d{4} ", line) or "Traceback" in line], lines
    assert not [line for line in lines if "OMP_NUM_THREADS" in line], lines
