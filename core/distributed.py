"""Process setup: the one place that reads RANK / LOCAL_RANK / WORLD_SIZE, and the device mesh.

    python train.py                                             # one process: nothing here does anything
    torchrun --nproc_per_node 4 train.py ...                    # data parallel (DDP) over 4 ranks
    torchrun --nproc_per_node 8 train.py --fsdp --dp-replicate 2      # HSDP: 2 replicas x 4 shards
    torchrun --nproc_per_node 8 train.py --fsdp --tp 2          # 4-way FSDP x 2-way tensor parallel
    srun torchrun --nnodes $N --rdzv-backend c10d ... train.py  # SLURM: see launch/slurm.sbatch

With several processes (or a sharding flag) one DeviceMesh with the named dims
(dp_replicate, dp_shard, cp, tp) is kept on `Dist.mesh`, plus flattened views: "dp"
(dp_replicate x dp_shard: ranks that read different batches), "dp_shard_cp" (what FSDP shards
over) and "dp_cp" (the ranks gradients are averaged over). Reference: torchtitan's
ParallelDims; torch.distributed.device_mesh.

Accounting (train.py): batches are split over the "dp" ranks (tp and cp ranks of a dp rank read
the same batch), trained-token counts are summed over "dp" (counts of the unsharded batches), and
the loss is scaled by `grad_ranks` (= dp x cp) because DDP/FSDP average gradients over "dp_cp":
the gradient is then sum(token losses of all ranks) / global trained tokens, as with one process.

Works with: --fsdp / --ddp (features/fsdp.py), --tp (features/tensor_parallel.py), sequence
parallel on the "cp" dim. Refused: dims whose product is not the world size.
"""

import contextlib
import dataclasses
import datetime
import json
import os
import socket
import time
import warnings

import torch
import torch.distributed as dist

from core import UserError

# torch 2.13 warns that slicing flattened mesh dims "will be deprecated" (Dist.sub, every step). A filter
# set here once, not around each call: entering warnings.catch_warnings() every step resets Python's
# once-per-place registry, and every library warning would then print again at each step.
warnings.filterwarnings("ignore", "Slicing a flattened dim", UserWarning)

DIMS = ("dp_replicate", "dp_shard", "cp", "tp")


@dataclasses.dataclass
class MeshConfig:
    dp_replicate: int = 1
    """Data-parallel replicas; with --fsdp each replica shards over --dp-shard ranks (HSDP)."""
    dp_shard: int = -1
    """Data-parallel ranks inside a replica (FSDP shards parameters over them); -1 = the ranks the other dims leave."""
    cp: int = 1
    """Context-parallel ranks that split each sequence (sequence parallelism); 1 = off."""
    tp: int = 1
    """Tensor-parallel ranks (column/row-parallel decoder projections, features/tensor_parallel.py); 1 = off."""


@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    mesh: object = None
    """The DeviceMesh (None with one process and no sharding flag)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sub(self, *dims: str):
        """A sub-mesh by name(s), flattened ones ("dp", "dp_shard_cp", "dp_cp") included."""
        return self.mesh[dims if len(dims) > 1 else dims[0]]

    def size(self, dim: str) -> int:
        return self.sub(dim).size() if self.mesh is not None else 1

    @property
    def dp_rank(self) -> int:
        """Which slice of each global batch this rank reads."""
        return self.sub("dp").get_local_rank() if self.mesh is not None else 0

    @property
    def dp_size(self) -> int:
        """Ranks that read different batches (tp and cp ranks share theirs)."""
        return self.size("dp")

    @property
    def grad_ranks(self) -> int:
        """Ranks that DDP/FSDP average gradients over (dp x cp); the loss is scaled by it."""
        return self.size("dp_cp")


def validate(cfg) -> None:
    for name in DIMS:
        value = getattr(cfg.mesh, name)
        if value < 1 and not (name == "dp_shard" and value == -1):
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} must be >= 1" + (" or -1 (infer)" if name == "dp_shard" else "") +
                            f" (got {value})")


def launched_world_size() -> int:
    """The processes torchrun started (1 without it): known before anything loads, so a layout that
    cannot work is refused at start-up."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def mesh_shape(cfg: MeshConfig, world: int) -> tuple[int, ...]:
    """The sizes of (dp_replicate, dp_shard, cp, tp) for `world` ranks, dp_shard = -1 inferred."""
    fixed = cfg.dp_replicate * cfg.cp * cfg.tp
    shard = cfg.dp_shard if cfg.dp_shard != -1 else world // fixed
    dims = f"--dp-replicate {cfg.dp_replicate} x --dp-shard {cfg.dp_shard} x --cp {cfg.cp} x --tp {cfg.tp}"
    if world == 1 and max(cfg.dp_replicate, cfg.dp_shard, cfg.cp, cfg.tp) > 1:
        ranks = cfg.dp_replicate * max(cfg.dp_shard, 1) * cfg.cp * cfg.tp
        raise UserError(f"{dims} needs {ranks} processes and this is one; launch with torchrun --nproc_per_node "
                        f"{ranks} train.py ... (or python launch/torchrun.py, the same with one line on a failure)")
    if cfg.dp_shard == -1 and world % fixed:  # nothing left for --dp-shard to take
        raise UserError(f"{dims}: --dp-replicate x --cp x --tp = {fixed} does not divide the world size {world}; "
                        f"pick them so that their product divides {world}")
    if shard < 1 or fixed * shard != world:
        raise UserError(f"{dims} does not multiply to the world size {world}; pick dims whose "
                        f"product is {world} (or --dp-shard -1 to infer it)")
    return cfg.dp_replicate, shard, cfg.cp, cfg.tp


def build_mesh(device_type: str, shape: tuple[int, ...]):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, shape, mesh_dim_names=DIMS)
    # _flatten is DeviceMesh's (private) way to name merged dims, as torchtitan does (torch 2.13)
    mesh["dp_replicate", "dp_shard"]._flatten("dp")
    mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
    return mesh


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str = "auto", mesh_cfg: MeshConfig | None = None, need_group: bool = False) -> Dist:
    """Join the process group torchrun (or srun + torchrun) set up and build the device mesh.

    need_group: a sharding engine (FSDP2, DeepSpeed) wants a process group and mesh even with
    one process; without torchrun's env a single-rank group on a free local port is made.
    """
    mesh_cfg = mesh_cfg or MeshConfig()
    world = launched_world_size()
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    shape = mesh_shape(mesh_cfg, world)
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world == 1 and not need_group:
        return Dist(rank, local_rank, world, dev)
    if not dist.is_initialized():
        init = None if "MASTER_ADDR" in os.environ else f"tcp://127.0.0.1:{_free_port()}"
        os.environ.setdefault("LOCAL_RANK", str(local_rank))  # DeepSpeed reads it, also in one process
        # 30 minutes, not NCCL's 10: rank 0 alone writes and hashes a large checkpoint or final model
        # while the others wait at the next collective
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method=init, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30))
    return Dist(rank, local_rank, world, dev, build_mesh(dev.type, shape))


def _dp_group(d: Dist):
    return d.sub("dp").get_group()


def all_reduce_sum(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum over the data-parallel ranks (tp / cp ranks of a dp rank hold the same batch; a no-op
    with one)."""
    if d.dp_size > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=_dp_group(d))
    return value


def global_count(n: int, d: Dist) -> int:
    """An integer summed over the dp ranks (returned to the host: the loss needs it before backward)."""
    if d.dp_size == 1:
        return n
    return int(all_reduce_sum(torch.tensor(n, device=d.device), d).item())


def is_sharded(model: torch.nn.Module) -> bool:
    """FSDP2 / tensor-parallel parameters (DTensors) or DeepSpeed ZeRO-3 partitions (`ds_id`):
    every forward is a collective over ranks."""
    from torch.distributed.tensor import DTensor

    return dist.is_initialized() and any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def sync_gradients(model: torch.nn.Module, sync: bool):
    """Skip the gradient reduction on all but the last micro-batch of a step (DDP's no_sync,
    FSDP2's set_requires_gradient_sync; DeepSpeed's engine reduces in its step() anyway). With
    --fsdp-keep-gathered, FSDP2 also keeps the weights gathered until that last backward."""
    if type(model).__name__ == "DeepSpeedEngine":
        return contextlib.nullcontext()
    root = model.get_base_model() if hasattr(model, "get_base_model") else model  # FSDP's root under peft
    if hasattr(root, "set_requires_gradient_sync"):
        root.set_requires_gradient_sync(sync)
        if getattr(root, "keep_gathered", False):  # --fsdp-keep-gathered: reshard only after the step's last backward
            root.set_reshard_after_backward(sync)
        return contextlib.nullcontext()
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
    if d.world_size > 1:  # NCCL: on this rank's GPU, named (torch warns when it has to guess it)
        dist.barrier(device_ids=[d.device.index] if d.device.type == "cuda" else None)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def record_error(message: str) -> None:
    """Hand this rank's one-line error to torchrun, whose failure summary then shows it (as "traceback :")
    instead of "error_file: <N/A>" and a link. torchrun names a file per worker in TORCHELASTIC_ERROR_FILE;
    the layout is what torch.distributed.elastic's ErrorHandler writes, with the line as the call stack."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        info = {"py_callstack": message, "timestamp": str(int(time.time()))}
        with open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": info}}, f)


# what gloo says (torch 2.13) when the process at the other end of a collective has exited
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "remote worker crashing")  # lower case


def peer_failure(err: BaseException) -> str | None:
    """The one-line error of a rank whose collective broke because another rank exited first (that
    rank prints why); None for any other error, which keeps its traceback."""
    if not any(words in str(err).lower() for words in _PEER_GONE):
        return None
    return f"rank {os.environ.get('RANK', '0')} stopped: another rank exited first (its error says why)"


def attention_blocks(model, flag: str) -> list[torch.nn.Module]:
    """The decoder blocks (the items of the first nn.ModuleList whose layers have self_attn) that
    `flag` (--fsdp, --tp) shards one by one."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and hasattr(module[0], "self_attn"):
            return list(module)
    raise UserError(f"{flag}: found no decoder blocks (a ModuleList of layers with self_attn) in the model")
