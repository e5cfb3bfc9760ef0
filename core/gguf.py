"""--model FILE.gguf: a GGUF checkpoint (llama.cpp's format), turned once into a Hugging Face directory.

    python train.py --model ~/models/SmolLM2-135M-Instruct.Q4_1.gguf --lora --dataset chats.jsonl

transformers reads GGUF through the `gguf` package (pip install gguf) and dequantizes each tensor to
fp32, so training starts from the weights exactly as the file holds them. The directory (fp32 weights,
config, and the tokenizer with the chat template from the file's metadata) is written once under
$NANOTUNE_CACHE/gguf (default ~/.cache/nanotune/gguf), named after the file, its size and its
modification time, and later runs reuse it. From there the run is an ordinary one on a local
checkpoint: --qlora quantizes it, and the saved adapter and export.py name that directory as the base.
It appears by a rename once complete, under a file lock, so ranks of one job and runs of one sweep
convert it once, and a run killed mid-way leaves no partial directory.
"""

import contextlib
import fcntl
import hashlib
import io
import os
import tempfile
from pathlib import Path

from core import UserError


def is_gguf(path: str) -> bool:
    return path.endswith(".gguf")


def cache_root() -> Path:
    return Path(os.environ.get("NANOTUNE_CACHE") or Path.home() / ".cache" / "nanotune") / "gguf"


def hf_dir(path: str, say=print, flag: str = "--model") -> str:
    """The Hugging Face directory of the GGUF file at `path` (given as `flag`), converted on first use."""
    src = Path(path).expanduser()
    if not src.is_file():
        raise UserError(f"{flag} {path}: no such GGUF file")
    try:
        import gguf  # noqa: F401  (transformers reads the file through it)
    except ImportError as e:
        raise UserError(f"{flag} {path}: reading a GGUF file needs the gguf package; pip install gguf") from e
    out = _cache_dir(src, f"{flag} {path}")
    with _locked(out.parent / f".{out.name}.lock"):
        if not out.is_dir():
            say(f"model: converting {src.name} to a Hugging Face directory, once: {out}")
            _publish(src, out)
    return str(out)


def _cache_dir(src: Path, given: str) -> Path:
    """The file's directory under the cache, named after its path, size and modification time."""
    stat = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_root() / f"{src.stem}-{key}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{given}: cannot write its converted directory under {out.parent} ({e.strerror}); "
                        f"set NANOTUNE_CACHE to a writable folder") from e
    return out


def _publish(src: Path, out: Path) -> None:
    """Convert into a temporary directory beside `out`, then rename it: never a partial `out`."""
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".tmp-{out.name}-") as tmp:
        convert(src, Path(tmp) / "hf")
        try:
            os.rename(Path(tmp) / "hf", out)
        except OSError:  # another node published it first, where the lock does not reach (NFS)
            if not out.is_dir():
                raise


@contextlib.contextmanager
def _locked(lock: Path):
    with lock.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield


def convert(src: Path, out: Path) -> None:
    """Dequantize the GGUF file `src` and save it, fp32 weights and tokenizer, as a directory `out`."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    where = dict(pretrained_model_name_or_path=src.parent, gguf_file=src.name)
    try:
        tok = AutoTokenizer.from_pretrained(**where)
        # transformers 5.24 draws a plain tqdm bar over the tensors, which no setting of its own turns off
        with contextlib.redirect_stderr(io.StringIO()):
            loaded = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:  # an architecture or tensor type transformers cannot read
        raise UserError(f"--model {src}: transformers cannot read this GGUF file ({str(e).splitlines()[0]}); "
                        f"convert it to a Hugging Face checkpoint and pass that directory") from e
    config = loaded.config
    # From here the weights are plain fp32: a saved GGUF quantization config would send from_pretrained
    # looking for the .gguf file again. A fresh model takes the tensors as they are (no second copy).
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.save_pretrained(out)
    _tokenizer_as_the_file_says(tok, src)
    tok.save_pretrained(out)


def _tokenizer_as_the_file_says(tok, src: Path) -> None:
    """The end-of-turn token and the chat template from the file's metadata. transformers 5.17 read
    SmolLM2's eos as <|im_start|> where the file says <|im_end|>, so generation would not stop; a
    release that does not copy the chat template into the tokenizer would lose the chat format."""
    import gguf

    fields = gguf.GGUFReader(src).fields
    if "tokenizer.ggml.eos_token_id" in fields:
        eos = fields["tokenizer.ggml.tokens"].contents(int(fields["tokenizer.ggml.eos_token_id"].contents()))
        if tok.eos_token != eos:
            tok.eos_token = eos
    if tok.chat_template is None and "tokenizer.chat_template" in fields:
        tok.chat_template = fields["tokenizer.chat_template"].contents()
