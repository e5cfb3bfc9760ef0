"""Prefetch: the same batches in the same order, the consumed position for checkpoints, errors in the loop."""

import itertools
import random
import threading
import time

import pytest
import torch

from conftest import run_train
from core import UserError
from core.batches import StepBatches
from core.data import Sample
from core.loss import count_targets
from core.prefetch import Prefetched

CPU = torch.device("cpu")


def _samples(n=22, seed=0) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(4, 400) for _ in range(rng.randrange(5, 40))]
        cut = rng.randrange(1, len(ids))
        out.append(Sample(ids, [-100] * cut + ids[cut:], cut))
    return out


def _batches(pack_to=None) -> StepBatches:  # 22 samples / (2 x 2 rows): 5 steps per epoch (4 rows dropped)
    return StepBatches(_samples(), micro_batch_size=2, grad_accum=2, seed=5, pad_id=0, pack_to=pack_to)


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(
        torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x) for x, y in zip(a, b))


def _wait_until_ahead(p: Prefetched, batches: StepBatches) -> None:
    """Until the thread has filled its queue: the wrapped iterator is then ahead of what was consumed."""
    deadline = time.monotonic() + 10
    while not p._queue.full():
        assert time.monotonic() < deadline, "the prefetch thread never filled its queue"
        time.sleep(0.01)
    assert batches.state_dict() != p.state_dict()


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "nanotune-prefetch" and t.is_alive()]


def _no_prefetch_thread_left(timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while _prefetch_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    return not _prefetch_threads()


@pytest.mark.parametrize("pack_to", [None, 64])
def test_same_batches_in_the_same_order_across_epochs(pack_to):
    plain = _batches(pack_to)
    steps = 3 * plain.steps_in_epoch(0) + 2  # three epoch boundaries
    want = list(itertools.islice(iter(plain), steps))
    p = Prefetched(_batches(pack_to), CPU)
    got = [next(p) for _ in range(steps)]
    p.close()
    assert all(_same(m, w) for (m, _), w in zip(got, want)) and len(got) == len(want)
    assert [t for _, t in got] == [[count_targets(mb["labels"]) for mb in w] for w in want]
    assert plain.state_dict() == p.state_dict() == {"epoch": 3, "step_in_epoch": 2, "rows_per_step": 4}


@pytest.mark.parametrize("consumed", [3, 5, 7])  # mid-epoch, at the end of epoch 0, in epoch 1
def test_checkpoint_while_ahead_resumes_at_the_next_consumed_batch(consumed):
    plain = list(itertools.islice(iter(_batches()), consumed + 3))
    batches = _batches()
    p = Prefetched(batches, CPU)
    for _ in range(consumed):
        next(p)
    _wait_until_ahead(p, batches)
    state = p.state_dict()  # what save_checkpoint stores
    p.close()
    resumed = _batches()
    resumed.load_state_dict(state)
    again = Prefetched(resumed, CPU)  # train.py wraps the StepBatches after load_checkpoint
    assert again.state_dict() == state
    for want in plain[consumed:]:
        assert _same(next(again)[0], want)
    again.close()


def test_an_error_preparing_a_batch_is_raised_in_the_loop_with_its_message(monkeypatch):
    batches, real, calls = _batches(), StepBatches._collate, {"n": 0}

    def bad_third_step(self, rows):  # 2 micro-batches per step: the 5th collation is step 3's first
        calls["n"] += 1
        if calls["n"] == 5:
            raise UserError("data.jsonl line 7: a bad record")
        return real(self, rows)

    monkeypatch.setattr(StepBatches, "_collate", bad_third_step)
    p = Prefetched(batches, CPU)
    next(p), next(p)  # the steps before the bad one arrive
    with pytest.raises(UserError, match="^data.jsonl line 7: a bad record$"):
        next(p)
    assert not p._thread.is_alive()
    assert p.state_dict() == {"epoch": 0, "step_in_epoch": 2, "rows_per_step": 4}


def test_early_stop_does_not_deadlock_and_the_thread_ends():
    batches = _batches()
    p = Prefetched(batches, CPU, ahead=1)
    next(p)
    _wait_until_ahead(p, batches)  # the thread now blocks on a full queue
    p.close(timeout=5)
    assert not p._thread.is_alive()
    dropped = Prefetched(_batches(), CPU)  # never closed: an exception left the loop
    thread = dropped._thread
    del dropped  # the wrapper is collected, its finalizer stops the thread
    thread.join(5)
    assert not thread.is_alive()


def test_train_leaves_no_thread_after_a_run_or_an_error(tmp_path, small_data, monkeypatch):
    import core.loss

    args = ["--dataset", str(small_data), "--max-steps", "2", "--micro-batch-size", "4", "--val-dataset", "none"]
    assert run_train(tmp_path / "ok", *args) == 0
    assert _no_prefetch_thread_left()

    def fails(*a, **k):
        raise UserError("the loss failed")

    monkeypatch.setattr(core.loss, "forward_loss_sum", fails)
    assert run_train(tmp_path / "err", *args) == 2  # raised inside the loop, before close()
    assert _no_prefetch_thread_left()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_are_pinned_and_equal():
    want = next(iter(_batches(64)))
    p = Prefetched(_batches(64), torch.device("cuda", torch.cuda.current_device()))
    micro, _ = next(p)
    p.close()
    assert all(v.is_pinned() for mb in micro for v in mb.values() if torch.is_tensor(v))
    assert _same(micro, want)
