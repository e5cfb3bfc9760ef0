"""Merge a LoRA adapter into its base model and save a plain Hugging Face model (safetensors).

    python export.py --adapter runs/x/final --out merged/
    python export.py --adapter runs/x/final --out merged/ --base meta-llama/Llama-3.1-8B --dtype bf16

The base is found, unless --base names it: the random-weight base a preset run saved beside its
adapter (final/base), else adapter_config.json's base_model_name_or_path, else --model in the
run's config.json. A GGUF base (--base FILE.gguf, or the run's --model) is converted as train.py
does (core/gguf.py), again if its converted directory has left the cache. It is loaded unquantized
(a QLoRA or 8-bit adapter too) and the adapter is added into its weights; see features/lora.py.
A --out that holds files is refused unless --overwrite.
"""

import dataclasses
import json
import sys
from pathlib import Path
from typing import Literal

import tyro

from core import UserError, gguf, optional
from features.lora import base_of, merge_and_save


@dataclasses.dataclass
class ExportConfig:
    adapter: str
    """The adapter directory (a run's final/, with adapter_config.json)."""
    out: str
    """Where to write the merged model and its tokenizer."""
    base: str | None = None
    """Base model id or directory; default: read from the adapter and its run (see above)."""
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """Dtype of the merged weights; auto keeps the base checkpoint's own."""
    overwrite: bool = False
    """Replace what --out holds (without it, a --out with files in it is refused)."""


def check_out(cfg: ExportConfig) -> None:
    """--out is replaced whole: never a directory of other files, nor one that holds the adapter."""
    out, adapter = Path(cfg.out).resolve(), Path(cfg.adapter).resolve()
    if out == adapter or out in adapter.parents:
        raise UserError(f"--out {cfg.out} holds the adapter {cfg.adapter}; write the merged model elsewhere")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not cfg.overwrite:
        raise UserError(f"--out {cfg.out} already holds {', '.join(held[:4])}{', ...' if len(held) > 4 else ''}; "
                        f"pass a new or empty directory, or --overwrite to replace it")


def _gguf_of_run(adapter: str) -> str | None:
    """The GGUF file a run's --model named (run.json keeps the command line; config.json the conversion)."""
    try:
        argv = json.loads((Path(adapter).parent / "run.json").read_text())["argv"]
    except (OSError, KeyError, ValueError):
        return None
    given = [b for a, b in zip(argv, argv[1:]) if a == "--model"] + [a[8:] for a in argv if a.startswith("--model=")]
    return next((m for m in given if gguf.is_gguf(m)), None)


def find_base(cfg: ExportConfig) -> str:
    base = cfg.base or base_of(cfg.adapter)
    if base is None:
        raise UserError(f"--adapter {cfg.adapter}: cannot tell its base model (no base/, no "
                        f"base_model_name_or_path, no run config.json); pass --base")
    if not cfg.base and not Path(base).exists() and (file := _gguf_of_run(cfg.adapter)):
        base = file  # a GGUF run's converted base, gone from the cache: converted again
    return gguf.hf_dir(base, flag="--base") if gguf.is_gguf(base) else base


def main(argv: list[str] | None = None) -> int:
    cfg = tyro.cli(ExportConfig, args=argv, description=__doc__.split("\n\n")[0])
    try:
        check_out(cfg)
        base = find_base(cfg)
        with optional.keep_out(optional.unused()):  # what transformers would import on its own (core/optional.py)
            out = merge_and_save(base, cfg.adapter, cfg.out, cfg.dtype)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged {cfg.adapter} into {base}: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
