"""Bad input ends with one line `error: ...` naming the flag or file, exit status 2, no traceback."""

import subprocess
import sys

import pytest

from conftest import ROOT


def _write(path, text):
    path.write_text(text)
    return str(path)


CASES = {
    "malformed jsonl line": (lambda t: ["--dataset", _write(t / "d.jsonl", '{"text": "a"}\n{"text": \n')],
                             "d.jsonl:2: invalid JSON"),
    "missing file": (lambda t: ["--dataset", str(t / "nope.jsonl")], "--dataset .*nope.jsonl: file not found"),
    "empty dataset": (lambda t: ["--dataset", _write(t / "e.jsonl", "")], "e.jsonl: the dataset is empty"),
    "unknown preset": (lambda t: ["--model", "tiny-lama"], "--model 'tiny-lama': not a preset"),
    "seq-len 0": (lambda t: ["--seq-len", "0"], "--seq-len must be at least 2"),
    "negative lr": (lambda t: ["--lr", "-1"], "--lr must be positive"),
    "zero micro-batch": (lambda t: ["--micro-batch-size", "0"], "--micro-batch-size must be at least 1"),
    "resume auto without output dir": (lambda t: ["--resume", "auto"], "--resume auto needs --output-dir"),
    "resume from a non-checkpoint": (lambda t: ["--resume", str(t)], "not a complete checkpoint"),
    "all samples too long": (lambda t: ["--seq-len", "4"], "no usable samples .* raise --seq-len"),
    "too few samples for a step": (lambda t: ["--dataset", _write(t / "s.jsonl", '{"text": "a"}\n' * 3),
                                              "--val-dataset", "none"],
                                   r"fewer than one step takes \(1 data-parallel ranks x --micro-batch-size \d+ x "
                                   r"--grad-accum \d+ rows\)"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_line_error(tmp_path, capsys, name):
    make_args, pattern = CASES[name]
    args = make_args(tmp_path)
    if "--output-dir" not in args and name != "resume auto without output dir":
        args = ["--output-dir", str(tmp_path / "run"), *args]
    import train

    assert train.main(["--max-steps", "1", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    import re

    assert re.search(pattern, err[0]), err[0]


def test_cli_exit_status_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    proc = subprocess.run([sys.executable, "train.py", "--dataset", str(bad), "--output-dir", str(tmp_path / "r")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"error: {bad}:2: alpaca records need a string 'output' (missing); under another "
                                   f"name, map it: --dataset-columns YOURS=output")


def test_bad_flag_value_is_a_parser_error(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "--seq-len", "abc"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--seq-len" in proc.stderr and "Traceback" not in proc.stderr


def test_an_unreachable_hub_is_one_line_of_ours_then_one_error(monkeypatch, capsys):
    """No network (as in CI): huggingface_hub's ten retry lines become one of ours, and the tokenizer's
    failure names the flag and the ways out (simulated: the real retries take about a minute)."""
    import logging

    import transformers

    from core import UserError
    from core.model import ModelConfig, load_tokenizer

    def unreachable(source, **kwargs):
        hub = logging.getLogger("huggingface_hub.utils._http")
        for retry in (1, 2):
            hub.warning(f"'[Errno -2] Name or service not known' thrown while requesting HEAD https://huggingface.co/"
                        f"{source}/resolve/main/config.json")
            hub.warning(f"Retrying in {retry}s [Retry {retry}/5].")
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in "
                      "the cached files.")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", unreachable)
    with pytest.raises(UserError, match=r"--model 'org/model' is not a local directory, and the Hugging Face hub "
                                        r"cannot be reached"):
        load_tokenizer(ModelConfig(path="org/model"))
    assert capsys.readouterr().err.splitlines() == [
        "hub: the Hugging Face hub does not answer; retrying for up to a minute"]
