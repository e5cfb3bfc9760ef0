"""Sample packing: fill each --seq-len row with several samples, attention kept inside each one.

    python train.py --packing --seq-len 2048 --micro-batch-size 1 --attn flash

Rows are made by best-fit decreasing bin packing (longest sample first, into the fullest row it
still fits; within one length the order is the epoch's shuffle, so rows are re-drawn every epoch
and are deterministic for a seed). A packed batch carries `position_ids` that restart at every
document, and `cu_seqlens` / `max_seqlen` (document boundaries over the flattened batch), so every
attention backend keeps documents apart and a packed batch gives the same loss as the same
documents unpacked. The first token of every document is excluded from the targets, exactly as
at the start of an unpacked row, so no document learns to predict its neighbour.

Reference: "Efficient Sequence Packing without Cross-contamination" (Krell et al., 2021).
Works with every --attn backend (see core/attention.py) and with --dataset-format pretrain
(blocks are then already full, so packing changes nothing).
"""

import bisect
import dataclasses

import torch

from core.records import IGNORE, Sample


@dataclasses.dataclass
class PackingConfig:
    packing: bool = False
    """Pack several samples into each --seq-len row (attention never crosses a sample); on by default on a CUDA GPU."""
    no_packing: bool = False
    """One sample per row, padded to the longest of its micro-batch, also on a CUDA GPU."""


def best_fit_decreasing(lengths: list[int], capacity: int, order: list[int]) -> list[list[int]]:
    """Bins of sample indices, each holding at most `capacity` tokens.

    Items go longest first (ties in `order`), each into the bin with the least room that still
    fits it. Room is kept in a sorted list, so one placement costs a binary search.
    """
    rank = {i: r for r, i in enumerate(order)}
    items = sorted(order, key=lambda i: (-lengths[i], rank[i]))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, bin index), sorted
    for i in items:
        at = bisect.bisect_left(room, (lengths[i], -1))
        if at == len(room):
            bins.append([i])
            free, b = capacity - lengths[i], len(bins) - 1
        else:
            free, b = room.pop(at)
            bins[b].append(i)
            free -= lengths[i]
        if free > 0:
            bisect.insort(room, (free, b))
    return bins


def collate_packed(rows: list[list[Sample]], pad_id: int, width: int | None = None) -> dict:
    """input_ids, labels, position_ids (restarting per document), cu_seqlens, max_seqlen, plus
    num_tokens and sum_sq_len (real tokens, and the sum of squared document lengths, for MFU).

    Rows are padded to `width` (default: the longest row); padding is its own document (label
    -100), so it attends only to itself. A fixed width (--seq-len when packing) keeps shapes
    static for compiled kernels.
    """
    width = width or max(sum(len(s.input_ids) for s in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    lengths, real = [], 0
    for r, row in enumerate(rows):
        at = 0
        for s in row:
            n = len(s.input_ids)
            ids[r, at:at + n], labels[r, at:at + n] = torch.tensor(s.input_ids), torch.tensor(s.labels)
            labels[r, at] = IGNORE  # nothing before it in its document: never a target
            positions[r, at:at + n] = torch.arange(n)
            lengths.append(n)
            at += n
        real += at
        if at < width:
            positions[r, at:] = torch.arange(width - at)
            lengths.append(width - at)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    real_lengths = [len(s.input_ids) for row in rows for s in row]
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "cu_seqlens": cu,
            "max_seqlen": max(lengths), "num_tokens": real, "sum_sq_len": sum(n * n for n in real_lengths)}
