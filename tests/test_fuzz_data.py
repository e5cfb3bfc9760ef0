"""Fuzzing the data pipeline (hypothesis): malformed JSON, invalid UTF-8, wrong types, missing fields,
empty strings, huge samples, lone surrogates, unknown chat roles, deep nesting.

Every fuzzed file either loads, or fails with one line naming the file (and the line, for a bad
record); with --skip-bad-samples, bad records are skipped and counted, and every record is
accounted for. Any other exception is an unexplained traceback and fails the test.

    python tests/test_fuzz_data.py      # run the fuzzers once and print the outcome table (README)
"""

import collections
import json
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, read_metrics, run_train  # noqa: F401  (conftest puts the repo on sys.path)
from core import UserError
from core.chat import CHAT_ROLES
from core.data import DataConfig, load_splits
from core.records import BadRecord

OUTCOMES = collections.Counter()  # error kind -> count, for the README table (see __main__)

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                      max_leaves=8)
texts = st.one_of(st.text(max_size=30), st.sampled_from(["", "   ", "\n", "x" * 20_000, "a\ud800b", "\x00", "é😀"]))
roles = st.sampled_from([*CHAT_ROLES, "bot", "User", "", None, 3])
message = st.fixed_dictionaries({"role": roles, "content": texts | scalars}) | values
records = st.one_of(
    st.fixed_dictionaries({"instruction": texts | scalars, "output": texts | scalars},
                          optional={"input": texts | scalars}),
    st.fixed_dictionaries({"messages": st.lists(message, max_size=4) | values}),
    st.fixed_dictionaries({"text": texts | scalars}),
    st.fixed_dictionaries({"prompt": texts | scalars, "completion": texts | scalars}),
    values,  # anything at all: wrong types, missing fields, not an object
)
GOOD = {  # a valid record of each format (a fuzzed file is about half good lines, so skipping has work)
    "auto": b'{"instruction": "Copy: ab", "output": "ab"}', "alpaca": b'{"instruction": "Copy: ab", "output": "ab"}',
    "chat": b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
    "completion": b'{"prompt": "a", "completion": "b"}', "pretrain": b'{"text": "some text to learn"}'}
lines = st.one_of(
    records.map(lambda r: json.dumps(r).encode()),
    records.map(lambda r: json.dumps(r).encode()),
    records.map(lambda r: json.dumps(r).encode()[:-1]),  # truncated
    st.binary(max_size=24),  # mostly invalid UTF-8 or not JSON
    st.sampled_from([b"\xff\xfe{}", b"\xef\xbb\xbf" + GOOD["auto"], b"[" * 50_000, b"NaN", b"{}", b"", b"  ",
                     b'{"text": "x\\udc80"}', b'{"messages": [{"role": "bot", "content": "a"}]}']),
)
slots = st.lists(st.none() | lines, min_size=2, max_size=8)  # None: a good line
FORMATS = st.sampled_from(["auto", "alpaca", "chat", "completion", "pretrain"])
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,  # derandomized: CI sees the same cases every run
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _kind(message: str) -> str:
    """The error's kind, without file names and details (for the outcome table)."""
    text = re.sub(r"^.*?(\.jsonl?(:\d+| item \d+)?: )", "", message)
    text = re.sub(r"\(.*", "", text)
    text = re.sub(r"messages\[\d+\]", "messages[i]", text)
    text = re.sub(r"'[^']*'|(?<![\w-])\d+", "X", text)
    return text.strip(" ;,")[:70]


def _load(path: Path, fmt: str, skip: bool, tok):
    cfg = DataConfig(dataset=str(path), dataset_format=fmt, val_dataset="none", seq_len=64, skip_bad_samples=skip)
    return load_splits(cfg, tok)


def _check_fuzzed_file(path: Path, n_lines: int, fmt: str, tok) -> None:
    try:
        train, _ = _load(path, fmt, False, tok)
        strict = None
        OUTCOMES["loaded (no bad record)"] += 1
    except UserError as e:
        strict, message = e, str(e)
        assert "\n" not in message and str(path) in message, message
        if isinstance(e, BadRecord):  # a record's error names its line
            line = re.match(re.escape(str(path)) + r":(\d+): ", message)
            assert line and 1 <= int(line.group(1)) <= n_lines, message
        OUTCOMES[("bad record: " if isinstance(e, BadRecord) else "whole file: ") + _kind(message)] += 1

    try:  # the same file with --skip-bad-samples: nothing raised for a single record
        train, _ = _load(path, fmt, True, tok)
    except BadRecord as e:
        pytest.fail(f"--skip-bad-samples raised for one record: {e}")
    except UserError as e:  # whole-file problems only: nothing usable at all
        assert re.search(r"the dataset is empty|no usable samples|no record in a known format", str(e)), str(e)
        return
    stats = train.stats
    if strict is None:
        assert "skipped_bad" not in stats
    elif isinstance(strict, BadRecord):
        where = str(strict).split(": ")[0]  # the same first bad line (its reason may differ: with skipping,
        assert stats["skipped_bad"] >= 1 and stats["first_bad"].startswith(where + ": ")  # auto-detection skips it)
        OUTCOMES["--skip-bad-samples: skipped and counted, rest loaded"] += 1
    if fmt != "pretrain":  # every record is a sample, or dropped and counted, or skipped and counted
        assert stats["records"] == (stats["samples"] + stats.get("skipped_bad", 0) + stats["dropped_too_long"]
                                    + stats["dropped_untrained"] + stats["cut_untrained"]), stats


@FUZZ
@given(body=slots, fmt=FORMATS)
def test_fuzzed_jsonl_loads_or_fails_with_file_and_line(tok, body, fmt):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.jsonl"
        path.write_bytes(b"\n".join(GOOD[fmt] if line is None else line for line in body) + b"\n")
        _check_fuzzed_file(path, len(path.read_bytes().splitlines()), fmt, tok)


@FUZZ
@given(items=st.lists(records, min_size=1, max_size=5), fmt=FORMATS)
def test_fuzzed_json_array_loads_or_fails_with_file_and_item(tok, items, fmt):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.json"
        path.write_text(json.dumps(items))
        try:
            _load(path, fmt, False, tok)
        except BadRecord as e:
            assert "\n" not in str(e) and re.match(re.escape(str(path)) + r": item \d+: ", str(e)), str(e)
        except UserError as e:
            assert "\n" not in str(e) and str(path) in str(e), str(e)
        try:
            _load(path, fmt, True, tok)
        except BadRecord as e:
            pytest.fail(f"--skip-bad-samples raised for one record: {e}")
        except UserError as e:
            assert re.search(r"no usable samples|no record in a known format", str(e)), str(e)


BAD_LINES = {  # one of each kind of bad record, with the reason the strict run gives
    "invalid JSON": (b'{"instruction": "a", "output": ', "invalid JSON"),
    "invalid UTF-8": (b'{"instruction": "\xff", "output": "b"}', "invalid UTF-8"),
    "not an object": (b'[1, 2]', "expected a JSON object, got list"),
    "wrong type": (b'{"instruction": "a", "output": 3}', "alpaca records need a string 'output' (a number)"),
    "missing field": (b'{"instruction": "a"}', "alpaca records need a string 'output' (missing)"),
    "empty response": (b'{"instruction": "a", "output": " "}', "empty response"),
    "lone surrogate": (b'{"instruction": "a", "output": "x\\ud800"}', "invalid Unicode (a lone surrogate"),
    "deep nesting": (b"[" * 50_000, "nested too deeply"),
}


def _mixed(tmp_path, small_data, bad: list[bytes]) -> Path:
    """96 good lines with the bad ones from line 41 on."""
    good = small_data.read_bytes().splitlines()
    data = tmp_path / "mixed.jsonl"
    data.write_bytes(b"\n".join(good[:40] + bad + good[40:96]) + b"\n")
    return data


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_each_bad_record_is_named_or_skipped_and_counted(tmp_path, small_data, tok, kind):
    line, reason = BAD_LINES[kind]
    data = _mixed(tmp_path, small_data, [line])
    with pytest.raises(BadRecord) as e:
        _load(data, "auto", False, tok)
    assert str(e.value).startswith(f"{data}:41: ") and reason in str(e.value) and "\n" not in str(e.value)
    stats = _load(data, "auto", True, tok)[0].stats
    assert stats["skipped_bad"] == 1 and stats["records"] == 97 and reason in stats["first_bad"]


def test_train_stops_at_the_first_bad_record_or_skips_and_counts_all(tmp_path, small_data, capsys):
    data = _mixed(tmp_path, small_data, [line for line, _ in BAD_LINES.values()])
    args = ["--dataset", str(data), "--max-steps", "1", "--micro-batch-size", "4", "--val-dataset", "none",
            "--skip-export"]
    assert run_train(tmp_path / "strict", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {data}:41: invalid JSON"), err
    assert run_train(tmp_path / "skip", *args, "--skip-bad-samples") == 0
    stats = json.loads((tmp_path / "skip" / "run.json").read_text())["data"]["train"]
    assert stats["skipped_bad"] == len(BAD_LINES) and stats["records"] == 96 + len(BAD_LINES)


def test_unknown_chat_role_is_named(tmp_path, tok):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]})
                    + "\n" + json.dumps({"messages": [{"role": "user", "content": "a"},
                                                      {"role": "assistant", "content": "b"}]}) + "\n")
    with pytest.raises(BadRecord, match=re.escape(f"{path}:1: messages[1] has role 'bot'; use one of")):
        _load(path, "auto", False, tok)
    train, _ = _load(path, "auto", True, tok)
    assert train.stats["skipped_bad"] == 1 and train.stats["samples"] == 1


if __name__ == "__main__":  # the outcome table of the fuzzers, for README.md
    from core.model import ModelConfig, load_tokenizer

    tokenizer = load_tokenizer(ModelConfig())
    test_fuzzed_jsonl_loads_or_fails_with_file_and_line(tokenizer)
    total = sum(v for k, v in OUTCOMES.items() if not k.startswith("--skip"))
    print(f"{total} fuzzed .jsonl files (strict), each also loaded with --skip-bad-samples\n")
    print("| outcome | files |\n|---|---|")
    for kind, n in sorted(OUTCOMES.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {n} |")
