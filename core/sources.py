"""Where a dataset's records come from: a local file (.jsonl, .json, either gzipped; .parquet, .csv,
.tsv), a directory (a `datasets` save_to_disk, or data files such as a hub snapshot's shards), or a
Hugging Face hub id. Each record comes with where it came from, which every error about it names: "file:line"
and "line n" count lines from 1, as editors do; "item i" of a JSON array and "row i" of an Arrow table (parquet,
save_to_disk, the hub) count from 0, as `data[i]` and `dataset[i]` do. A line that cannot be read is kept
as a BadRecord, so --skip-bad-samples can count it (core/data.py turns records into samples)."""

import csv
import gzip
import json
import re
import tempfile
import zlib
from pathlib import Path

from core import UserError
from core.records import BadRecord, Record


def _parse_line(raw: bytes, where: str):
    """One jsonl line: its value, None for a blank line, or a BadRecord saying what is wrong."""
    try:
        line = raw.decode("utf-8").strip().lstrip("\ufeff")  # a byte-order mark is not an error
    except UnicodeDecodeError as e:
        return BadRecord(f"{where}: invalid UTF-8 at byte {e.start}; re-encode the file as UTF-8")
    if not line:
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        at = " " if e.msg.endswith(" at") else " at "  # "Unterminated string starting at" names its column itself
        return BadRecord(f"{where}: invalid JSON ({e.msg}{at}column {e.colno}); fix or remove the line")
    except RecursionError:
        return BadRecord(f"{where}: JSON nested too deeply to read; fix or remove the line")


def _read_bytes(path: Path) -> bytes:
    if path.suffix.lower() != ".gz":
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as e:  # not gzip at all, or cut short
        raise UserError(f"{path}: not a whole gzip file ({_first_line(e) or type(e).__name__}); re-compress it, "
                        f"or drop the .gz from its name if it is plain text") from None


def _read_jsonl(path: Path) -> list[Record]:
    data, records = _read_bytes(path), []
    first = next((line.strip() for line in data.lstrip(b"\xef\xbb\xbf").splitlines() if line.strip()), b"")
    if first == b"[" and _is_array(data):  # a pretty-printed array: every line of it would be reported bad
        raise UserError(f"{path}: one JSON array, not one object per line; name the file .json")
    for n, raw in enumerate(data.splitlines(), start=1):
        where = f"{path}:{n}"
        if (record := _parse_line(raw, where)) is not None:
            records.append((record, where))
    return records


def _is_array(data: bytes) -> bool:
    try:
        return isinstance(json.loads(data.decode("utf-8-sig")), list)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False


def _read_json(path: Path) -> list[Record]:
    try:
        data = json.loads(_read_bytes(path).decode("utf-8-sig"))  # a byte-order mark is not an error
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: invalid UTF-8 at byte {e.start}; re-encode the file as UTF-8") from None
    except (json.JSONDecodeError, RecursionError) as e:
        lines = " (one object per line is JSON Lines: name the file .jsonl)" if "Extra data" in str(e) else ""
        raise UserError(f"{path}: not valid JSON ({type(e).__name__}: {e}){lines}; "
                        "a .json dataset is one array of objects") from None
    if isinstance(data, dict) and len(lists := [k for k, v in data.items() if isinstance(v, list)]) > 1:
        raise UserError(f"{path}: holds the lists {', '.join(lists)}; put each split in a file of its own "
                        f"(train.json beside validation.json is found as its validation data)")
    if isinstance(data, dict) and len(lists := [k for k in ("data", "train") if isinstance(data.get(k), list)]) == 1:
        data = data[lists[0]]  # {"data": [...]} or {"train": [...]}, as some exports wrap the array
    if not isinstance(data, list):
        raise UserError(f"{path}: a .json dataset must be an array of objects (use .jsonl for one per line)")
    return [(r, f"{path}: item {i}") for i, r in enumerate(data)]


def _read_table(path: Path) -> list[Record]:
    # datasets converts the file to an Arrow copy in its cache (~/.cache/huggingface by default): a copy of
    # the user's data in their home directory, kept after the run. Here it lives in TMPDIR while read.
    with tempfile.TemporaryDirectory(prefix="nanotune-table-") as arrow_copy:
        table = _load_table(path, arrow_copy)
        if source_kind(path) == ".parquet":
            return [(_present(r), f"{path}: row {i}") for i, r in enumerate(table)]
        lines = _row_lines(path, _as_text(path)["sep"])
        if len(lines) != len(table):  # the two parsers disagree on an odd file: count a line a row after the header
            lines = range(2, len(table) + 2)
        return [(dict(r), f"{path}: line {n}") for r, n in zip(table, lines)]  # flat: an empty cell is None


def _load_table(path: Path, cache_dir: str):
    datasets = _quiet_datasets()
    try:
        return datasets.load_dataset(_BUILDERS[source_kind(path)], data_files=str(path), split="train",
                                     cache_dir=cache_dir, **_as_text(path))
    except Exception as e:  # pyarrow/pandas raise many types for a damaged file; datasets wraps the cause
        cause = e.__cause__ or e.__context__ or e
        raise UserError(f"{path}: could not read as {source_kind(path)[1:]} ({type(cause).__name__}: "
                        f"{_first_line(cause)})") from e


def _row_lines(path: Path, sep: str) -> list[int]:
    """The line each CSV row starts on, after the header: a quoted cell may span lines."""
    starts = []
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.reader(f, delimiter=sep)
        next(reader, None)
        end = reader.line_num
        for row in reader:
            if row:  # blank lines are no rows, for pandas either
                starts.append(end + 1)
            end = reader.line_num
    return starts


def _as_text(path: Path) -> dict:
    """A CSV's (or TSV's) cells are text: a column of numbers ("2", "4") holds answers, not ints (pandas would
    infer int64, and records need strings). Parquet keeps its own types."""
    if source_kind(path) == ".parquet":
        return {}
    datasets = _quiet_datasets()

    sep = "\t" if source_kind(path) == ".tsv" else ","
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as f:  # Excel's "CSV UTF-8" opens with a BOM
        header = next(csv.reader(f, delimiter=sep), [])
    return {"features": datasets.Features({name: datasets.Value("string") for name in header}),
            "encoding": "utf-8-sig", "sep": sep}


def _present(value):
    """A row read through Arrow without the keys it never had: Arrow gives every row of a nested column
    all its rows' keys, null where a row has none (one message's "weight", another tool's parameter)."""
    if isinstance(value, dict):
        return {k: _present(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_present(v) for v in value]
    return value


def _quiet_datasets():
    """The datasets package, its progress bars and log lines off: the run's log is nanotune's."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


_READERS = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".parquet": _read_table,
            ".csv": _read_table, ".tsv": _read_table, ".jsonl.gz": _read_jsonl, ".ndjson.gz": _read_jsonl,
            ".json.gz": _read_json}
_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}  # datasets' loader for each table file


def source_kind(path: Path) -> str:
    """The reader's key: the suffix, or the two of a gzipped JSON file (.jsonl.gz), in lower case."""
    return ("".join(path.suffixes[-2:]) if path.suffix.lower() == ".gz" else path.suffix).lower()


def _read_hub(name: str, subset: str | None, split: str, flag: str) -> list[Record]:
    datasets = _quiet_datasets()

    try:
        table = datasets.load_dataset(name, subset, split=split)
    except Exception as e:  # network, missing repo, missing split: all end the same way for a user
        raise UserError(f"{flag} {name!r}: could not load from the hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); check the id, --dataset-split, "
                        f"network access, or pass a local file") from e
    return [(_present(r), f"{name}[{split}] row {i}") for i, r in enumerate(table)]


# A split's names in a directory's file names and a DatasetDict's keys, first found first taken
SPLIT_NAMES = {"train": ("train", "training"), "validation": ("validation", "valid", "val", "dev", "eval", "test")}


def _names(split: str) -> tuple[str, ...]:
    return SPLIT_NAMES.get(split, (split,))


def _named(path: Path, name: str, root: Path) -> bool:
    """Whether a data file under `root` is named for a split, by its name or a folder's (train/part-0.jsonl)."""
    text = path.relative_to(root).as_posix()[:-len(source_kind(path))]
    return bool(re.search(rf"(^|[-_./]){re.escape(name)}([-_./]|$)", text))


def _data_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if source_kind(p) in _READERS and p.is_file())


def has_split(path: Path, split: str) -> bool:
    """Whether a directory holds `split` of its own: a DatasetDict's key, or data files named for it."""
    if (path / "dataset_dict.json").is_file():
        keys = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        return any(name in keys for name in _names(split))
    return path.is_dir() and any(_named(f, name, path) for f in _data_files(path) for name in _names(split))


def _read_dir(path: Path, flag: str, split: str) -> list[Record]:
    """A directory: a `datasets` save_to_disk (its `split`, for a DatasetDict), or data files, such as a
    hub snapshot's shards (those named after `split` where some are: data/train-00000-of-00002.parquet);
    a plain folder of files, none named for a split, is read whole."""
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        return _read_saved(path, flag, split)
    files = _data_files(path)
    if not files:
        raise UserError(f"{flag} {path}: a directory with no .jsonl, .json, .parquet, .csv or .tsv file and no "
                        f"datasets save_to_disk")
    for name in _names(split):
        if named := [f for f in files if _named(f, name, path)]:
            return [record for f in named for record in _READERS[source_kind(f)](f)]
    splits = sorted({n for names in SPLIT_NAMES.values() for n in names for f in files if _named(f, n, path)})
    if splits:  # files named for other splits: reading them all would mix the splits
        raise UserError(f"{flag} {path}: no file named for the {split!r} split (it has files named "
                        f"{', '.join(splits)}); pass the file itself"
                        + (", or --dataset-split NAME" if flag == "--dataset" else ""))
    return [record for f in files for record in _READERS[source_kind(f)](f)]


def _read_saved(path: Path, flag: str, split: str) -> list[Record]:
    datasets = _quiet_datasets()
    try:
        table = datasets.load_from_disk(str(path))
    except Exception as e:  # a damaged or partial save_to_disk
        raise UserError(f"{flag} {path}: not a readable datasets save_to_disk ({type(e).__name__}: "
                        f"{_first_line(e)}); save it again, or pass its data files") from None
    if isinstance(table, datasets.DatasetDict):
        if not (found := [name for name in _names(split) if name in table]):
            fix = "pass --dataset-split NAME" if flag == "--dataset" else "pass a file or folder of held-out records"
            raise UserError(f"{flag} {path}: no split {split!r} (it has {', '.join(table)}); {fix}")
        table = table[found[0]]
    return [(_present(r), f"{path}: row {i}") for i, r in enumerate(table)]


def _looks_local(source: str) -> bool:
    """A path the user meant on this disk (not a hub id such as org/name): absolute, relative to ., or under
    a directory that exists here."""
    path = Path(source)
    return source.startswith(("/", ".", "~")) or (path.parent != Path(".") and path.parent.is_dir())


def read_records(source: str, flag: str, subset: str | None = None, split: str = "train") -> list[Record]:
    path = Path(source).expanduser()
    if source_kind(path) in _READERS:
        if not path.is_file():
            raise UserError(f"{flag} {source}: file not found")
        records = _READERS[source_kind(path)](path)
    elif path.is_dir():
        records = _read_dir(path, flag, split)
    elif path.exists():
        raise UserError(f"{flag} {source}: unsupported file type; use .jsonl (or .ndjson), .json (either "
                        f"gzipped: .gz), .parquet, .csv or .tsv")
    elif _looks_local(source):
        raise UserError(f"{flag} {source}: no such file or directory")
    else:
        records = _read_hub(source, subset, split, flag)
    if not records:
        raise UserError(f"{flag} {source}: the dataset is empty")
    return records
