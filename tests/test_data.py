"""Formats, masking, truncation counts and dataset sources."""

import copy
import csv
import dataclasses
import gzip
import json
import re

import pytest

from conftest import ROOT, write_jsonl
from core import UserError
from core.records import BadRecord
from core.data import ALPACA_PROMPT, DataConfig, describe, load_splits, tokenize


def decode_trained(tok, sample):
    return tok.decode([t for t, label in zip(sample.input_ids, sample.labels) if label != -100])


def test_alpaca_masks_prompt_and_trains_response_plus_eos(tok):
    rec = {"instruction": "Reverse the letters.", "input": "a b c", "output": "c b a"}
    s = tokenize(rec, "alpaca", "x:1", tok, train_on_inputs=False)
    prompt = ALPACA_PROMPT.format(instruction=rec["instruction"], input=rec["input"])
    assert tok.decode(s.input_ids[:s.prompt_len], skip_special_tokens=True) == prompt
    assert s.labels[:s.prompt_len] == [-100] * s.prompt_len
    assert s.labels[s.prompt_len:] == s.input_ids[s.prompt_len:]
    assert s.input_ids[-1] == tok.eos_token_id
    assert decode_trained(tok, s) == "c b a" + tok.eos_token


def test_alpaca_without_input_uses_short_template(tok):
    s = tokenize({"instruction": "Say hi.", "output": "hi"}, "alpaca", "x:1", tok, False)
    assert "### Input" not in tok.decode(s.input_ids[:s.prompt_len])


def test_train_on_inputs_trains_every_token(tok):
    rec = {"instruction": "Copy.", "input": "a", "output": "a"}
    s = tokenize(rec, "alpaca", "x:1", tok, train_on_inputs=True)
    assert s.labels == s.input_ids


def test_completion_formats(tok):
    s = tokenize({"prompt": "2+2=", "completion": "4"}, "completion", "x:1", tok, False)
    assert decode_trained(tok, s) == "4" + tok.eos_token
    s = tokenize({"text": "hello world"}, "completion", "x:1", tok, False)
    assert s.prompt_len == 0 and s.labels == s.input_ids


def test_text_that_writes_its_own_bos_and_eos_gets_one_of_each():
    """Text rendered by a chat template starts with BOS and may end in EOS: the sample holds one of each."""
    from core.model import ModelConfig, load_tokenizer

    tok = load_tokenizer(ModelConfig())
    tok.add_bos_token = True  # as Llama 3's tokenizer does
    bos, eos = tok.bos_token_id, tok.eos_token_id
    plain = tokenize({"text": "hello world"}, "completion", "x:1", tok, False).input_ids
    rendered = tokenize({"text": f"{tok.bos_token}hello world{tok.eos_token}"}, "completion", "x:1", tok, False)
    assert plain[0] == bos and plain[-1] == eos
    assert rendered.input_ids == plain
    newline = tokenize({"text": f"hello world{tok.eos_token}\n"}, "completion", "x:1", tok, False).input_ids
    assert newline.count(eos) == 1 and tok.decode(newline[-1:]) == "\n"  # a template's "<|im_end|>\n" ending
    spaced = tokenize({"text": "hello world \n"}, "completion", "x:1", tok, False).input_ids
    assert spaced[-1] == eos and spaced.count(eos) == 1
    prompted = tokenize({"prompt": f"{tok.bos_token}2+2=", "completion": "4"}, "completion", "x:1", tok, False)
    assert prompted.input_ids.count(bos) == 1


def test_text_records_rendered_by_a_chat_template_are_noted(tmp_path, tok):
    turn = "<|im_start|>{}\n{}<|im_end|>\n"
    chats = [{"text": turn.format("user", f"Say {i}.") + turn.format("assistant", i)} for i in range(9)]
    rendered, _ = load_splits(DataConfig(dataset=str(write_jsonl(tmp_path / "r.jsonl", chats)), val_dataset="none"),
                              tok)
    assert "(<|im_start|>), so every token trains, the user's turns too" in rendered.stats["rendered_chats"]
    plain = [{"text": f"Document {i}."} for i in range(9)]
    train, _ = load_splits(DataConfig(dataset=str(write_jsonl(tmp_path / "t.jsonl", plain)), val_dataset="none"), tok)
    assert "rendered_chats" not in train.stats


def test_chat_trains_only_assistant_turns(tok):
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "u1"},
                {"role": "assistant", "content": "first answer"}, {"role": "user", "content": "u2"},
                {"role": "assistant", "content": "second answer"}]
    s = tokenize({"messages": messages}, "chat", "x:1", tok, False)
    trained = decode_trained(tok, s)
    assert "first answer" in trained and "second answer" in trained
    for masked in ("Be terse.", "u1", "u2", "system", "user"):
        assert masked not in trained
    # the exact-match prompt ends right before the last answer
    assert tok.decode(s.input_ids[s.prompt_len:]).startswith("second answer")


@pytest.mark.parametrize("bad, message", [
    ({"messages": [{"role": "robot", "content": "x"}]}, "role 'robot'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    ({"messages": [{"role": "assistant", "content": 3}]}, "string 'content'"),
    ({"messages": "hi"}, "non-empty list"),
])
def test_chat_rejects_malformed_records_with_location(tok, bad, message):
    with pytest.raises(UserError, match=f"data.jsonl:7: .*{message}"):
        tokenize(bad, "chat", "data.jsonl:7", tok, False)


@pytest.mark.parametrize("bad, message", [
    ({"instruction": "x"}, "string 'output' \\(missing\\)"),
    ({"instruction": "x", "output": 5}, "string 'output' \\(a number\\)"),
    ({"instruction": "x", "output": "   "}, "empty response"),
])
def test_alpaca_rejects_malformed_records_with_location(tok, bad, message):
    with pytest.raises(UserError, match=f"f.jsonl:3: .*{message}"):
        tokenize(bad, "alpaca", "f.jsonl:3", tok, False)


def test_long_samples_dropped_or_truncated_and_counted(tmp_path, tok):
    records = [{"instruction": "Copy.", "input": "a", "output": "a"},
               {"instruction": "Copy.", "input": "a", "output": " ".join("abcdefgh" * 10)}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    train, _ = load_splits(DataConfig(dataset=str(path), seq_len=40, val_dataset="none"), tok)
    assert train.stats["dropped_too_long"] == 1 and len(train.samples) == 1
    line = describe(train, None).splitlines()[1]
    longest = int(re.search(r"the longest: (\d+) tokens", line)[1])
    assert line == (f"data: train: 1 of 2 samples are longer than --seq-len 40 (the longest: {longest} tokens) and "
                    f"were dropped; --seq-len {longest} keeps them whole, --truncation truncate keeps each one's "
                    f"first 40 tokens")
    for seq_len, kept in ((longest, 2), (longest - 1, 1)):  # the --seq-len it names is the one that keeps them
        train, _ = load_splits(DataConfig(dataset=str(path), seq_len=seq_len, val_dataset="none"), tok)
        assert len(train.samples) == kept
    texts = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"text": " ".join("abcdefgh" * 10)}])
    train, _ = load_splits(DataConfig(dataset=str(texts), seq_len=40, val_dataset="none"), tok)
    assert 'pretrain cuts {"text"} documents into blocks' in describe(train, None)  # auto read them as completion
    train, _ = load_splits(DataConfig(dataset=str(path), seq_len=40, val_dataset="none",
                                      truncation="truncate"), tok)
    assert train.stats["truncated"] == 1 and len(train.samples) == 2
    assert max(len(s.input_ids) for s in train.samples) == 40 and "too_long" not in train.stats
    assert [s.prompted for s in train.samples] == [True, False]  # a cut answer is no exact-match reference


def test_sample_with_only_prompt_left_after_truncation_is_dropped(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x " * 50, "output": "y"}] * 2
                       + [{"instruction": "Copy.", "output": "y"}])
    train, _ = load_splits(DataConfig(dataset=str(path), seq_len=20, val_dataset="none",
                                      truncation="truncate"), tok)
    assert train.stats["cut_untrained"] == 2 and len(train.samples) == 1
    assert not train.stats["truncated"] and not train.stats["dropped_untrained"]  # each sample counted once
    assert "; 2 dropped as cut to --seq-len before their first trained token" in describe(train, None)


def test_pretrain_packs_documents_into_full_blocks(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": f"document number {i} " * 3} for i in range(20)])
    train, _ = load_splits(DataConfig(dataset=str(path), dataset_format="pretrain", seq_len=16,
                                      val_dataset="none"), tok)
    assert all(len(s.input_ids) == 16 and s.labels == s.input_ids for s in train.samples)
    assert train.stats["tokens"] + train.stats["dropped_tail_tokens"] > 20 * 3


def test_auto_format_and_sibling_validation_file(small_data, tok):
    train, val = load_splits(DataConfig(dataset=str(small_data)), tok)
    assert len(train.samples) == 192 and len(val.samples) == 32


def test_hold_out_when_no_validation_file(tmp_path, tok):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"text": f"t {i}"} for i in range(100)])
    train, val = load_splits(DataConfig(dataset=str(path), val_size=0.1), tok)
    assert len(train.samples) == 90 and len(val.samples) == 10
    again, _ = load_splits(DataConfig(dataset=str(path), val_size=0.1), tok)
    assert [s.input_ids for s in again.samples] == [s.input_ids for s in train.samples]
    other, _ = load_splits(DataConfig(dataset=str(path), val_size=0.1, val_seed=1), tok)
    assert [s.input_ids for s in other.samples] != [s.input_ids for s in train.samples]  # --val-seed, not --seed


def test_parquet_csv_tsv_and_json_sources(tmp_path, tok):
    import datasets

    rows = [{"instruction": "Copy, then stop.", "input": c, "output": f"{c}, {c}"} for c in "abcdef"]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    for name, sep in (("d.csv", ","), ("d.tsv", "\t")):
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"], delimiter=sep)
            w.writeheader(), w.writerows(rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    want, _ = load_splits(DataConfig(dataset=str(tmp_path / "d.jsonl"), val_dataset="none"), tok)
    for name in ("d.parquet", "d.csv", "d.tsv", "d.json"):
        train, _ = load_splits(DataConfig(dataset=str(tmp_path / name), val_dataset="none"), tok)
        assert [s.labels for s in train.samples] == [s.labels for s in want.samples], name


def test_table_files_leave_no_copy_in_the_datasets_cache(tmp_path, tok, monkeypatch):
    """datasets converts a parquet or CSV file to an Arrow copy in its cache (~/.cache/huggingface):
    it is made in TMPDIR while read and removed, so the user's data is not copied into their home."""
    import datasets
    import tempfile

    home_cache, tmp = tmp_path / "hf", tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(home_cache))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    rows = [{"instruction": "Say hi.", "output": "Hi."}] * 3
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.csv").write_text("instruction,output\n" + "Say hi.,Hi.\n" * 3)
    for name in ("d.parquet", "d.csv"):
        train, _ = load_splits(DataConfig(dataset=str(tmp_path / name), val_dataset="none"), tok)
        assert len(train.samples) == 3
    assert not home_cache.exists() or not any(home_cache.rglob("*.arrow")), list(home_cache.rglob("*"))
    assert list(tmp.iterdir()) == []


def test_a_bad_record_is_named_by_its_line_or_its_index(tmp_path, tok):
    """Text files count lines from 1; a JSON array's items and an Arrow table's rows count from 0, as
    `data[i]` and `dataset[i]` do: the third record is line 3, item 2, row 2."""
    import datasets

    rows = [{"instruction": "Say hi.", "output": "Hi."}] * 2 + [{"instruction": "Say hi.", "output": ""}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for name, where in (("d.jsonl", "d.jsonl:3"), ("d.json", "d.json: item 2"), ("d.parquet", "d.parquet: row 2"),
                        ("saved", "saved: row 2")):
        with pytest.raises(BadRecord, match=f"{re.escape(where)}: empty response"):
            load_splits(DataConfig(dataset=str(tmp_path / name), val_dataset="none"), tok)


def test_a_csv_error_names_the_line_a_row_starts_on(tmp_path, tok):
    """A quoted cell may span lines, and blank lines hold no row: the location counts the file's lines."""
    path = tmp_path / "d.csv"
    path.write_text('instruction,output\n"Say\ntwo lines.",ok\n\nSay x.,\n')
    with pytest.raises(BadRecord, match=r"d.csv: line 5: alpaca records need a string 'output' \(empty\)"):
        load_splits(DataConfig(dataset=str(path), val_dataset="none"), tok)


def test_a_record_of_another_format_is_named(tmp_path, tok):
    chat = {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]}
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [chat] * 3 + [{"instruction": "Say hi.", "output": "Hi."}]))
    with pytest.raises(BadRecord, match=r"mixed.jsonl:4: alpaca record \(instruction\+output\) in a chat dataset"):
        load_splits(DataConfig(dataset=str(path), val_dataset="none"), tok)
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"instruction": "Say hi.", "output": "Hi."}, chat]))
    with pytest.raises(BadRecord, match=r"mixed.jsonl:2: chat record \(messages\) in an alpaca dataset"):
        load_splits(DataConfig(dataset=str(path), val_dataset="none"), tok)


def test_a_csv_column_of_numbers_is_text(tmp_path, tok):
    """pandas reads a column of numbers as int64; a CSV cell is an answer ("2"), and an empty input is fine."""
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["instruction", "input", "output"], *[["Add.", f"{i}+{i}", str(2 * i)] for i in range(6)],
                     ["Say zero.", "", "0"]])
    train, _ = load_splits(DataConfig(dataset=str(tmp_path / "d.csv"), val_dataset="none"), tok)
    assert len(train.samples) == 7
    answer = [t for t, label in zip(train.samples[0].input_ids, train.samples[0].labels) if label != -100]
    assert tok.decode(answer).startswith("0")


def test_example_files_for_every_format_load(tok):
    for name in ("alpaca", "chat", "completion", "text"):
        train, _ = load_splits(DataConfig(dataset=str(ROOT / f"data/examples/{name}.jsonl"), val_dataset="none"),
                               tok)
        assert train.samples, name


@pytest.mark.parametrize("content, message", [
    (b'{"text": "ok"}\n{"text": "ok",\n', "bad.jsonl:2: invalid JSON"),
    (b'{"text": "ok"}\n{"text": "ok\n', r"bad.jsonl:2: invalid JSON \(Unterminated string starting at column 10\)"),
    (b'{"text": "ok"}\n\xff\xfe{"text": 1}\n', "bad.jsonl:2: invalid UTF-8"),
    (b'{"text": "ok"}\n[1, 2]\n', "bad.jsonl:2: expected a JSON object"),
    (b'{"text": "ok"}\n{"text": 7}\n', "bad.jsonl:2: completion records need a string 'text'"),
    (b"\n\n", "the dataset is empty"),
    (b'{"foo": 1}\n', "bad.jsonl:1: cannot tell the format"),
])
def test_malformed_files_name_file_and_line(tmp_path, tok, content, message):
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_splits(DataConfig(dataset=str(tmp_path / "bad.jsonl"), val_dataset="none"), tok)


def test_hub_dataset_path_uses_datasets_load_dataset(monkeypatch, tok):
    """The hub branch (no network here): datasets.load_dataset gets the id, subset and split."""
    import datasets

    calls = []

    def fake_load(name, subset=None, split=None):
        calls.append((name, subset, split))
        return datasets.Dataset.from_list([{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    train, val = load_splits(DataConfig(dataset="someorg/qa", dataset_subset="en", val_size=2), tok)
    assert calls == [("someorg/qa", "en", "train")]
    assert len(train.samples) == 8 and len(val.samples) == 2


def test_hub_dataset_failure_is_one_line(monkeypatch, tok):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach the Hub\nlong trace")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match="--dataset 'someorg/qa': could not load from the hub .*ConnectionError"):
        load_splits(DataConfig(dataset="someorg/qa"), tok)


def _chat_records(n: int) -> list[dict]:
    return [{"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": f"answer {i}"}, {"role": "user", "content": "more"},
                          {"role": "assistant", "content": f"more {i}"}]} for i in range(n)]


def test_data_cache_returns_what_tokenizing_returns_and_keys_on_every_input(tmp_path, tok, monkeypatch):
    """The second load reads the cache (tokenize is not called) and gives the same samples and skipped
    records; another flag, chat template or record is tokenized anew; 'none' writes nothing."""
    from core import data

    path = write_jsonl(tmp_path / "chats.jsonl", _chat_records(30) + [{"messages": "not a list"}])
    cfg = DataConfig(dataset=str(path), val_dataset="none", skip_bad_samples=True, data_cache=str(tmp_path / "c"))
    fresh, _ = load_splits(dataclasses.replace(cfg, data_cache="none"), tok)
    assert not (tmp_path / "c").exists()
    first, _ = load_splits(cfg, tok)
    calls = []
    monkeypatch.setattr(data, "tokenize", lambda *a: calls.append(1) or tokenize(*a))
    cached, _ = load_splits(cfg, tok)
    assert not calls and cached.samples == first.samples == fresh.samples
    assert cached.stats == first.stats == fresh.stats and cached.stats["skipped_bad"] == 1
    other_tok = copy.deepcopy(tok)
    other_tok.chat_template += "{# the same rendering, another template #}"
    for changed, t in ((dataclasses.replace(cfg, train_on_inputs=True), tok), (cfg, other_tok)):
        calls.clear()
        load_splits(changed, t)
        assert calls
    write_jsonl(path, _chat_records(31))
    calls.clear()
    again, _ = load_splits(cfg, tok)
    assert calls and len(again.samples) == 31


def test_data_cache_ignores_an_unreadable_file(tmp_path, tok):
    from core import data_cache

    path = write_jsonl(tmp_path / "chats.jsonl", _chat_records(5))
    cfg = DataConfig(dataset=str(path), val_dataset="none", data_cache=str(tmp_path / "c"))
    first, _ = load_splits(cfg, tok)
    [npz] = data_cache.cache_dir(cfg.data_cache).glob("*.npz")
    npz.write_bytes(npz.read_bytes()[:100])  # cut short, as by a full disk
    again, _ = load_splits(cfg, tok)
    assert again.samples == first.samples


def test_no_validation_set_says_why_and_loses_no_data(tmp_path, tok):
    """Held-out pretrain documents too short for one block train instead (they used to stop the run); a
    --val-size that holds out no record of a small file says so."""

    train, val = load_splits(DataConfig(dataset=str(ROOT / "data/examples/text.jsonl"), dataset_format="pretrain",
                                        seq_len=64), tok)
    assert val is None and train.stats["records"] == 20  # every record trains
    assert "held-out records fill no --seq-len 64 block, so they train instead" in describe(train, val)
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"instruction": "a", "output": "b"}) + "\n" for _ in range(12)))
    train, val = load_splits(DataConfig(dataset=str(small)), tok)
    assert val is None and "--val-size 0.05 of 12 records holds none out" in describe(train, val)


def test_truncation_that_leaves_nothing_trained_does_not_advise_itself(tmp_path, tok):
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"prompt": "word " * 80, "completion": "A"}) + "\n" for _ in range(4)))
    with pytest.raises(UserError, match=r"raise --seq-len \(truncation keeps each sample's first --seq-len"):
        load_splits(DataConfig(dataset=str(long), seq_len=20, truncation="truncate", val_dataset="none"), tok)


def test_directories_load_a_datasets_save_or_a_snapshots_shards(tmp_path, tok):
    import datasets

    rows = [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(6)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:2])}
                         ).save_to_disk(str(tmp_path / "saved_dict"))
    (tmp_path / "snapshot" / "data").mkdir(parents=True)
    shards = (("train-00000-of-00002", rows[:3]), ("train-00001-of-00002", rows[3:]), ("test-00000", rows[:2]))
    for name, part in shards:
        datasets.Dataset.from_list(part).to_parquet(str(tmp_path / "snapshot" / "data" / f"{name}.parquet"))
    for name in ("saved", "saved_dict", "snapshot"):
        train, _ = load_splits(DataConfig(dataset=str(tmp_path / name), val_dataset="none"), tok)
        assert train.stats["records"] == 6, name  # the train split only
    with pytest.raises(UserError, match="no split 'dev' \\(it has train, test\\); pass --dataset-split"):
        load_splits(DataConfig(dataset=str(tmp_path / "saved_dict"), dataset_split="dev", val_dataset="none"), tok)


def test_files_as_exports_write_them(tmp_path, tok):
    """Excel's CSV UTF-8 (a byte-order mark), a .json array wrapped in {"data": ...}, gzipped JSON Lines,
    and the one-line
    hints for JSON Lines named .json and for a mistyped local path (not sent to the hub)."""
    (tmp_path / "excel.csv").write_text("\ufeffinstruction,output\nSay 2.,2\nSay 3.,3\n", encoding="utf-8")
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": [{"text": "a b"}, {"text": "c d"}]}))
    lines = "".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i}"}) + "\n" for i in range(2))
    (tmp_path / "packed.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    for name in ("excel.csv", "wrapped.json", "packed.jsonl.gz"):
        train, _ = load_splits(DataConfig(dataset=str(tmp_path / name), val_dataset="none"), tok)
        assert train.stats["records"] == 2, name
    (tmp_path / "lines.json").write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(UserError, match="name the file .jsonl"):
        load_splits(DataConfig(dataset=str(tmp_path / "lines.json")), tok)
    with pytest.raises(UserError, match="no such file or directory"):
        load_splits(DataConfig(dataset=str(tmp_path / "my_datset")), tok)


def test_a_validation_file_in_another_format_and_llama_factory_fields(tmp_path, tok):
    train_file = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(8)])
    chats = write_jsonl(tmp_path / "v.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                              {"role": "assistant", "content": "hello"}]}])
    _, val = load_splits(DataConfig(dataset=str(train_file), val_dataset=str(chats)), tok)
    assert val.stats["samples"] == 1  # read as chat, its own format
    history = write_jsonl(tmp_path / "h.jsonl", [{"instruction": "And 3?", "output": "3", "history": [["1?", "1"]]}])
    with pytest.raises(UserError, match="h.jsonl:1: alpaca records here have no 'system' or 'history'"):
        load_splits(DataConfig(dataset=str(history), val_dataset="none"), tok)


def test_dataset_columns_name_a_users_columns(tmp_path, tok, capsys):
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"{i}+1?", "answer": f"{i + 1}"} for i in range(4)])
    with pytest.raises(UserError, match="name yours with --dataset-columns"):
        load_splits(DataConfig(dataset=str(qa), val_dataset="none"), tok)
    train, _ = load_splits(DataConfig(dataset=str(qa), val_dataset="none",
                                      dataset_columns="question=instruction, answer=output"), tok)
    assert train.stats["samples"] == 4 and "### Instruction:\n0+1?" in tok.decode(train.samples[0].input_ids)
    import train as train_py

    assert train_py.main(["--dataset-columns", "question", "--output-dir", str(tmp_path / "run")]) == 2
    assert "error: --dataset-columns 'question': write yours=theirs pairs" in capsys.readouterr().err  # at start-up


def test_a_file_of_only_bad_records_names_itself_and_the_first_reason(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps({"instruction": "x", "output": i}) + "\n" for i in range(20)))
    with pytest.raises(UserError) as e:
        load_splits(DataConfig(dataset=str(path), skip_bad_samples=True), tok)
    said = str(e.value)
    assert said.startswith(f"{path}: no usable samples: all 19 records are bad"), said  # not its 1 held out
    assert "the first: " in said and "string 'output' (a number)" in said
    assert "{" not in said and "--seq-len" not in said  # no dict of counts, no length advice


def test_an_automatic_seq_len_fits_the_held_out_samples_too(tmp_path, tok):
    """The longest sample may be a held-out one: the automatic --seq-len keeps it."""
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"instruction": "Say hi.", "output": "Hi."}) + "\n"
                                                  for _ in range(8)))
    (tmp_path / "val.jsonl").write_text(json.dumps({"instruction": "Say hi. " * 20, "output": "Hi."}) + "\n")
    cfg = DataConfig(dataset=str(tmp_path / "train.jsonl"))
    train, val = load_splits(cfg, tok)
    assert len(val.samples) == 1 and cfg.seq_len == len(val.samples[0].input_ids) > len(train.samples[0].input_ids)


# ---------------------------------------------------------------------------- directories, Arrow and gzip sources


def _alpaca(n: int, tag: str) -> list[dict]:
    return [{"instruction": f"{tag} {i}", "output": "ok"} for i in range(n)]


def _folder(path, files: dict):
    path.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        write_jsonl(path / name, rows)
    return path


def test_arrow_rows_keep_only_the_keys_they_had(tmp_path):
    """Parquet (and save_to_disk) give every row of a nested column all its rows' keys, null where one had
    none: a weight on one message only, two tools with different parameters."""
    datasets = pytest.importorskip("datasets")
    from core.sources import read_records

    chats = [{"messages": [{"role": "user", "content": "a", "weight": 0}, {"role": "assistant", "content": "b"}],
              "tools": [{"name": "f", "parameters": {"city": {"type": "string"}}}]},
             {"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
              "tools": [{"name": "g", "parameters": {"tz": {"type": "string"}}}]}]
    datasets.Dataset.from_list(chats).to_parquet(tmp_path / "c.parquet")
    read = [record for record, _ in read_records(str(tmp_path / "c.parquet"), "--dataset")]
    assert read == chats  # not "weight": None on the messages without one, nor "tz": None on f's parameters


def test_a_folder_gives_each_split_its_own_files_and_never_mixes_them(tmp_path, tok):
    folder = _folder(tmp_path / "d", {"train.jsonl": _alpaca(30, "t"), "validation.jsonl": _alpaca(4, "v")})
    train, val = load_splits(DataConfig(dataset=str(folder), seq_len=64), tok)
    assert len(train.samples) == 30 and len(val.samples) == 4  # the folder's own validation split, not 5% of train
    _folder(tmp_path / "e", {"train.jsonl": _alpaca(30, "t"), "dev.jsonl": _alpaca(4, "v")})
    _, val = load_splits(DataConfig(dataset=str(tmp_path / "e/train.jsonl"), val_dataset=str(tmp_path / "e"),
                                    seq_len=64), tok)
    assert len(val.samples) == 4  # dev names the validation split; train.jsonl is not read into it
    _folder(tmp_path / "f", {"train.jsonl": _alpaca(30, "t"), "notes.jsonl": _alpaca(4, "n")})
    with pytest.raises(UserError, match=r"^--val-dataset .*/f: no file named for the 'validation' split \(it has "
                                        r"files named train\); pass the file itself$"):
        load_splits(DataConfig(dataset=str(tmp_path / "f/train.jsonl"), val_dataset=str(tmp_path / "f"),
                               seq_len=64), tok)
    with pytest.raises(UserError, match=r"no file named for the 'valid' split .* or --dataset-split NAME$"):
        load_splits(DataConfig(dataset=str(folder), dataset_split="valid", seq_len=64), tok)
    plain = _folder(tmp_path / "plain", {"part-0.jsonl": _alpaca(10, "a"), "part-1.jsonl": _alpaca(10, "b")})
    train, val = load_splits(DataConfig(dataset=str(plain), val_size=2, seq_len=64), tok)
    assert len(train.samples) + len(val.samples) == 20  # files named for no split: the folder is one dataset
    nested = tmp_path / "nested"
    _folder(nested / "train", {"part-0.jsonl": _alpaca(30, "t")})
    _folder(nested / "validation", {"part-0.jsonl": _alpaca(5, "v")})
    train, val = load_splits(DataConfig(dataset=str(nested), seq_len=64), tok)
    assert (len(train.samples), len(val.samples)) == (30, 5)  # a folder per split


def test_a_saved_dataset_dict_brings_its_validation_split(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_alpaca(30, "t")),
                          "validation": datasets.Dataset.from_list(_alpaca(3, "v"))}).save_to_disk(tmp_path / "dd")
    train, val = load_splits(DataConfig(dataset=str(tmp_path / "dd"), seq_len=64), tok)
    assert (len(train.samples), len(val.samples)) == (30, 3)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "dataset_info.json").write_text("{}")
    with pytest.raises(UserError, match=r"broken: not a readable datasets save_to_disk \("):
        load_splits(DataConfig(dataset=str(tmp_path / "broken"), seq_len=64), tok)


def test_gzipped_siblings_are_found_and_a_bad_gzip_is_one_line(tmp_path, tok):
    for name, rows in (("train", _alpaca(30, "t")), ("val", _alpaca(4, "v"))):
        (tmp_path / f"{name}.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    _, val = load_splits(DataConfig(dataset=str(tmp_path / "train.jsonl.gz"), seq_len=64), tok)
    assert len(val.samples) == 4
    (tmp_path / "plain.jsonl.gz").write_text(json.dumps(_alpaca(1, "x")[0]) + "\n")
    with pytest.raises(UserError, match=r"plain.jsonl.gz: not a whole gzip file .*drop the .gz from its name"):
        load_splits(DataConfig(dataset=str(tmp_path / "plain.jsonl.gz"), seq_len=64), tok)


def test_a_json_array_named_jsonl_and_bad_json_say_what_they_are(tmp_path, tok):
    (tmp_path / "a.jsonl").write_text(json.dumps(_alpaca(3, "x"), indent=1))
    with pytest.raises(UserError, match=r"a.jsonl: one JSON array, not one object per line; name the file .json$"):
        load_splits(DataConfig(dataset=str(tmp_path / "a.jsonl"), seq_len=64), tok)
    (tmp_path / "b.json").write_text('[{"instruction": "x", "output": }]')
    with pytest.raises(UserError, match=r"b.json: not valid JSON \(JSONDecodeError"):
        load_splits(DataConfig(dataset=str(tmp_path / "b.json"), seq_len=64), tok)
    (tmp_path / "c.json").write_bytes(b'[{"instruction": "\xe9", "output": "y"}]')
    with pytest.raises(UserError, match=r"c.json: invalid UTF-8 at byte 18; re-encode the file as UTF-8$"):
        load_splits(DataConfig(dataset=str(tmp_path / "c.json"), seq_len=64), tok)


def test_upper_case_and_ndjson_names_read_and_a_json_of_several_splits_is_refused(tmp_path, tok):
    write_jsonl(tmp_path / "TRAIN.JSONL", _alpaca(30, "t"))
    write_jsonl(tmp_path / "more.ndjson", _alpaca(30, "n"))
    for name in ("TRAIN.JSONL", "more.ndjson"):
        train, _ = load_splits(DataConfig(dataset=str(tmp_path / name), val_dataset="none", seq_len=64), tok)
        assert len(train.samples) == 30
    (tmp_path / "both.json").write_text(json.dumps({"train": _alpaca(3, "t"), "validation": _alpaca(2, "v")}))
    with pytest.raises(UserError, match=r"both.json: holds the lists train, validation; put each split in a file"):
        load_splits(DataConfig(dataset=str(tmp_path / "both.json"), seq_len=64), tok)
