"""Datasets: load records, render them in one of four formats, tokenize, mask, split.

    python train.py --dataset data/train.jsonl                      # alpaca, auto-detected
    python train.py --dataset chats.parquet --dataset-format chat   # messages + chat template
    python train.py --dataset tatsu-lab/alpaca --val-size 500       # hub dataset, 500 held out

Sources (core/sources.py reads them): local .jsonl / .json (either gzipped) / .parquet / .csv / .tsv
files, a directory (a `datasets` save_to_disk, or data files such as a hub snapshot's shards), or a
Hugging Face hub id; columns under other names are renamed by --dataset-columns. Formats
(`--dataset-format auto` picks by the keys of the first record):
  alpaca      {"instruction", "input"?, "output"}      prompt = ALPACA_PROMPT, trained = output + eos
  chat        {"messages": [{"role", "content"}]}      the tokenizer's chat template; assistant turns trained
              (OpenAI-style text parts joined; an assistant's tool_calls and the record's tools rendered)
              or ShareGPT's {"conversations": [{"from", "value"}]} (human -> user, gpt -> assistant)
  completion  {"prompt", "completion"} or {"text"}     trained = completion + eos (or all of text + eos)
  pretrain    {"text"}                                  documents joined with eos, cut into --seq-len blocks
Prompt tokens are masked from the loss (label -100) unless --train-on-inputs. In a chat, the trained
tokens of an assistant turn are exactly its content and its end-of-turn token (the last special
token the template writes for the turn: ChatML's <|im_end|>, Llama 3's <|eot_id|>, Mistral's </s>);
what the template writes after it (ChatML's newline) stays in input_ids but is not a target, since
generation stops at the end-of-turn token and never produces it. A turn whose rendering has no
special token is trained whole. Exact match (core/evaluate.py) scores that same span. Samples longer
than --seq-len are dropped (or cut with --truncation truncate) and counted; a malformed record
(bad JSON or UTF-8, wrong types, missing fields, empty responses, unknown chat roles, strings with
lone surrogates) stops the run with one line naming its file and line, or with --skip-bad-samples
is skipped and counted (`skipped_bad` in the data stats, with the first reason as `first_bad`).
tests/test_fuzz_data.py fuzzes this with hypothesis. Tokenized samples are cached for the next run
with the same records, tokenizer and flags (core/data_cache.py; --data-cache none turns it off).
"""

import dataclasses
import random
from pathlib import Path
from typing import Literal

from core import UserError, count, data_cache
from core.chat import template_drops, tokenize_chat
from core.records import IGNORE, BadRecord, Record, Sample, encodable
from core.sources import has_split, read_records, source_kind

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
VAL_NAMES = ("val", "validation", "valid", "dev", "test")


DEMO_DATASET = "data/train.jsonl"  # the embedded demo's data, in the repository


@dataclasses.dataclass
class DataConfig:
    dataset: str = DEMO_DATASET
    """Training data: a .jsonl/.json/.parquet/.csv/.tsv file or a Hugging Face hub dataset id."""
    dataset_format: Literal["auto", "completion", "alpaca", "chat", "pretrain"] = "auto"
    """Record format; auto picks by the keys of the first record (see the data module)."""
    dataset_split: str = "train"
    """Split to train on, for hub datasets."""
    dataset_subset: str | None = None
    """Configuration (subset) name, for hub datasets that have several."""
    dataset_columns: str = ""
    """Your columns under the names a format reads, e.g. 'question=instruction,answer=output' or 'query=prompt,response=completion' (for --dataset and --val-dataset)."""  # noqa: E501
    val_dataset: str = "auto"
    """Held-out data: a file or hub id; 'none'; or 'auto': a val/validation/valid/dev/test file beside a train.* or training.* file, else --val-size samples held out of the training data."""  # noqa: E501
    val_size: float = 0.05
    """Held out from the training data when there is no validation set: a fraction (< 1) or a count."""
    val_seed: int = 0
    """Which samples --val-size holds out; apart from --seed, so the runs of every seed score the same held-out samples."""  # noqa: E501
    max_val_samples: int = 1000
    """At most this many validation samples are kept (evaluation cost stays bounded)."""
    seq_len: int | None = None
    """Maximum tokens per sample (per packed row, per pretrain block); unset: the longest sample, capped at the model's context (packed: at least 4096; the demo: 512)."""  # noqa: E501
    train_on_inputs: bool = False
    """Also train on prompt tokens (by default only responses are in the loss)."""
    truncation: Literal["drop", "truncate"] = "drop"
    """What to do with samples longer than --seq-len: drop them or cut them (both are counted)."""
    skip_bad_samples: bool = False
    """Skip malformed records (bad JSON, wrong types, missing fields, unknown roles, ...) and count them, instead of stopping at the first."""  # noqa: E501
    data_cache: str = "auto"
    """Tokenized samples are kept here and reused by runs with the same records, tokenizer and data flags: 'auto' (~/.cache/nanotune/tokenized, or $NANOTUNE_CACHE/tokenized), a directory, or 'none'."""  # noqa: E501


@dataclasses.dataclass
class Split:
    samples: list[Sample]
    stats: dict  # counts: records, samples, dropped_too_long, truncated, dropped_untrained, cut_untrained, tokens


def validate(cfg) -> None:
    """Before anything loads (train.py calls each config module's validate)."""
    column_map(cfg.data.dataset_columns)


def column_map(spec: str) -> dict[str, str]:
    """--dataset-columns 'a=b,c=d' as {a: b, c: d}."""
    pairs = [item.split("=") for item in spec.split(",") if item.strip()]
    if any(len(pair) != 2 or not all(name.strip() for name in pair) for pair in pairs):
        raise UserError(f"--dataset-columns {spec!r}: write yours=theirs pairs, e.g. "
                        f"'question=instruction,answer=output'")
    return {yours.strip(): theirs.strip() for yours, theirs in pairs}


def _renamed(records: list[Record], columns: dict[str, str]) -> list[Record]:
    """The records' columns under the names --dataset-columns gives them (a record that lacks one is left to
    the format's own message)."""
    if not columns:
        return records
    return [({columns.get(k, k): v for k, v in r.items()} if isinstance(r, dict) else r, where) for r, where in records]


def _sibling_val_file(train: Path) -> Path | None:
    kind = source_kind(train)  # .jsonl, or .jsonl.gz
    if not kind or train.name[:-len(kind)] not in ("train", "training"):
        return None
    for name in VAL_NAMES:
        if (candidate := train.with_name(name + kind)).is_file():
            return candidate
    return None


# ---------------------------------------------------------------------------- formats


_FORMAT_KEYS = {"chat": "messages", "alpaca": "instruction+output", "completion": "prompt+completion or text"}


def detect_format(record: dict, where: str) -> str:
    if not isinstance(record, dict):
        raise BadRecord(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record or "conversations" in record:
        return "chat"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record or ("prompt" in record and "completion" in record):
        return "completion"
    raise BadRecord(f"{where}: cannot tell the format from keys {sorted(record)}; expected messages (or "
                    f"ShareGPT's conversations), instruction+output, prompt+completion or text; name yours with "
                    f"--dataset-columns, e.g. 'question=instruction,answer=output'")


_JSON_TYPE = {bool: "true or false", int: "a number", float: "a number", list: "a list", dict: "an object"}


def _field(record: dict, key: str, where: str, fmt: str, required: bool = True) -> str:
    if not isinstance(record, dict):
        raise BadRecord(f"{where}: expected a JSON object, got {type(record).__name__}")
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        got = "missing" if key not in record else "empty" if value is None else _JSON_TYPE.get(type(value), "no string")
        hint = f"; under another name, map it: --dataset-columns YOURS={key}" if key not in record else ""
        raise BadRecord(f"{where}: {fmt} records need a string {key!r} ({got}){hint}")
    return encodable(value, where, repr(key))


def _prompt_response(record: dict, fmt: str, where: str) -> tuple[str, str]:
    """(prompt, response) strings for the alpaca and completion formats."""
    if fmt == "alpaca":
        if isinstance(record, dict) and any(record.get(key) for key in ("system", "history")):  # LLaMA-Factory's
            raise BadRecord(f"{where}: alpaca records here have no 'system' or 'history' (multi-turn); write such "
                            f"records as chat messages")
        instruction = _field(record, "instruction", where, fmt)
        inp = _field(record, "input", where, fmt, required=False)
        template = ALPACA_PROMPT if inp else ALPACA_PROMPT_NO_INPUT
        return template.format(instruction=instruction, input=inp), _field(record, "output", where, fmt)
    if isinstance(record, dict) and "prompt" in record:
        return _field(record, "prompt", where, fmt), _field(record, "completion", where, fmt)
    return "", _field(record, "text", where, fmt)


def _encode(tok, text: str, first: bool) -> list[int]:
    """A text's tokens, the tokenizer's BOS first for the first text of a sample unless the text writes
    it itself (text rendered by a chat template does): one BOS, not two."""
    first = first and not (tok.bos_token and text.startswith(tok.bos_token))
    # verbose=False: no warning for a text longer than the tokenizer's model_max_length; --seq-len is the limit
    return tok(text, add_special_tokens=first, verbose=False)["input_ids"]


def _with_eos(ids: list[int], tok) -> list[int]:
    """The sample ends in EOS, once: a text may end in it already, or in EOS and a newline (a chat
    template's rendering ends "<|im_end|>\n" where EOS is <|im_end|>)."""
    last = len(ids) - 1
    while last > 0 and ids[last] != tok.eos_token_id and not tok.decode(ids[last:last + 1]).strip():
        last -= 1  # whitespace after the text's own EOS
    return ids if ids and ids[last] == tok.eos_token_id else ids + [tok.eos_token_id]


def _tokenize_prompt_response(record, fmt, where, tok) -> Sample:
    prompt, response = _prompt_response(record, fmt, where)
    if not response.strip():
        raise BadRecord(f"{where}: empty response; every {fmt} record needs text to train on")
    prompt_ids = _encode(tok, prompt, first=True) if prompt else []
    response_ids = _with_eos(_encode(tok, response, first=not prompt), tok)
    ids = prompt_ids + response_ids
    return Sample(ids, [IGNORE] * len(prompt_ids) + response_ids, len(prompt_ids))


def tokenize(record: dict, fmt: str, where: str, tok, train_on_inputs: bool) -> Sample:
    try:
        sample = _tokenize_as(record, fmt, where, tok)
    except BadRecord as e:
        raise _other_format(record, fmt, where) or e
    if train_on_inputs:
        sample.labels = list(sample.input_ids)
    return sample


def _other_format(record, fmt: str, where: str) -> BadRecord | None:
    """A record of another format than the dataset's (a file that mixes chat and alpaca records, say)."""
    try:
        own = detect_format(record, where)
    except BadRecord:
        return None
    if own == fmt:
        return None
    article = "an" if fmt[0] in "aeiou" else "a"
    return BadRecord(f"{where}: {own} record ({_FORMAT_KEYS[own]}) in {article} {fmt} dataset (its first record's "
                     f"format, or --dataset-format); a dataset holds one format: convert its records to one")


def _tokenize_as(record: dict, fmt: str, where: str, tok) -> Sample:
    if fmt == "chat":
        if tok.chat_template is None:
            raise UserError("--dataset-format chat: the tokenizer has no chat template; pass a "
                            "--tokenizer with one, or use --dataset-format alpaca/completion")
        return tokenize_chat(record, where, tok)
    return _tokenize_prompt_response(record, fmt, where, tok)


# ---------------------------------------------------------------------------- building splits


def _fit(samples: list[Sample], cfg: DataConfig) -> tuple[list[Sample], dict]:
    """Apply --seq-len: drop or cut long samples, drop samples left with no trained target."""
    kept, stats = [], dict(dropped_too_long=0, truncated=0, dropped_untrained=0, cut_untrained=0)
    for s in samples:
        cut = len(s.input_ids) > cfg.seq_len
        if cut and cfg.truncation == "drop":
            stats["dropped_too_long"] += 1
            continue
        if cut:
            whole = (s.response_end or len(s.input_ids)) <= cfg.seq_len  # a cut answer is no exact-match reference
            s = Sample(s.input_ids[:cfg.seq_len], s.labels[:cfg.seq_len],
                       *((s.prompt_len, s.response_end) if whole else (0, None)))
        if all(label == IGNORE for label in s.labels[1:]):  # the first token is never a target
            stats["cut_untrained" if cut else "dropped_untrained"] += 1
            continue
        stats["truncated"] += cut
        kept.append(s)
    return kept, stats


def _each(records: list[Record], make, skip: bool) -> tuple[list, list[str]]:
    """make(record, where) for every record; a malformed one stops the run, or with skip is dropped
    and its reason kept (the reader stores unreadable lines as BadRecord values)."""
    made, bad = [], []
    for record, where in records:
        try:
            if isinstance(record, BadRecord):
                raise record
            made.append(make(record, where))
        except BadRecord as e:
            if not skip:
                raise
            bad.append(str(e))
    return made, bad


def _pretrain_blocks(records: list[Record], tok, seq_len: int, skip: bool) -> tuple[list[Sample], dict, list[str]]:
    def document(record, where):
        return _with_eos(_encode(tok, _field(record, "text", where, "pretrain"), first=True), tok)

    docs, bad = _each(records, document, skip)
    stream = [t for doc in docs for t in doc]
    n = len(stream) // seq_len
    blocks = [stream[i * seq_len:(i + 1) * seq_len] for i in range(n)]
    return [Sample(b, list(b), 0) for b in blocks], dict(dropped_tail_tokens=len(stream) - n * seq_len), bad


def _tokenized(records: list[Record], fmt: str, tok, cfg: DataConfig) -> tuple[list[Sample], list[str]]:
    def tokenize_all():
        return _each(records, lambda r, w: tokenize(r, fmt, w, tok, cfg.train_on_inputs), cfg.skip_bad_samples)

    settings = (fmt, cfg.train_on_inputs, cfg.skip_bad_samples)
    return data_cache.cached(cfg.data_cache, records, settings, tok, tokenize_all, Sample)


def build_split(records: list[Record], fmt: str, tok, cfg: DataConfig, source: str, tokenized=None) -> Split:
    """Tokenize (unless given `_tokenized`'s result), fit to --seq-len, count."""
    if fmt == "pretrain":
        samples, stats, bad = _pretrain_blocks(records, tok, cfg.seq_len, cfg.skip_bad_samples)
    else:
        tokenized, bad = tokenized or _tokenized(records, fmt, tok, cfg)
        samples, stats = _fit(tokenized, cfg)
        if stats["dropped_too_long"]:
            stats["too_long"] = _too_long_note(stats["dropped_too_long"], tokenized, fmt, records, cfg.seq_len)
    if bad:
        stats.update(skipped_bad=len(bad), first_bad=bad[0])
    if not samples:
        raise UserError(_no_samples(len(records), stats, fmt, cfg, source))
    stats.update(records=len(records), samples=len(samples), tokens=sum(len(s.input_ids) for s in samples))
    return Split(samples, stats)


def _no_samples(records: int, stats: dict, fmt: str, cfg: DataConfig, source: str) -> str:
    """Why a split holds no sample, in words, and the fix."""
    if stats.get("skipped_bad") == records:
        return (f"{source}: no usable samples: all {records} records are bad, and --skip-bad-samples left each "
                f"out; the first: {stats['first_bad']}")
    counts = [(stats.get("skipped_bad", 0), "bad (--skip-bad-samples)"),
              (stats.get("dropped_too_long", 0), "longer than --seq-len"),
              (stats.get("dropped_untrained", 0) + stats.get("cut_untrained", 0),
               "with no trained token within --seq-len")]
    why = ", ".join(f"{n} {what}" for n, what in counts if n)
    if fmt == "pretrain":
        hint = "lower --seq-len"
    elif cfg.truncation == "drop":
        hint = "raise --seq-len or pass --truncation truncate"
    else:
        hint = ("raise --seq-len (truncation keeps each sample's first --seq-len tokens, and here they hold "
                "no trained token)")
    return f"{source}: no usable samples out of {records} records ({why or 'none'}); {hint}"


def _too_long_note(dropped: int, samples: list[Sample], fmt: str, records: list[Record], seq_len: int) -> str:
    """The log line on dropped samples: how many, the longest, and the flags that keep them."""
    longest = max(len(s.input_ids) for s in samples)
    documents = fmt == "completion" and isinstance(records[0][0], dict) and "prompt" not in records[0][0]
    keep = ("--dataset-format pretrain cuts {\"text\"} documents into blocks, " if documents else "") + (
        f"--seq-len {longest} keeps them whole, --truncation truncate keeps each one's first {seq_len} tokens")
    return (f"{dropped} of {len(samples)} samples are longer than --seq-len {seq_len} (the longest: {longest:,} "
            f"tokens) and were dropped; {keep}")


def _hold_out(records: list[Record], cfg: DataConfig) -> tuple[list[Record], list[Record]]:
    n_val = int(cfg.val_size * len(records)) if cfg.val_size < 1 else int(cfg.val_size)
    n_val = min(n_val, cfg.max_val_samples, len(records) - 1)
    order = list(range(len(records)))
    random.Random(cfg.val_seed).shuffle(order)
    val = set(order[:n_val])
    return [r for i, r in enumerate(records) if i not in val], [records[i] for i in sorted(val)]


def _val_source(cfg: DataConfig) -> str | None:
    if cfg.val_dataset == "none":
        return None
    if cfg.val_dataset != "auto":
        return cfg.val_dataset
    if Path(cfg.dataset).is_dir() and cfg.dataset_split == "train" and has_split(Path(cfg.dataset), "validation"):
        return cfg.dataset  # the folder's own validation split (read as "validation")
    sibling = _sibling_val_file(Path(cfg.dataset))
    return str(sibling) if sibling else None


def _detect(records: list[Record], skip: bool, source: str) -> str:
    """The format of the first record (with --skip-bad-samples, of the first record that has one)."""
    for record, where in records if skip else records[:1]:
        try:
            if isinstance(record, BadRecord):
                raise record
            return detect_format(record, where)
        except BadRecord:
            if not skip:
                raise
    raise UserError(f"--dataset {source}: no record in a known format (all {len(records)} are malformed); "
                    f"expected messages, instruction+output, prompt+completion or text")


def every_sample_fits(longest: int | None) -> int:
    """An unset seq_len for callers without a model in mind: the longest sample (pretrain: 512-token blocks)."""
    return longest or 512


def load_splits(cfg: DataConfig, tok, choose_seq_len=every_sample_fits) -> tuple[Split, Split | None]:
    """Tokenized (train, validation) splits; validation is None with --val-dataset none. An unset
    --seq-len is set in place to `choose_seq_len(the longest sample's tokens in either split, None for
    pretrain)` (train.py passes core/defaults.py's choice), so the held-out samples fit too."""
    if cfg.dataset == DEMO_DATASET and not Path(DEMO_DATASET).exists():  # the demo run from another directory
        cfg.dataset = str(Path(__file__).resolve().parent.parent / DEMO_DATASET)
    columns = column_map(cfg.dataset_columns)
    records = _renamed(read_records(cfg.dataset, "--dataset", cfg.dataset_subset, cfg.dataset_split), columns)
    fmt = cfg.dataset_format if cfg.dataset_format != "auto" else _detect(records, cfg.skip_bad_samples, cfg.dataset)
    val_source, no_val = _val_source(cfg), None
    if val_source is not None:
        val_records = _renamed(read_records(val_source, "--val-dataset", cfg.dataset_subset, "validation"), columns)
    elif cfg.val_dataset == "auto" and cfg.val_size > 0 and len(records) > 1:
        records, val_records = _hold_out(records, cfg)
        if not val_records:
            no_val = f"--val-size {cfg.val_size:g} of {len(records)} records holds none out; pass a count, e.g. 2"
    else:
        val_records = []
    val_records = val_records[: cfg.max_val_samples]
    val_fmt = fmt if not val_records or val_source is None or cfg.dataset_format != "auto" else (
        _detect(val_records, cfg.skip_bad_samples, val_source))  # a file of its own: its own format
    tokenized = val_tokenized = None
    if cfg.seq_len is None and fmt == "pretrain":  # a block size: no sample length to follow
        cfg.seq_len = choose_seq_len(None)
    elif cfg.seq_len is None:  # tokenized once: the longest sample of either split sets --seq-len, then both fit
        tokenized = _tokenized(records, fmt, tok, cfg)
        val_tokenized = _tokenized(val_records, val_fmt, tok, cfg) if val_records and val_fmt != "pretrain" else None
        held_out = val_tokenized[0] if val_tokenized else []
        cfg.seq_len = choose_seq_len(max((len(s.input_ids) for s in tokenized[0] + held_out), default=2))
    val = None
    if val_records:
        try:
            val = build_split(val_records, val_fmt, tok, cfg, val_source or f"{cfg.dataset} (its held-out records)",
                              val_tokenized)
        except UserError:
            if val_source is None and fmt != "pretrain":  # held out of the user's file: say it of the whole file
                build_split(records, fmt, tok, cfg, cfg.dataset, tokenized)
            if val_source is not None or fmt != "pretrain":  # a file of the user's, or samples: theirs to fix
                raise
            # pretrain blocks: the held-out documents fill no --seq-len block; they train instead
            records, tokenized, no_val = records + val_records, None, (
                f"{len(val_records)} held-out records fill no --seq-len {cfg.seq_len} block, so they train instead; "
                f"a larger --val-size or --val-dataset FILE gives one")
    train = build_split(records, fmt, tok, cfg, cfg.dataset, tokenized)
    if no_val:
        train.stats["no_validation"] = no_val
    if fmt == "chat" and (dropped := template_drops(records, tok)):
        train.stats["template_drops"] = dropped
    if fmt == "completion" and not cfg.train_on_inputs and (rendered := rendered_chats(records, tok)):
        train.stats["rendered_chats"] = rendered
    return train, val


CHAT_MARKUP = ("<|im_start|>", "<|start_header_id|>", "[INST]", "<start_of_turn>", "<|user|>", "<|assistant|>",
               "<｜User｜>")  # ChatML, Llama 3, Mistral, Gemma, Phi-3 / Zephyr, DeepSeek-R1


def rendered_chats(records: list[Record], tok, first: int = 100) -> str | None:
    """A line for the log when {"text"} records hold conversations already rendered by a chat template:
    every token of them trains, the user's turns too, where {"messages"} records would train the answers."""
    texts = [r["text"] for r, _ in records[:first] if isinstance(r, dict) and isinstance(r.get("text"), str)]
    hits = [m for m in CHAT_MARKUP if sum(m in t for t in texts) * 2 > len(texts)]
    if not hits:
        return None
    return (f"most of the first {len(texts)} text records hold chat-template markup ({hits[0]}), so every token "
            f"trains, the user's turns too; as {{\"messages\": [...]}} records only the assistant's answers "
            f"train")


NOTES = ("no_validation", "too_long", "template_drops", "rendered_chats")  # sentences, each logged as a line


_COUNTED = (("dropped_too_long", "dropped as longer than --seq-len"), ("truncated", "cut to --seq-len"),
            ("cut_untrained", "dropped as cut to --seq-len before their first trained token"),
            ("dropped_untrained", "dropped with no token to train"), ("skipped_bad", "skipped as bad"),
            ("dropped_tail_tokens", "left out as tokens after the last full block"))


def _counts(stats: dict) -> str:
    """A split's stats as the log's words: '285 samples from 285 records, 9,245 tokens; 3 cut to --seq-len'."""
    parts = [f"{count(stats['samples'], 'sample')} from {count(stats['records'], 'record')}, "
             f"{count(stats['tokens'], 'token')}"]
    parts += [f"{stats[key]:,} {words}" for key, words in _COUNTED if stats.get(key)]
    if stats.get("first_bad"):
        parts.append(f"the first: {stats['first_bad']}")
    return "; ".join(parts)


def describe(train: Split, val: Split | None) -> str:
    """The run log's lines on the splits."""
    lines = []
    for name, split in (("train", train), ("val", val)):
        if split is not None:
            lines.append(f"data: {name} {_counts(split.stats)}")
            lines += [f"data: {name}: {split.stats[note]}" for note in NOTES[1:] if note in split.stats]
    if val is None:
        why = f" ({train.stats['no_validation']})" if "no_validation" in train.stats else ""
        lines.append(f"data: no validation set{why}")
    return "\n".join(lines)
