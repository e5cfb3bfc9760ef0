"""Optional packages: a run imports the heavy optional libraries only when its flags use them.

nanotune imports torchao (--qat, --fp8), DeepSpeed (--deepspeed), bitsandbytes (--qlora, --lora-8bit),
Liger (--liger, --loss liger), cut_cross_entropy (--loss cce) and the attention kernels (--attn on a
GPU) inside the functions that use them. Two of them are also imported by other libraries, on their
own, whenever they are installed: transformers 5.24 imports torchao (its torchao quantizer's saving
helpers) as it loads any model, and accelerate 1.15 imports DeepSpeed as transformers saves one. Each
costs import time and prints its import-time lines (torchao: "Failed to load ... .so" and torch's pytree
deprecations; DeepSpeed: "Setting accelerator to CPU"). For the length of a run, `keep_out` marks
those that its flags do not use as not importable (None in sys.modules, Python's own marker), and the
libraries' probes (importlib.util.find_spec) then find them absent.

bitsandbytes is not kept out: peft 0.21 imports it on its own for --lora, but caches its probe
(lru_cache), so a --qlora run later in the same process (the tests) would find it missing.

Where a library that a flag does use prints at import, its module filters those lines by logger or
warning and message: `quiet_torchao` here (--qat and --fp8 share it), the others next to their import.
"""

import contextlib
import functools
import logging
import sys
import warnings


def unused(cfg=None) -> list[str]:
    """The packages that third-party libraries would import for this run although its flags (train.py's
    Config; None: export.py, which uses neither) do not use them; one imported already stays."""
    uses = {} if cfg is None else {"torchao": cfg.qat.qat or cfg.fp8.fp8 != "none",
                                   "deepspeed": cfg.deepspeed.deepspeed is not None}
    return [name for name in ("torchao", "deepspeed") if not uses.get(name) and name not in sys.modules]


@contextlib.contextmanager
def keep_out(names: list[str]):
    """`import name` raises ModuleNotFoundError and find_spec(name) is None inside; as before after."""
    for name in names:
        sys.modules[name] = None
    try:
        yield
    finally:
        for name in names:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def drop_records(logger: str, *starts: str) -> None:
    """Drop the records of one library logger whose message starts with one of `starts`."""
    logging.getLogger(logger).addFilter(lambda record: not record.getMessage().startswith(starts))


@functools.cache
def quiet_torchao() -> None:
    """Before importing torchao 0.18 (torch 2.13): it logs a failure for each optional kernel library that
    does not load here (a CPython 3.10 build, sm90a CUTLASS kernels; QAT and FP8 training use neither),
    registers two enums in a way torch now calls deprecated, and on Python 3.12 its quant_api.py has an
    invalid escape sequence that compiling it warns about."""
    drop_records("torchao", "Failed to load /")
    drop_records("torch.utils._pytree", "<enum 'KernelPreference'>", "<enum 'ScaleCalculationMode'>")
    warnings.filterwarnings("ignore", "invalid escape sequence", SyntaxWarning, r".*torchao")
