"""Attention backends, each one document-aware on packed batches, through transformers' own hooks.

    python train.py                                   # --attn auto: flash on a CUDA GPU, else sdpa
    python train.py --attn sdpa                       # CPU and GPU
    python train.py --packing --attn flash            # FlashAttention varlen on CUDA
    python train.py --packing --attn flex             # compiled flex_attention, document-causal BlockMask

How each backend keeps packed documents apart (no transformers code is patched):
  eager, sdpa, flex  transformers' mask builders detect documents from `position_ids` restarting at
                     0 (masking_utils.find_packed_sequence_indices, transformers 5.x) and build a
                     block-diagonal causal mask (flex: a BlockMask) -- so we pass position_ids.
  flash              FlashAttention-4 (`flash_attn.cute`, Hopper/Blackwell) or FlashAttention-2
                     (`flash_attn`) through transformers' flash_attention_4/2, else PyTorch's own
                     FlashAttention varlen kernel (`torch.nn.attention.varlen`) registered with
                     `AttentionInterface.register`; all get the documents as `cu_seq_lens_q/k` and
                     `max_length_q/k` (transformers' FlashAttentionKwargs), so no per-layer recount.
  xformers           memory_efficient_attention with a BlockDiagonalCausalMask, registered likewise.
Sliding-window models (Mistral) work with every backend; logit soft-capping (Gemma 2) only with
eager and flex. Generation (exact-match evaluation) always runs on sdpa with a padding mask.
"""

import contextlib
import dataclasses
import functools
import inspect
import warnings
from typing import Literal

import torch

from core import UserError, optional

NATIVE = {"eager": "eager", "sdpa": "sdpa", "flex": "flex_attention"}
CUSTOM = ("nanotune_varlen", "nanotune_xformers")  # our registered implementations
FLASH_KWARGS = ("flash_attention_2", "flash_attention_4") + CUSTOM  # take cu_seq_lens_* kwargs
# The longest document a varlen kernel is told of is a bound that sizes its grid, nothing more. FlashAttention-4
# builds other kernels for a bound within one tile (at most 2 x 128 rows), about 3 s each, the first time a row of
# only short documents comes: mid-run stalls (benchmarks/results/2026-12-06-fa4-short-rows-h100.md). A floor above
# every such tile keeps one kernel; the empty tiles it adds to such a row end at once.
LONGEST_FLOOR = 512


@dataclasses.dataclass
class AttentionConfig:
    attn: Literal["auto", "eager", "sdpa", "flex", "flash", "xformers"] = "auto"
    """Attention kernel: auto (flash on a CUDA GPU when installed, else sdpa), eager (reference), sdpa, flex (compiled flex_attention), flash (FA4/FA2/torch varlen), xformers."""  # noqa: E501


def _importable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:  # a broken CUDA extension raises more than ImportError
        return False


def resolve(cfg: AttentionConfig, device: torch.device, model_config=None) -> str:
    """The transformers attn_implementation to use; refuses what cannot run here, with the fix."""
    softcap = getattr(model_config, "attn_logit_softcapping", None) if model_config is not None else None
    if cfg.attn == "auto":
        return _fastest(device, model_config, softcap)
    if cfg.attn in NATIVE:
        if cfg.attn == "flex" and device.type != "cuda":  # torch 2.13: "does not support backward on CPU"
            raise UserError("--attn flex: FlexAttention has no backward pass on CPU; use --attn sdpa here "
                            "(the same masks), flex on a CUDA GPU")
        if softcap and cfg.attn == "sdpa":
            raise UserError("--attn sdpa: this model soft-caps attention logits, which SDPA cannot; "
                            "use --attn flex or --attn eager")
        return NATIVE[cfg.attn]
    if device.type != "cuda":
        raise UserError(f"--attn {cfg.attn} needs a CUDA GPU; on {device.type} use --attn sdpa or --attn flex")
    if softcap:
        raise UserError(f"--attn {cfg.attn}: this model soft-caps attention logits; use --attn flex or eager")
    if cfg.attn == "xformers":
        if not _importable("xformers.ops"):
            raise UserError("--attn xformers: xformers is not installed (or its kernels do not load for this "
                            "torch); pip install xformers, or use --attn flash, flex or sdpa")
        _register()
        return "nanotune_xformers"
    if torch.cuda.get_device_capability(device)[0] >= 9 and _importable("flash_attn.cute"):
        # the CuTe DSL compiler under flash-attn-4 4.0.0b36 warns at each kernel compile that FA4's own
        # aux_data argument is no JIT argument: a message for FA4's authors, not for a training run
        warnings.filterwarnings("ignore", r"Argument aux_data \(position \d+\) cannot be converted to a "
                                r"JitArgument", UserWarning)
        quiet_fp32_masters()
        return "flash_attention_4"
    if _importable("flash_attn"):
        quiet_fp32_masters()
        return "flash_attention_2"
    if not _importable("torch.nn.attention.varlen"):
        raise UserError("--attn flash: no FlashAttention found (pip install flash-attn-4 on Hopper/Blackwell, "
                        "flash-attn elsewhere, or torch >= 2.10 for its built-in varlen kernel); or use --attn sdpa")
    if getattr(model_config, "sliding_window", None) and "window_size" not in _varlen_params():
        raise UserError(f"--attn flash: this model uses a sliding window, which torch {torch.__version__}'s "
                        f"varlen kernel lacks; pip install flash-attn-4 (Hopper) or use --attn flex")
    _register()
    return "nanotune_varlen"


# transformers' notices for FlashAttention on fp32 weights, the --precision bf16-mixed case (by logger)
FP32_NOTICES = {
    "transformers.modeling_utils": tuple(f"Flash Attention {v} only supports torch.float16 and torch.bfloat16 dtypes"
                                         for v in (2, 3, 4)),
    "transformers.modeling_flash_attention_utils": ("Casting fp32 inputs back to ",),
}


@functools.cache
def quiet_fp32_masters() -> None:
    """Drop transformers' two notices about FlashAttention on fp32 weights. A full fine-tune keeps fp32
    masters by design (--precision bf16-mixed): transformers reads the storage dtype and advises bf16
    autocast, which the run already uses, and it casts the queries and keys back to bf16 once RoPE's
    fp32 tables have promoted them, which is the cast wanted there. Both are noise in such a run's log."""
    for logger, starts in FP32_NOTICES.items():
        optional.drop_records(logger, *starts)


def _fastest(device: torch.device, model_config, softcap) -> str:
    """--attn auto: the fastest backend that is installed and exact here. On packed rows the varlen
    kernels skip the masked-out blocks that sdpa must compute through a dense mask, so they are many
    times faster there (benchmarks/results/2026-11-24-attention.md)."""
    if device.type != "cuda":
        return "eager" if softcap else "sdpa"
    if softcap:
        return "flex_attention"
    try:
        return resolve(AttentionConfig("flash"), device, model_config)
    except UserError:  # no FlashAttention kernel here, or none with this model's sliding window
        return "sdpa"


def describe(impl: str) -> str:
    return {"flash_attention_4": "FlashAttention-4 (flash_attn.cute)", "flash_attention_2": "FlashAttention-2",
            "nanotune_varlen": "PyTorch FlashAttention varlen (torch.nn.attention.varlen)",
            "nanotune_xformers": "xformers memory_efficient_attention"}.get(impl, impl)


def model_inputs(batch: dict, impl: str) -> dict:
    """The model's keyword arguments for a batch under attention implementation `impl`."""
    inputs = {"input_ids": batch["input_ids"]}
    if "attention_mask" in batch and impl not in CUSTOM + ("flex_attention",):
        inputs["attention_mask"] = batch["attention_mask"]  # padded rows: transformers' padding path
        return inputs
    inputs["position_ids"] = batch["position_ids"]
    if impl in FLASH_KWARGS:
        cu, longest = batch["cu_seqlens"], kernel_longest(batch["max_seqlen"], batch["input_ids"].numel())
        inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    return inputs


def row_multiple(cfg: AttentionConfig) -> int:
    """Training rows are padded to a multiple of this. Compiled flex_attention (torch 2.11) finds no kernel
    for some rows under 128 tokens with grouped-query attention (inductor's NoValidChoicesError at 100-127,
    benchmarks/results/2026-12-06-fa4-short-rows-h100.md); rows of whole 128-token blocks build, and flex
    computes whole blocks anyway."""
    return 128 if cfg.attn == "flex" else 1


def kernel_longest(longest: int, tokens: int) -> int:
    """The longest-document bound to give a varlen kernel for packed rows of `tokens` in all: at
    least LONGEST_FLOOR, never more than the tokens there are."""
    return max(longest, min(LONGEST_FLOOR, tokens))


@contextlib.contextmanager
def eval_attention(model):
    """Evaluation (validation loss, exact match) runs its padded rows on sdpa when training uses flex
    or one of our registered kernels, which take packed rows; yields the implementation to shape
    inputs for. Compiled flex recompiles for every new short shape (torch 2.11 failed to lower it
    for a 33-token padded batch: NoValidChoicesError)."""
    impl = model.config._attn_implementation
    # sequence-parallel attention (nanotune_sp_*) expects sharded batches: evaluation runs unsharded
    switch = impl in CUSTOM + ("flex_attention",) or impl.startswith("nanotune_sp_")
    if switch:
        model.set_attn_implementation("sdpa")
    try:
        yield "sdpa" if switch else impl
    finally:
        if switch:
            model.set_attn_implementation(impl)


# ---------------------------------------------------------------------------- registered kernels


def _flatten(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, seq, dim) -> (batch * seq, heads, dim), the varlen layout."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])


@functools.cache
def _varlen_params() -> frozenset[str]:
    """varlen_attn's keyword names, which changed across torch releases (looked up once, not per layer)."""
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      sliding_window=None, cu_seq_lens_q=None, max_length_q=None, **kwargs):
    from torch.nn.attention.varlen import varlen_attn

    batch, _, seq, _ = query.shape
    options = {"scale": scaling}
    params = _varlen_params()
    if "window_size" in params:  # torch >= 2.12: causal (and sliding) through window_size
        options["window_size"] = (sliding_window - 1 if sliding_window else -1, 0)
    else:  # older torch: causal only (resolve() refused sliding-window models)
        options["is_causal"] = True
    if "enable_gqa" in params:
        options["enable_gqa"] = key.shape[1] != query.shape[1]
    if key.shape[1] != query.shape[1] and not options.get("enable_gqa"):
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    cu = cu_seq_lens_q.to(torch.int32)
    out = varlen_attn(_flatten(query), _flatten(key), _flatten(value), cu, cu, max_length_q, max_length_q,
                      **options)
    return out.view(batch, seq, *out.shape[1:]), None


def _xformers_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        sliding_window=None, cu_seq_lens_q=None, **kwargs):
    from xformers.ops import fmha

    batch, heads, seq, dim = query.shape
    lengths = cu_seq_lens_q.diff().tolist()
    mask = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(lengths)
    if sliding_window:
        mask = mask.make_local_attention(sliding_window)
    q = query.transpose(1, 2).reshape(1, batch * seq, heads, dim)
    kv_heads = key.shape[1]
    k = key.transpose(1, 2).reshape(1, batch * seq, kv_heads, dim)
    v = value.transpose(1, 2).reshape(1, batch * seq, kv_heads, dim)
    if kv_heads != heads:  # xformers takes GQA as (batch, seq, groups, heads per group, dim)
        g = heads // kv_heads
        q = q.view(1, batch * seq, kv_heads, g, dim)
        k, v = (t[:, :, :, None].expand(1, batch * seq, kv_heads, g, dim) for t in (k, v))
    out = fmha.memory_efficient_attention(q, k, v, attn_bias=mask, scale=scaling)
    return out.reshape(batch, seq, heads, dim), None


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register("nanotune_varlen", _varlen_attention)
    AttentionInterface.register("nanotune_xformers", _xformers_attention)
