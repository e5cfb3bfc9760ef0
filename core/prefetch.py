"""Prefetch: the next steps' micro-batches are prepared in a background thread while this step runs.

Without it, every step ends with one host sync (core/faults.py StepGuard.update_ok), so on a GPU
the host waits for the step to finish and only then collates the next step's micro-batches (packing
included), counts their targets, and copies them from pageable memory, which makes a
`non_blocking=True` copy synchronous; meanwhile the GPU idles. `Prefetched` does the collation, the
target count and (on CUDA) `pin_memory()` one or two steps ahead in a daemon thread, so the loop
takes a ready batch and its host-to-device copy from pinned memory is truly asynchronous. What is
left on the critical path is a queue get and the launch of the copies. (Not measured here; the
thread shares the GIL with the loop, as DataLoader's pin-memory thread does.)

The batches and their order are exactly those of the wrapped StepBatches. The wrapped iterator runs
ahead, so its own position is that of the prefetched batches: each item carries the position
snapshot taken right after it was drawn, and `state_dict()` is the position of the last batch the
loop consumed, which is what a checkpoint must save. Resume by loading the StepBatches before
wrapping it. An error raised while preparing a batch (a UserError from bad data) is raised again by
`next()` in the loop, the same exception object. The thread stops at `close()`, when the wrapper is
dropped (an exception ended the run), or after an error; it is a daemon, so it never holds the
process open.

    step_batches = Prefetched(batches, d.device)
    micro, targets = next(step_batches)
    save_checkpoint(..., step_batches, ...)   # the consumed position
    step_batches.close()

Works with every feature: it changes where batches are prepared, not what they hold. The pattern
is PyTorch DataLoader's pin-memory thread (torch.utils.data._utils.pin_memory).
"""

import queue
import threading
import weakref

import torch

from core.loss import count_targets

_POLL_S = 0.05  # how often a thread blocked on a full queue checks that it should stop


class Prefetched:
    """Iterates (micro-batches, their target counts) of a StepBatches, prepared in advance: `ahead` steps
    wait in the queue and the thread holds one more (ready, or in the making), so 1 keeps two steps ahead."""

    def __init__(self, batches, device: torch.device, ahead: int = 1):
        self._state = batches.state_dict()  # nothing consumed yet: the position it starts from (a resume's)
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        pin_device = torch.device(device) if torch.device(device).type == "cuda" else None
        # the thread gets no reference to self, so dropping the wrapper finalizes it and stops the thread
        self._thread = threading.Thread(target=_produce, name="nanotune-prefetch", daemon=True,
                                        args=(batches, self._queue, self._stop, pin_device))
        self._finalizer = weakref.finalize(self, self._stop.set)
        self._thread.start()

    def __iter__(self):
        return self

    def __next__(self) -> tuple[list[dict], list[int]]:
        assert not self._stop.is_set(), "next() on a closed Prefetched"
        item = self._queue.get()
        if isinstance(item, BaseException):  # preparing this batch failed (or the end): the loop sees the same
            self.close()
            raise item
        micro, targets, self._state = item
        return micro, targets

    def state_dict(self) -> dict:
        """The data position after the last batch handed to the loop (not after the prefetched ones)."""
        return dict(self._state)

    def close(self, timeout: float = 10.0) -> None:
        """Stops the thread and waits for it: it finishes the batch in hand (one step's collation, or the
        first step of a new epoch, whose packing plan is computed then), then sees the stop."""
        self._stop.set()
        self._thread.join(timeout)


def _produce(batches, q: queue.Queue, stop: threading.Event, pin_device) -> None:
    """The thread: draws, counts and pins batches in order until stopped; an error ends it, queued."""
    try:
        if pin_device is not None and pin_device.index is not None:  # pinned memory is registered on the
            torch.cuda.set_device(pin_device)  # thread's current device (as DataLoader does); "cuda" = that one
        for micro in batches:
            position = batches.state_dict()  # read in this thread, right after the generator advanced it
            targets = [count_targets(mb["labels"]) for mb in micro]  # from host memory: no device sync
            if pin_device is not None:
                micro = [{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in mb.items()} for mb in micro]
            if not _put(q, stop, (micro, targets, position)):
                return
        _put(q, stop, StopIteration())  # a finite iterable ran out (StepBatches never does)
    except BaseException as e:  # noqa: BLE001 (handed to the loop, which raises it)
        _put(q, stop, e)


def _put(q: queue.Queue, stop: threading.Event, item) -> bool:
    """Blocks while the queue is full, but wakes up to see a stop; False when stopped."""
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            pass
    return False
