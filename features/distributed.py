"""Process setup: the one place that reads torchrun's RANK / LOCAL_RANK / WORLD_SIZE.

    python train.py                                   # one process: nothing here does anything
    torchrun --nproc_per_node 4 train.py ...          # data parallel (DDP) over 4 processes

With several processes the model is wrapped in DistributedDataParallel; gradients are averaged
over ranks, which train.py's loss normalization accounts for (see features/loss.py).
"""

import contextlib
import dataclasses
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> Dist:
    """Join the process group torchrun set up (if any) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return Dist(rank, local_rank, world, dev)


def all_reduce_sum(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum over ranks (a no-op with one process)."""
    if d.world_size > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def global_count(n: int, d: Dist) -> int:
    """An integer summed over ranks (returned to the host: the loss needs it before backward)."""
    if d.world_size == 1:
        return n
    return int(all_reduce_sum(torch.tensor(n, device=d.device), d).item())


def wrap_data_parallel(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    if d.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [d.device.index] if d.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def sync_gradients(model: torch.nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step (DDP's no_sync)."""
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def broadcast_object(obj, d: Dist):
    """Rank 0's value of obj on every rank (for values that must agree, like a timestamped dir)."""
    if d.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist) -> None:
    if d.world_size > 1:
        dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
