"""Batches: a deterministic, resumable plan of micro-batches per optimizer step and rank.

Each epoch shuffles the samples with (seed, epoch) into rows (one sample per row, or several
with --packing) and cuts the rows into global steps of ranks x --grad-accum x --micro-batch-size
rows; the remainder of the epoch is dropped, so every rank runs the same number of full steps,
known before training. Rank r takes the r-th slice of each global step, so a step holds the same
rows for any split of one global batch into ranks and micro-batches: 8 ranks x 1 x 4 train
exactly like 1 rank x 4 x 8. The position (epoch, step within the epoch) is all a checkpoint
needs to continue where it stopped. Unpacked rows are padded to the longest of their micro-batch.
"""

import math
import random

import torch

from core import UserError, count
from core.data import Sample
from core.packing import best_fit_decreasing, collate_packed


def collate_padded(samples: list[Sample], pad_id: int, width: int | None = None) -> dict:
    """One sample per row, right-padded (to `width`, default the longest): a packed batch of one document
    per row plus attention_mask, so every attention backend can take either (labels stay unshifted, HF
    convention)."""
    batch = collate_packed([[s] for s in samples], pad_id, width)
    lengths = torch.tensor([len(s.input_ids) for s in samples])
    batch["attention_mask"] = (torch.arange(batch["input_ids"].shape[1])[None] < lengths[:, None]).long()
    return batch


def count_tokens(batch: dict) -> int:
    """Real (non-padding) tokens in a batch: what tokens/s counts."""
    return batch["num_tokens"]


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class StepBatches:
    """Yields, for this rank, the list of micro-batches of each optimizer step, epoch after epoch."""

    def __init__(self, samples: list[Sample], micro_batch_size: int, grad_accum: int, seed: int,
                 pad_id: int, rank: int = 0, world_size: int = 1, pack_to: int | None = None, row_multiple: int = 1):
        self.samples, self.mbs, self.accum = samples, micro_batch_size, grad_accum
        self.seed, self.pad_id, self.rank, self.world, self.pack_to = seed, pad_id, rank, world_size, pack_to
        self.row_multiple = row_multiple  # rows are padded to a multiple of it (core/attention.row_multiple)
        self.rows_per_step = world_size * micro_batch_size * grad_accum
        self.epoch, self.step_in_epoch = 0, 0
        self._plans: dict[int, list[list[int]]] = {}

    def rows(self, epoch: int) -> list[list[int]]:
        """The epoch's rows of sample indices, in training order (cached: packing is deterministic)."""
        if epoch not in self._plans:
            order = list(range(len(self.samples)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            if self.pack_to is None:
                plan = [[i] for i in order]
            else:
                plan = best_fit_decreasing([len(s.input_ids) for s in self.samples], self.pack_to, order)
                random.Random(f"rows {self.seed} {epoch}").shuffle(plan)  # no longest-first bias; a seed of its
                # own (an integer one next to the order's would be the next epoch's order seed)
            self._plans = {epoch: plan}  # keep one epoch: plans of big datasets are not small
        return self._plans[epoch]

    def steps_in_epoch(self, epoch: int) -> int:
        return len(self.rows(epoch)) // self.rows_per_step

    def check_one_step(self, dataset: str) -> None:
        """Refuse a dataset too small for one step, naming the sizes that make a step."""
        if self.steps_in_epoch(0) == 0:
            rows = f" fill {len(self.rows(0))} packed rows, which are" if self.pack_to else " are"
            raise UserError(f"--dataset {dataset}: {count(len(self.samples), 'sample')}{rows} fewer than one step "
                            f"takes ({self.world} data-parallel ranks x --micro-batch-size {self.mbs} x --grad-accum "
                            f"{self.accum} rows); lower --micro-batch-size or --grad-accum (or --seq-len, where "
                            f"samples are packed rows or pretrain blocks)")

    def total_steps(self, epochs: float) -> int:
        """Steps in `epochs` passes (a fraction of the last one rounds up, after rounding away float
        error: 0.6 x 625 is 375.00000000000006 in binary, and 375 steps)."""
        whole = int(epochs)
        steps = sum(self.steps_in_epoch(e) for e in range(whole))
        part = round((epochs - whole) * self.steps_in_epoch(whole), 6)
        return steps + (math.ceil(part) if epochs > whole else 0)

    def efficiency(self, epoch: int = 0) -> float:
        """Real tokens / token slots of the epoch's micro-batches (1.0 = no padding): packed rows are
        --seq-len wide, padded rows as wide as the longest sample of their micro-batch (collate_padded)."""
        used = self.rows(epoch)[: self.steps_in_epoch(epoch) * self.rows_per_step]
        lengths = [sum(len(self.samples[i].input_ids) for i in row) for row in used]
        # consecutive micro-batch-size rows are one micro-batch of one rank (__iter__)
        micro = (lengths[j:j + self.mbs] for j in range(0, len(used), self.mbs))
        slots = sum(len(mb) * self._width(max(mb)) for mb in micro)
        return sum(lengths) / max(1, slots)

    def _width(self, longest: int) -> int:
        """A micro-batch's row width: --seq-len when packed, else its longest row; rounded up to row_multiple."""
        return -(-(self.pack_to or longest) // self.row_multiple) * self.row_multiple

    def describe(self, total_steps: int) -> str:
        """The run log's line on the steps and on how full the rows are."""
        left = self.dropped(0)
        ranks = " on every rank" if self.world > 1 else ""
        left = f" ({count(left, 'sample')} an epoch left out to keep every step full{ranks})" if left else ""
        return (f"data: {count(self.steps_in_epoch(0), 'step')} an epoch{left}, {total_steps:,} in all; "
                f"{100 * self.efficiency(0):.1f}% of token slots hold real tokens"
                + (" (packed)" if self.pack_to else " (padded)"))

    def dropped(self, epoch: int = 0) -> int:
        """Samples left out of an epoch so that every rank and step gets full micro-batches."""
        return sum(len(row) for row in self.rows(epoch)[self.steps_in_epoch(epoch) * self.rows_per_step:])

    def _collate(self, rows: list[list[int]]) -> dict:
        docs = [[self.samples[i] for i in row] for row in rows]
        width = self._width(max(sum(len(s.input_ids) for s in row) for row in docs))
        if self.pack_to is None:
            return collate_padded([row[0] for row in docs], self.pad_id, width)
        return collate_packed(docs, self.pad_id, width)

    def __iter__(self):
        while True:
            rows, per_rank = self.rows(self.epoch), self.mbs * self.accum
            while self.step_in_epoch < self.steps_in_epoch(self.epoch):
                start = (self.step_in_epoch * self.world + self.rank) * per_rank
                mine = rows[start:start + per_rank]
                self.step_in_epoch += 1
                yield [self._collate(mine[j:j + self.mbs]) for j in range(0, per_rank, self.mbs)]
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "rows_per_step": self.rows_per_step}

    def load_state_dict(self, state: dict) -> None:
        """The position is a step count: it means the same rows only at the same rows a step."""
        saved = state.get("rows_per_step", self.rows_per_step)
        if saved != self.rows_per_step:
            raise UserError(f"--resume: the checkpoint trained {saved} rows a step and this run would train "
                            f"{self.rows_per_step} ({self.world} data-parallel ranks x --micro-batch-size {self.mbs} x "
                            f"--grad-accum {self.accum}), which moves the data position and the schedule; "
                            f"{self._same_rows(saved)}")
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]

    def _same_rows(self, saved: int) -> str:
        if saved % (self.world * self.mbs) == 0:
            return f"pass --grad-accum {saved // (self.world * self.mbs)}"
        if saved % (self.world * self.accum) == 0:
            return f"pass --micro-batch-size {saved // (self.world * self.accum)}"
        return "keep ranks x --micro-batch-size x --grad-accum as saved"


def eval_batches(samples: list[Sample], micro_batch_size: int, pad_id: int, rank: int = 0,
                 world_size: int = 1):
    """This rank's share of the validation set, in order, in padded micro-batches (ragged tail kept)."""
    mine = samples[rank::world_size]
    for i in range(0, len(mine), micro_batch_size):
        yield collate_padded(mine[i:i + micro_batch_size], pad_id)
