"""Several gloo ranks on this CPU without torchrun, for the multi-process tests.

Each rank is forked from one forkserver that imported torch, transformers, DeepSpeed and train.py
once per pytest run: startup, not the math, dominates these tests. A torchrun launch imports
everything afresh in every rank: a 3-step train.py run on 2 ranks took 8.6 s that way on 2 cores,
2 s forked from the warm server (which itself starts once, in ~7 s). Each rank gets torchrun's
environment variables, one thread, the caller's environment and the repository root as its working
directory, as the tests' `subprocess.run(torchrun ..., cwd=ROOT)` did.
tests/test_launch.py still runs the real torchrun, where the launcher itself is under test.

    ranks.train(2, "--dataset", ..., "--fsdp")      # train.py's main() on 2 ranks
    ranks.run(dist_worker.run, 4, out, layouts)      # any module-level function on 4 ranks
"""

import os
import socket
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent

# what a train.py run imports (an ImportError, e.g. no DeepSpeed here, is skipped by the forkserver)
PRELOAD = ["train", "sp_worker", "dist_worker", "features.sequence_parallel", "core.model",
           "core.packing", "core.attention", "features.fsdp", "features.tensor_parallel",
           "transformers.models.llama.modeling_llama", "transformers.models.qwen2.modeling_qwen2",
           "transformers.models.mistral.modeling_mistral", "peft", "accelerate", "deepspeed"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, env: dict, fn, args: tuple) -> None:
    """One rank: the caller's environment plus what torchrun sets, in the repository root."""
    os.environ.clear()
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    os.chdir(ROOT)
    torch.set_num_threads(1)  # the ranks share 2 cores, as under torchrun with OMP_NUM_THREADS=1
    fn(*args)


def run(fn, world: int, *args, timeout: float = 300) -> None:
    """fn(*args) on `world` ranks; raises if a rank fails (its traceback is printed) or on a hang."""
    mp.set_forkserver_preload(PRELOAD)  # takes effect when the forkserver starts, once a pytest run
    ctx = mp.start_processes(_rank, args=(world, _free_port(), dict(os.environ), fn, args), nprocs=world,
                             join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):  # join raises if a rank failed
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                p.kill()
                p.join()
            raise TimeoutError(f"{world} ranks of {fn.__module__}.{fn.__name__} still running after {timeout} s")


def _train_main(argv: list[str]) -> None:
    import train

    status = train.main(argv)
    if status != 0:
        raise SystemExit(f"rank {os.environ['RANK']}: train.py exited with {status}")


def train(world: int, *argv: str, timeout: float = 300) -> None:
    """train.py's main(argv) on `world` ranks (what `torchrun --nproc_per_node world train.py argv` runs)."""
    run(_train_main, world, list(argv), timeout=timeout)
