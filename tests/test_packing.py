"""Packing: bins respect --seq-len, are deterministic and re-drawn per epoch, fill rows, and the
collated batch marks document boundaries so no target crosses a document."""

import itertools
import random

import pytest

from conftest import ROOT
from core.batches import StepBatches
from core.data import DataConfig, Sample, load_splits
from core.packing import best_fit_decreasing, collate_packed


def _lengths(n=500, seed=0):
    rng = random.Random(seed)
    return [rng.randint(1, 300) for _ in range(n)]


def test_best_fit_decreasing_places_every_item_once_within_capacity():
    lengths = _lengths()
    bins = best_fit_decreasing(lengths, 512, list(range(len(lengths))))
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    lower_bound = -(-sum(lengths) // 512)
    assert len(bins) <= lower_bound + 2  # best-fit decreasing is within a few bins of optimal here


def test_packing_is_deterministic_per_seed_and_redrawn_per_epoch():
    samples = [Sample([1] * n, [1] * n, 0) for n in _lengths(300)]
    a = StepBatches(samples, 1, 1, seed=3, pad_id=0, pack_to=256)
    b = StepBatches(samples, 1, 1, seed=3, pad_id=0, pack_to=256)
    assert a.rows(0) == b.rows(0) and a.rows(1) == b.rows(1)
    assert a.rows(0) != a.rows(1)  # re-drawn every epoch
    assert StepBatches(samples, 1, 1, seed=4, pad_id=0, pack_to=256).rows(0) != a.rows(0)


def test_the_steps_line_counts_in_words():
    one = StepBatches([Sample([1, 2], [1, 2], 0)] * 3, 2, 1, seed=0, pad_id=0)  # 1 step of 2 rows, 1 row left
    assert one.describe(1).startswith("data: 1 step an epoch (1 sample an epoch left out to keep every step full), ")
    many = StepBatches([Sample([1, 2], [1, 2], 0)] * 4101, 2, 1, seed=0, pad_id=0)
    assert many.describe(9).startswith("data: 2,050 steps an epoch (1 sample an epoch left out")


def test_a_fraction_of_an_epoch_rounds_up_but_not_on_float_error():
    plan = StepBatches([Sample([1, 2], [1, 2], 0)] * 625, 1, 1, seed=0, pad_id=0)
    assert plan.total_steps(1.6) == 625 + 375  # (1.6 - 1) x 625 = 375.00000000000006 in floats
    assert plan.total_steps(1.601) == 625 + 376 and plan.total_steps(2) == 1250


def test_padded_efficiency_counts_each_micro_batch_at_its_longest_sample():
    lengths = [10, 2, 4, 4, 3000, 30]  # one long outlier pads only its own micro-batch
    samples = [Sample([1] * n, [1] * n, 0) for n in lengths]
    plan = StepBatches(samples, 2, 1, seed=0, pad_id=0)
    order = [row[0] for row in plan.rows(0)]
    widths = [max(lengths[order[j]], lengths[order[j + 1]]) for j in (0, 2, 4)]
    real = sum(lengths)
    assert plan.efficiency(0) == pytest.approx(real / (2 * sum(widths)))
    steps = list(itertools.islice(iter(plan), 3))  # what collate_padded builds: the same slots
    assert sum(mb["input_ids"].numel() for step in steps for mb in step) == 2 * sum(widths)


def test_embedded_dataset_packs_at_least_98_percent_full(tok):
    train, _ = load_splits(DataConfig(dataset=str(ROOT / "data/train.jsonl"), seq_len=2048), tok)
    batches = StepBatches(train.samples, 1, 1, seed=0, pad_id=tok.pad_token_id, pack_to=2048)
    assert batches.efficiency(0) >= 0.98
    padded = StepBatches(train.samples, 8, 1, seed=0, pad_id=tok.pad_token_id)
    assert padded.efficiency(0) < batches.efficiency(0)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_rank_gets_the_same_steps_and_no_row_twice(world):
    samples = [Sample([1] * n, [1] * n, 0) for n in _lengths(777, seed=world)]
    ranks = [StepBatches(samples, 2, 3, seed=0, pad_id=0, rank=r, world_size=world, pack_to=300)
             for r in range(world)]
    steps = {r.steps_in_epoch(0) for r in ranks}
    assert len(steps) == 1 and steps.pop() == len(ranks[0].rows(0)) // (world * 6)
    seen = []
    for r in ranks:
        it = iter(r)
        for _ in range(r.steps_in_epoch(0)):
            micro = next(it)
            assert len(micro) == 3 and all(mb["input_ids"].shape[0] == 2 for mb in micro)
            seen += [mb["num_tokens"] for mb in micro]
    assert ranks[0].total_steps(2.5) == sum(ranks[0].steps_in_epoch(e) for e in (0, 1)) + \
        -(-ranks[0].steps_in_epoch(2) // 2)


def test_collated_rows_restart_positions_and_mask_document_starts():
    docs = [Sample([10, 11, 12], [-100, 11, 12], 1), Sample([20, 21], [20, 21], 0)]
    batch = collate_packed([docs, [Sample([30, 31, 32, 33], [30, 31, 32, 33], 0)]], pad_id=0)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21], [30, 31, 32, 33, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    # a document's first token is never a target: the previous document must not learn to predict it
    assert batch["labels"].tolist() == [[-100, 11, 12, -100, 21], [-100, 31, 32, 33, -100]]
    assert batch["cu_seqlens"].tolist() == [0, 3, 5, 9, 10] and batch["max_seqlen"] == 4
    assert batch["num_tokens"] == 9 and batch["sum_sq_len"] == 9 + 4 + 16
