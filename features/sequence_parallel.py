"""Sequence parallelism: each of the --cp ranks holds 1/cp of every row's tokens, attention sees all.

    torchrun --nproc_per_node 4 train.py --packing --seq-len 65536 --cp 4 --sp-mode ulysses --attn flash
    torchrun --nproc_per_node 4 train.py --packing --seq-len 65536 --cp 4 --sp-mode ring

ulysses  (DeepSpeed-Ulysses) every attention call swaps the sharding with an all-to-all: from
         (all heads, n = S/cp tokens) to (heads/cp, all S tokens), runs the --attn backend on the
         whole row for its heads (document masks / cu_seqlens of the full row), and swaps back.
         Needs attention heads divisible by --cp (key-value heads are repeated until they split).
         Every backend works.
ring     features/ring_attention.py: K/V blocks travel around the cp ranks, online-softmax merge,
         zig-zag shards (rank r: chunks r and 2cp-1-r) so causal work is balanced. Its own
         pure-PyTorch math (--attn is not used); any head count.

Both are registered with transformers' AttentionInterface ("nanotune_sp_<mode>_<backend>"); a
forward pre-hook on the model gathers the shards' position_ids (a few ints per token) and hands
the full row's documents to the attention as a keyword argument, so packing works and nothing in
transformers is patched. Batches reach the model through `make_loss_fn`, which shards each
micro-batch with `shard_batch` and accounts the loss:

  - targets are shifted on the full row before sharding (`shift_labels`): a shard's last token
    predicts a token that lives on another rank;
  - each rank sums the token losses of its own shard; the returned value is the sum over the cp
    group (detached), so logging and non-finite checks agree on every rank, while the gradient
    is the rank's own tokens only;
  - the trained-token count is that of the unsharded rows (train.py counts before sharding, over
    the data-parallel ranks), and gradients are summed over the cp ranks by DDP/FSDP averaging
    over dp x cp with the loss scaled by dp x cp: the step gradient is sum(token losses) / tokens.

Evaluation and generation run unsharded on plain sdpa (core/attention.eval_attention).
Reference: Jacobs et al., "DeepSpeed Ulysses" (2023); Liu et al., "Ring Attention" (2023).
Works with: --packing, every --attn (ulysses), LoRA/QLoRA, --ac, --fsdp/--ddp over dp x cp.
Refused: --sp-mode without --cp > 1 (and --cp > 1 without --sp-mode); --sp-mode with --tp; ulysses
with attention heads not divisible by --cp; ring with logit soft-capping (Gemma 2).
"""

import copy
import dataclasses
import functools
import math
import sys
import weakref
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from core import UserError
from core.attention import FLASH_KWARGS, kernel_longest
from core.loss import IGNORE, shifted_targets
from features.ring_attention import ring_attention, shard_index

_ROW_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids")


@dataclasses.dataclass
class SequenceParallelConfig:
    sp_mode: Literal["none", "ulysses", "ring"] = "none"
    """Split each sequence over the --cp ranks: ulysses (all-to-all over heads, any --attn) or ring (K/V blocks passed around, zig-zag)."""  # noqa: E501


# ---------------------------------------------------------------------------- batches


def _pad_row(batch: dict, multiple: int) -> dict:
    """Right-pad input_ids/labels/position_ids to a multiple of `multiple` (a padding document)."""
    extra = -batch["input_ids"].shape[1] % multiple
    if extra == 0:
        return batch
    rows = batch["input_ids"].shape[0]
    positions = torch.arange(extra, device=batch["position_ids"].device).expand(rows, extra)
    return dict(batch, input_ids=F.pad(batch["input_ids"], (0, extra)),
                labels=F.pad(batch["labels"], (0, extra), value=IGNORE),
                position_ids=torch.cat([batch["position_ids"], positions], 1))


def shard_batch(batch: dict, rank: int, world: int, mode: str) -> dict:
    """This rank's part of every row: contiguous (ulysses) or zig-zag chunks r and 2P-1-r (ring).

    Rows are padded to a multiple of P (ulysses) or 2P (ring). Labels become `shift_labels`,
    shifted on the full row (core/loss.next_token_targets reads them). cu_seqlens/max_seqlen
    stay those of the full row: the attention replaces them anyway.
    """
    zigzag = mode == "ring"
    batch = _pad_row(batch, 2 * world if zigzag else world)
    index = shard_index(batch["input_ids"].shape[1], rank, world, zigzag).to(batch["input_ids"].device)
    shard = {k: v for k, v in batch.items() if k in ("cu_seqlens", "max_seqlen")}
    shard.update(input_ids=batch["input_ids"][:, index], position_ids=batch["position_ids"][:, index],
                 shift_labels=shifted_targets(batch["labels"])[:, index])
    return shard


def _is_sharded(model) -> bool:
    impl = getattr(getattr(model, "module", model), "config", None)
    return impl is not None and str(impl._attn_implementation).startswith("nanotune_sp_")


def make_loss_fn(loss_fn, cfg: SequenceParallelConfig, group):
    """Wrap a `loss_fn(model, batch, **kw) -> loss sum` so that it runs on this rank's shard.

    The value returned is the loss of the whole rows (summed over the group, no gradient through
    the sum); the gradient is that of this rank's tokens. Unsharded when the model is switched to
    a plain backend (evaluation: core/attention.eval_attention).
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)

    @functools.wraps(loss_fn)
    def sharded_loss_sum(model, batch: dict, **kwargs) -> torch.Tensor:
        if not _is_sharded(model):
            return loss_fn(model, batch, **kwargs)
        mine = loss_fn(model, shard_batch(batch, rank, world, cfg.sp_mode), **kwargs)
        total = mine.detach().clone()
        dist.all_reduce(total, group=group)
        return mine + (total - mine.detach())
    return sharded_loss_sum


# ---------------------------------------------------------------------------- the row's documents


@dataclasses.dataclass
class RowInfo:
    """What attention needs to know about the full rows, built once per forward by the hook."""
    doc: torch.Tensor
    """(B, S) document id of every row position (a new one wherever position_ids do not go +1)."""
    index: list[torch.Tensor]
    """Row positions held by each rank of the group."""
    masks: dict = dataclasses.field(default_factory=dict)
    """Per-backend masks of the full row, built on first use and shared by all layers."""


def _documents(positions: torch.Tensor) -> torch.Tensor:
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1  # transformers' packed-sequence rule
    return starts.long().cumsum(1) - 1


def _row_info(local_positions: torch.Tensor, group, zigzag: bool) -> RowInfo:
    world = dist.get_world_size(group)
    parts = [torch.empty_like(local_positions) for _ in range(world)]
    dist.all_gather(parts, local_positions.contiguous(), group=group)
    seq = local_positions.shape[1] * world
    index = [shard_index(seq, j, world, zigzag).to(local_positions.device) for j in range(world)]
    full = torch.empty((local_positions.shape[0], seq), dtype=local_positions.dtype, device=local_positions.device)
    for j, part in enumerate(parts):
        full[:, index[j]] = part
    return RowInfo(_documents(full), index)


def _visible(doc: torch.Tensor, window: int | None) -> torch.Tensor:
    """(B, 1, S, S) bool: same document, causal, inside the sliding window."""
    idx = torch.arange(doc.shape[1], device=doc.device)
    ok = (doc[:, :, None] == doc[:, None, :]) & (idx[None, :] <= idx[:, None])
    if window:
        ok &= idx[:, None] - idx[None, :] < window
    return ok[:, None]


def _row_mask(info: RowInfo, inner: str, dtype: torch.dtype, window: int | None):
    """The full row's mask in the form `inner` takes: bool (sdpa), additive (eager), BlockMask
    (flex), or the varlen keyword arguments (flash-like)."""
    key = (inner, dtype, window)
    if key not in info.masks:
        if inner in FLASH_KWARGS:
            lengths = torch.cat([torch.bincount(row) for row in info.doc])
            cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
            longest = kernel_longest(int(lengths.max()), info.doc.numel())
            info.masks[key] = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        elif inner == "flex_attention":
            from torch.nn.attention.flex_attention import create_block_mask

            doc = info.doc

            def document_causal(b, h, q, k):
                ok = (doc[b, q] == doc[b, k]) & (k <= q)
                return ok & (q - k < window) if window else ok
            seq = doc.shape[1]
            info.masks[key] = create_block_mask(document_causal, doc.shape[0], None, seq, seq, device=doc.device)
        elif inner == "sdpa" and not window and bool((info.doc == 0).all()):
            info.masks[key] = None  # one document per row: plain causal, SDPA's flash kernel (no S x S mask)
        else:
            visible = _visible(info.doc, window)
            info.masks[key] = visible if inner == "sdpa" else torch.zeros(
                visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, torch.finfo(dtype).min)
    return info.masks[key]


# ---------------------------------------------------------------------------- attention


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """x[j] goes to rank j, result[j] came from rank j; differentiable (its backward is the same
    exchange). torch's functional collective, the non-deprecated one in torch 2.13."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

    return wait_tensor(all_to_all_single_autograd(x, None, None, group))


def _seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """(B, H, n, D) with this rank's tokens -> (B, H/P, P*n, D) with this rank's heads."""
    world = dist.get_world_size(group)
    b, h, n, d = x.shape
    send = x.reshape(b, world, h // world, n, d).transpose(0, 1).contiguous()
    got = _all_to_all(send, group)  # got[j]: rank j's tokens
    return got.permute(1, 2, 0, 3, 4).reshape(b, h // world, world * n, d)


def _heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """(B, S, H/P, D) output for this rank's heads -> (B, S/P, H, D) for this rank's tokens."""
    world = dist.get_world_size(group)
    b, s, h, d = x.shape
    send = x.reshape(b, world, s // world, h, d).transpose(0, 1).contiguous()
    got = _all_to_all(send, group)  # got[j]: heads of rank j
    return got.permute(1, 2, 0, 3, 4).reshape(b, s // world, world * h, d)


class _InnerView:
    """The attention module as the inner backend sees it: itself, except that its config names the
    inner implementation (transformers' flash integration picks FA2 / FA4 by reading
    module.config._attn_implementation, which is ours; transformers 5.24)."""

    def __init__(self, module, inner: str):
        self._module, self.config = module, copy.copy(module.config)
        # the field, not the property: its setter would also rename the sub-configs this shallow copy shares
        self.config._attn_implementation_internal = inner

    def __getattr__(self, name):
        return getattr(self._module, name)


_VIEWS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _inner_view(module, inner: str) -> _InnerView:
    if module not in _VIEWS or _VIEWS[module].config._attn_implementation != inner:
        _VIEWS[module] = _InnerView(module, inner)
    return _VIEWS[module]


def _inner_function(module, inner: str):
    from transformers import AttentionInterface

    if inner == "eager":  # each model family has its own eager function (soft-capping, sinks)
        return sys.modules[type(module).__module__].eager_attention_forward
    return AttentionInterface()[inner]


def _ulysses(module, query, key, value, attention_mask, *, inner: str, group, sp_rows: RowInfo = None,
             sliding_window=None, **kwargs):
    for name in _ROW_KWARGS:  # these describe the local shard; the inner call gets the full row's
        kwargs.pop(name, None)
    copies = dist.get_world_size(group) // math.gcd(key.shape[1], dist.get_world_size(group))
    if copies > 1:  # fewer key-value heads than ranks (or not a multiple): repeat them until they split, as ALST does
        key, value = key.repeat_interleave(copies, 1), value.repeat_interleave(copies, 1)
    q, k, v = (_seq_to_heads(t, group) for t in (query, key, value))
    mask = _row_mask(sp_rows, inner, q.dtype, sliding_window)
    if inner in FLASH_KWARGS:
        kwargs.update(mask)
        mask = None
    view = _inner_view(module, inner)
    view.num_key_value_groups = q.shape[1] // k.shape[1]  # eager / sdpa repeat K/V by it
    out, _ = _inner_function(module, inner)(view, q, k, v, mask, sliding_window=sliding_window, **kwargs)
    return _heads_to_seq(out, group), None


def _ring(module, query, key, value, attention_mask, *, group, sp_rows: RowInfo = None, scaling=None,
          sliding_window=None, **kwargs):
    out = ring_attention(query, key, value, group, sp_rows.index, sp_rows.doc,
                         scaling if scaling is not None else query.shape[-1] ** -0.5, sliding_window)
    return out.transpose(1, 2), None


def _check_heads(config, cfg: SequenceParallelConfig, world: int) -> None:
    if cfg.sp_mode == "ulysses":
        heads = config.num_attention_heads
        if heads % world:  # (key-value heads are repeated until they split)
            raise UserError(f"--sp-mode ulysses splits attention heads over --cp {world}, but this model has "
                            f"{heads}; use a --cp that divides {heads}, or --sp-mode ring")
    elif getattr(config, "attn_logit_softcapping", None):
        raise UserError("--sp-mode ring: this model soft-caps attention logits, which ring attention does not; "
                        "use --sp-mode ulysses with --attn flex or eager")


def attention_name(mode: str, attn_impl: str) -> str:
    """The AttentionInterface name of the wrapper. No "flash" in it: transformers takes any such name
    for a hub kernel to download ("Could not find ... nanotune_sp_ulysses_flash_attention_4")."""
    return f"nanotune_sp_{mode}_{attn_impl.replace('flash_attention', 'fa')}"


def apply_sequence_parallel(model, cfg: SequenceParallelConfig, group, attn_impl: str):
    """Switch the model's attention to the sequence-parallel wrapper of `attn_impl` over `group`."""
    from transformers import AttentionInterface

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    world = dist.get_world_size(group)
    _check_heads(base.config, cfg, world)
    name = attention_name(cfg.sp_mode, attn_impl)
    fn = (functools.partial(_ulysses, inner=attn_impl, group=group) if cfg.sp_mode == "ulysses"
          else functools.partial(_ring, group=group))
    AttentionInterface.register(name, fn)
    base.set_attn_implementation(name)

    def hand_rows_to_attention(module, args, kwargs):
        # only while sharded: evaluation switches the model to plain sdpa on unsharded batches
        if _is_sharded(base) and kwargs.get("position_ids") is not None:
            kwargs["sp_rows"] = _row_info(kwargs["position_ids"], group, cfg.sp_mode == "ring")
        return args, kwargs
    # on the decoder, which the causal-LM head calls as a module (peft calls the head's .forward)
    base.get_decoder().register_forward_pre_hook(hand_rows_to_attention, with_kwargs=True)
    return model


def apply(model, cfg, run):
    """--cp N --sp-mode ring/ulysses: attention over the "cp" ranks (the loss is wrapped by `wrap_loss`)."""
    return apply_sequence_parallel(model, cfg.sequence_parallel, run.d.sub("cp").get_group(), run.attn_impl)


def wrap_loss(loss_fn, cfg, run):
    """The loss of a sequence shard, summed over the "cp" ranks."""
    return make_loss_fn(loss_fn, cfg.sequence_parallel, run.d.sub("cp").get_group())


def describe(cfg, attention: str) -> str:
    """The log's attention line (cfg: train.py's Config): `attention` (the backend), and how --sp-mode
    spreads it over the --cp ranks."""
    mode, cp = cfg.sequence_parallel.sp_mode, cfg.mesh.cp
    if mode == "none":
        return attention
    if mode == "ulysses":
        return f"{attention} on whole rows, --sp-mode ulysses over {cp} ranks (each holds 1/{cp} of a row)"
    return f"--sp-mode ring over {cp} ranks (each holds 1/{cp} of a row): its own online-softmax math, not --attn"
