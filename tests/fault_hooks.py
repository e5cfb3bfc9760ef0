"""Test-only wrapper around train.main for the fault tests that kill a real process.

    python tests/fault_hooks.py --slow-save-at 4 --marker M -- <train.py flags>

--slow-save-at N makes the checkpoint save of step N stall (after its weights are written, before
its manifest and rename) and touch MARKER, so a test can SIGKILL the process mid-save.
--step-sleep S sleeps S seconds after each training forward, so a signal sent from outside lands
mid-run on a fast machine too. --oom-at-step N makes the training forward of step N raise
torch.OutOfMemoryError on rank 0 while the prefetch thread is busy inside torch calls. Nothing in train.py or
features/ reads these: the patches live here.
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _slow_manifest(step: int, marker: Path):
    import core.checkpoint as ckpt

    original = ckpt.write_manifest

    def slow(path: Path) -> None:
        if path.name.endswith(f"step_{step:08d}"):
            marker.write_text(str(path))
            time.sleep(600)  # the test kills us here
        original(path)

    ckpt.write_manifest = slow


def _slow_steps(seconds: float):
    import torch

    import core.loss


    original = core.loss.forward_loss_sum

    def slow(*args, **kwargs):
        if torch.is_grad_enabled():
            time.sleep(seconds)
        return original(*args, **kwargs)

    core.loss.forward_loss_sum = slow


def _oom_at_step(step: int):
    import os

    import torch

    import core.prefetch as prefetch
    import core.loss

    count, forward, calls = prefetch.count_targets, core.loss.forward_loss_sum, {"n": 0}

    def busy_count(labels):  # a second of matmuls, each one outside the GIL: where the thread mostly is
        a = torch.randn(512, 512)
        for _ in range(200):
            a = a @ a / 512 ** 0.5
        return count(labels)

    def oom(*args, **kwargs):
        calls["n"] += torch.is_grad_enabled()
        if calls["n"] == step and os.environ.get("RANK", "0") == "0":  # one rank, as a real one usually is
            time.sleep(0.2)  # the thread is well into preparing a later step
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB.")
        return forward(*args, **kwargs)

    prefetch.count_targets, core.loss.forward_loss_sum = busy_count, oom


def guard_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Two gloo ranks poll StepGuard: rank 1 alone gets SIGUSR1, rank 0 alone sees a NaN loss."""
    import json
    import os
    import signal

    import torch
    import torch.distributed as dist

    from core.distributed import Dist
    from core.faults import FaultsConfig, StepGuard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    guard = StepGuard(FaultsConfig(), Dist(rank=rank, world_size=world))
    one = torch.tensor(1.0)
    steps = [guard.update_ok(torch.tensor(float("nan")) if rank == 0 else one, one, 1)]  # NaN on rank 0 only
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)
    steps.append(guard.update_ok(one, one, 2))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"ok": steps, "stop": guard.stop, "signal": guard.signal,
                                                             "skipped": guard.skipped}))
    guard.close()
    dist.destroy_process_group()


def main(argv: list[str]) -> int:
    split = argv.index("--")
    own, train_args = argv[:split], argv[split + 1:]
    if "--slow-save-at" in own:
        _slow_manifest(int(own[own.index("--slow-save-at") + 1]), Path(own[own.index("--marker") + 1]))
    if "--step-sleep" in own:
        _slow_steps(float(own[own.index("--step-sleep") + 1]))
    if "--oom-at-step" in own:
        _oom_at_step(int(own[own.index("--oom-at-step") + 1]))
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))  # conftest's: the in-process runs' order
    import train

    return train.main(train_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
