"""Merge a LoRA adapter into its base model and save a plain Hugging Face model (safetensors).

    python export.py --adapter runs/x/final --out merged/
    python export.py --adapter runs/x/final --out merged/ --base meta-llama/Llama-3.1-8B --dtype bf16

The base is found, unless --base names it: the random-weight base a preset run saved beside its
adapter (final/base), else adapter_config.json's base_model_name_or_path, else --model in the
run's config.json. It is loaded unquantized (a QLoRA or 8-bit adapter too) and the adapter is
added into its weights; see features/lora.py.
"""

import dataclasses
import sys
from typing import Literal

import tyro

from core import UserError, optional
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


def main(argv: list[str] | None = None) -> int:
    cfg = tyro.cli(ExportConfig, args=argv, description=__doc__.split("\n\n")[0])
    try:
        base = cfg.base or base_of(cfg.adapter)
        if base is None:
            raise UserError(f"--adapter {cfg.adapter}: cannot tell its base model (no base/, no "
                            f"base_model_name_or_path, no run config.json); pass --base")
        with optional.keep_out(optional.unused()):  # what transformers would import on its own (core/optional.py)
            out = merge_and_save(base, cfg.adapter, cfg.out, cfg.dtype)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged {cfg.adapter} into {base}: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
