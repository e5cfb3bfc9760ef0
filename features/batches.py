"""Batches: a deterministic, resumable plan of micro-batches per optimizer step and rank.

Each epoch shuffles the sample order with (seed, epoch) and cuts it into global steps of
ranks x --grad-accum x --micro-batch-size samples (the remainder of the epoch is dropped, so every
rank runs the same number of full steps); rank r takes the r-th slice of each global step. So a
step holds the same samples for any split of one global batch into ranks and micro-batches,
which is what makes 8 x 1 x 4 train exactly like 1 x 4 x 8. The position
(epoch, step within the epoch) is all a checkpoint needs to continue exactly where it stopped.
Rows are padded to the longest sample of their micro-batch.
"""

import random

import torch

from features.data import Sample


def collate_padded(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids / labels / attention_mask, right-padded; labels stay unshifted (HF convention)."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(s.input_ids), torch.tensor(s.labels), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class StepBatches:
    """Yields, for this rank, the list of micro-batches of each optimizer step, epoch after epoch."""

    def __init__(self, samples: list[Sample], micro_batch_size: int, grad_accum: int, seed: int,
                 pad_id: int, rank: int = 0, world_size: int = 1):
        self.samples, self.mbs, self.accum = samples, micro_batch_size, grad_accum
        self.seed, self.pad_id, self.rank, self.world = seed, pad_id, rank, world_size
        self.epoch, self.step_in_epoch = 0, 0
        self.steps_per_epoch = len(samples) // (world_size * micro_batch_size * grad_accum)

    def dropped_per_epoch(self) -> int:
        """Samples left out of each epoch so that every rank and step gets full micro-batches."""
        return len(self.samples) - self.steps_per_epoch * self.world * self.mbs * self.accum

    def _rank_order(self, epoch: int) -> list[int]:
        """This rank's sample indices for the epoch, step after step."""
        order = list(range(len(self.samples)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        per_rank = self.mbs * self.accum
        return [i for step in range(self.steps_per_epoch)
                for i in order[(step * self.world + self.rank) * per_rank:][:per_rank]]

    def __iter__(self):
        while True:
            order = self._rank_order(self.epoch)
            per_step = self.mbs * self.accum
            while self.step_in_epoch < self.steps_per_epoch:
                chunk = order[self.step_in_epoch * per_step:(self.step_in_epoch + 1) * per_step]
                self.step_in_epoch += 1
                yield [collate_padded([self.samples[i] for i in chunk[j:j + self.mbs]], self.pad_id)
                       for j in range(0, per_step, self.mbs)]
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]


def eval_batches(samples: list[Sample], micro_batch_size: int, pad_id: int, rank: int = 0,
                 world_size: int = 1):
    """This rank's share of the validation set, in order, in micro-batches (ragged tail kept)."""
    mine = samples[rank::world_size]
    for i in range(0, len(mine), micro_batch_size):
        yield collate_padded(mine[i:i + micro_batch_size], pad_id)
