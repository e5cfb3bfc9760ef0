"""The tokenized-sample cache: a run reuses the samples an earlier run tokenized from the same records.

    python train.py --dataset chats.jsonl                     # tokenizes, and caches the samples
    python train.py --dataset chats.jsonl --lr 1e-4           # the same data: loads them
    python train.py --dataset chats.jsonl --data-cache none   # always tokenize

Tokenizing a chat dataset renders each conversation's template once per assistant turn, on every
run of an ablation sweep (start-up before and after: benchmarks/results/2026-12-03-data-cache-cpu.md).
The key hashes everything the samples depend on: the records (their text and where they come from,
since skipped records are reported by file and line), the format, --train-on-inputs,
--skip-bad-samples, the tokenizer (its class, serialized vocabulary and rules, special tokens, chat
template and init settings), the transformers and tokenizers releases, and the source of core/data.py,
core/chat.py and core/records.py, so any change there tokenizes anew.

One .npz file a key, written to a temporary name and renamed, so ranks that tokenize side by side
never read a partial file; an unreadable one is tokenized again. 'auto' is $NANOTUNE_CACHE/tokenized,
by default ~/.cache/nanotune/tokenized. Pretrain documents are not cached.
"""

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

DATA_SOURCES = [Path(__file__).with_name(name) for name in ("data.py", "chat.py", "records.py", "sources.py")]


def cache_dir(setting: str) -> Path | None:
    if setting == "none":
        return None
    if setting != "auto":
        return Path(setting).expanduser()
    root = os.environ.get("NANOTUNE_CACHE") or Path.home() / ".cache" / "nanotune"
    return Path(root) / "tokenized"


def cached(setting: str, records: list, settings: tuple, tok, tokenize, sample_type):
    """tokenize() -> (samples, bad reasons), or the same loaded from the cache under `setting`
    (samples rebuilt as sample_type(input_ids, labels, prompt_len, response_end))."""
    where = cache_dir(setting)
    if where is None:
        return tokenize()
    path = where / f"{_key(records, settings, tok)}.npz"
    hit = _load(path, sample_type)
    if hit is not None:
        return hit
    samples, bad = tokenize()
    _save(path, samples, bad)
    return samples, bad


def _key(records: list, settings: tuple, tok) -> str:
    h = hashlib.sha256(b"".join(source.read_bytes() for source in DATA_SOURCES))
    h.update(json.dumps([repr(s) for s in settings]).encode())
    h.update(_tokenizer_fingerprint(tok).encode())
    for record, where in records:
        h.update(json.dumps([str(record) if isinstance(record, Exception) else record, where], sort_keys=True,
                            default=str).encode())
    return h.hexdigest()[:32]


def _tokenizer_fingerprint(tok) -> str:
    import tokenizers
    import transformers

    backend = getattr(tok, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    # the releases too: chat templates render through transformers, tokens come from tokenizers
    versions = [transformers.__version__, tokenizers.__version__]
    return json.dumps([type(tok).__name__, rules, tok.chat_template, sorted(map(str, tok.all_special_tokens)),
                       tok.init_kwargs, versions], sort_keys=True, default=str)  # init_kwargs: add_bos_token, ...


def _load(path: Path, sample_type):
    try:
        with np.load(path) as f:
            ids, labels, ends = f["ids"].tolist(), f["labels"].tolist(), np.cumsum(f["lengths"]).tolist()
            meta = json.loads(str(f["meta"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # missing or unreadable: tokenize again
        return None
    starts = [0] + ends[:-1]
    spans = zip(starts, ends, meta["spans"], strict=True)
    return [sample_type(ids[a:b], labels[a:b], p, r) for a, b, (p, r) in spans], meta["bad"]


def _save(path: Path, samples: list, bad: list[str]) -> None:
    arrays = dict(ids=np.array([t for s in samples for t in s.input_ids], dtype=np.int64),
                  labels=np.array([t for s in samples for t in s.labels], dtype=np.int64),
                  lengths=np.array([len(s.input_ids) for s in samples], dtype=np.int64),
                  meta=np.array(json.dumps({"spans": [[s.prompt_len, s.response_end] for s in samples], "bad": bad})))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    except OSError:  # a read-only or missing home: the run goes on without a cache
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError:  # a full disk: the same
        Path(tmp).unlink(missing_ok=True)
