"""Writes that fail on a real disk: an output directory that cannot be written, and a file-size limit
(RLIMIT_FSIZE, the failure a full disk gives: torch's zip writer and safetensors raise their own errors,
not OSError) while a checkpoint or the final model is written. Each ends in one line, no traceback, and
leaves no partial directory behind."""

import resource
import subprocess
import sys

import pytest

from conftest import ROOT, run_train
from core.checkpoint import checkpoints


def test_an_output_dir_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path, small_data, capsys,
                                                                              monkeypatch):
    import train

    taken = tmp_path / "a-file"
    taken.write_text("")
    monkeypatch.setattr(train, "build_model", lambda *a: pytest.fail("the model loaded before the refusal"))
    for out in (taken, taken / "run"):
        assert run_train(out, "--dataset", str(small_data), "--max-steps", "1") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --output-dir {out} cannot be written ("), err
        assert "pass a directory you can write to" in err[0]


def _train_with_file_limit(out, kib: int, *args: str) -> subprocess.CompletedProcess:
    """train.py in a process that cannot write a file over `kib` KiB (Python ignores SIGXFSZ: the write fails)."""
    limit = kib * 1024
    return subprocess.run([sys.executable, "train.py", "--output-dir", str(out), "--eval-exact-match", "0",
                           "--val-dataset", "none", "--micro-batch-size", "4", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))


def test_a_checkpoint_that_torch_cannot_write_fails_in_one_line(tmp_path, small_data):
    """A full fine-tune's checkpoint (~15 MB) over a 2 MB limit: torch.save's RuntimeError inside DCP's
    CheckpointException (a BaseException)."""
    out = tmp_path / "run"
    proc = _train_with_file_limit(out, 2000, "--dataset", str(small_data), "--max-steps", "2", "--save-every", "1")
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert err[0].startswith(f"error: saving checkpoint step_00000001 in {out / 'checkpoints'} failed: "
                             f"a file could not be written ("), err[0]
    assert "no earlier checkpoint exists" in err[0] and "rerun with --resume auto" in err[0]
    assert not list((out / "checkpoints").iterdir())  # the partial save is removed


def test_a_final_model_that_cannot_be_written_fails_in_one_line_and_can_be_written_again(tmp_path, small_data):
    """LoRA on a preset: the checkpoint (~3 MB) fits a 4 MB limit, the random base saved in final/base
    (~5 MB) does not; safetensors' error. The rerun the line names writes final/ from the checkpoint."""
    out = tmp_path / "run"
    args = ["--dataset", str(small_data), "--lora", "--max-steps", "2", "--save-every", "2"]
    proc = _train_with_file_limit(out, 4000, *args)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert err[0].startswith(f"error: writing {out / 'final'} failed: File too large"), err[0]
    assert f"rerun with the same flags plus --resume auto: it continues from {checkpoints(out)[-1][1]}" in err[0]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".tmp", "final"))) == []
    assert run_train(out, *args, "--val-dataset", "none", "--micro-batch-size", "4", "--resume", "auto") == 0
    assert (out / "final" / "adapter_model.safetensors").is_file() and (out / "final" / "base").is_dir()
