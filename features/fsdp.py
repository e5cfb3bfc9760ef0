"""Data-parallel sharding: FSDP2 (`fully_shard` per decoder block + root), HSDP, or DDP.

    torchrun --nproc_per_node 8 train.py --fsdp                       # FSDP2 over 8 ranks (ZeRO-3 style)
    torchrun --nproc_per_node 8 train.py --fsdp --dp-replicate 2      # HSDP: 2 replicas x 4 shards
    torchrun --nproc_per_node 8 train.py --qlora --fsdp               # QLoRA + FSDP2 (4-bit base sharded too)
    torchrun --nproc_per_node 4 train.py --fsdp --fsdp-cpu-offload    # params, grads, optimizer on the CPU
    torchrun --nproc_per_node 4 train.py --ddp                        # plain DDP (the default with >1 rank)

FSDP2 shards every parameter over the "dp_shard_cp" mesh dim (and replicates over
"dp_replicate": HSDP); each decoder block is one all-gather / reduce-scatter unit, the root unit
holds embeddings, final norm and head. Gradients are averaged over "dp_cp", which train.py's loss
scale (`Dist.grad_ranks`) accounts for. Mixed precision: with --precision bf16-mixed the
all-gathered params are bf16 and gradients are reduced in fp32 (MixedPrecisionPolicy).
Reference: PyTorch FSDP2 (torch.distributed.fsdp.fully_shard), torchtitan's apply_fsdp.

--fsdp-keep-gathered trades memory (every block's full weights, from the first forward to the last
backward of a step) for communication: each block is gathered once per optimizer step instead of
twice per micro-batch (forward, then again for backward). Gathering once a step scales better
across GPUs at some memory cost (benchmarks/results/2026-11-30-scaling-2xh200.md).

Works with: LoRA/QLoRA (the packed 4-bit base is sharded like any weight), --tp
(2-D FSDP x TP), activation checkpointing, sequence parallel, DCP checkpoints (resume on another
world size). Refused with: --ddp together with --fsdp; --deepspeed; --tp or --cp > 1 with --ddp.
"""

import dataclasses
from typing import Literal

import torch

from core import UserError
from core.distributed import Dist, attention_blocks, launched_world_size, mesh_shape


@dataclasses.dataclass
class ShardingConfig:
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state with FSDP2 over the dp ranks (HSDP with --dp-replicate > 1)."""
    ddp: bool = False
    """Replicate the model with DistributedDataParallel (what several ranks do without --fsdp)."""
    fsdp_keep_gathered: bool = False
    """Keep each block's gathered params from forward to backward and across a step's micro-batches (one all-gather per block per step: faster, ZeRO-2-like memory)."""  # noqa: E501
    fsdp_cpu_offload: bool = False
    """Keep sharded params, grads and the optimizer step on the CPU (FSDP2 CPUOffloadPolicy)."""
    fsdp_reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """Dtype of the gradient reduce-scatter with --precision bf16-mixed."""


def validate(cfg) -> None:
    """FSDP's own settings (--fsdp with --ddp, --tp or --cp with --ddp, the --fsdp-* flags alone: core/compat.py)."""
    s = cfg.sharding
    if s.fsdp_reduce_dtype != "fp32" and not s.fsdp:
        raise UserError(f"--fsdp-reduce-dtype {s.fsdp_reduce_dtype} needs --fsdp; add --fsdp or drop it")
    world = launched_world_size()
    if cfg.mesh.tp > 1 and world > 1 and not s.fsdp:
        replicate, shard, cp, tp = mesh_shape(cfg.mesh, world)
        if replicate * shard * cp > 1:
            raise UserError(_tp_needs_fsdp(tp, replicate * shard * cp))


def _tp_needs_fsdp(tp: int, grad_ranks: int) -> str:
    return (f"--tp {tp} with {grad_ranks} data-parallel ranks needs --fsdp (DDP cannot hold tensor-parallel shards); "
            f"add --fsdp")


def quantization_storage(qconfig, cfg: ShardingConfig):
    """--qlora --fsdp: a hub model's 4-bit base is loaded with bf16 storage (bnb_4bit_quant_storage:
    the packed bytes viewed as bf16), the dtype of the weights around it, as FSDP-QLoRA recipes do;
    a preset's base is quantized with the same storage (core/quantize.py). FSDP2 on torch 2.13 also
    shards uint8 storage, but torch 2.11's fully_shard refuses it ("only Tensors of floating point
    dtype can require gradients")."""
    if cfg.fsdp and qconfig is not None and getattr(qconfig, "load_in_4bit", False):
        qconfig.bnb_4bit_quant_storage = torch.bfloat16
    return qconfig


def _fsdp_mesh(d: Dist):
    return d.sub("dp_replicate", "dp_shard_cp") if d.size("dp_replicate") > 1 else d.sub("dp_shard_cp")


def apply_fsdp(model, cfg: ShardingConfig, d: Dist, precision: str):
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy()
    if precision == "bf16-mixed":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                  reduce_dtype=torch.float32 if cfg.fsdp_reduce_dtype == "fp32" else torch.bfloat16)
    kwargs = dict(mesh=_fsdp_mesh(d), mp_policy=mp,
                  offload_policy=CPUOffloadPolicy() if cfg.fsdp_cpu_offload else OffloadPolicy())
    blocks = attention_blocks(model, "--fsdp")
    for i, block in enumerate(blocks):  # the last block is resharded by the root anyway: skip that work
        fully_shard(block, reshard_after_forward=not cfg.fsdp_keep_gathered and i < len(blocks) - 1, **kwargs)
    # the root unit is the HF model itself, also under peft: PeftModel.generate calls the base model's
    # generate, which would skip a root on the PeftModel wrapper (it holds no parameters of its own)
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    fully_shard(root, reshard_after_forward=False, **kwargs)  # the root's weights are needed right back
    root.keep_gathered = cfg.fsdp_keep_gathered  # read by distributed.sync_gradients
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]

    def reshard_after_no_grad_forward(module, args, output):
        # evaluation has no backward to reshard the root (and kept-gathered blocks); the optimizer
        # and DCP need the sharded parameters registered again
        if not torch.is_grad_enabled():
            for unit in units:
                unit.reshard()
        return output

    root.register_forward_hook(reshard_after_no_grad_forward)
    return model


def apply_ddp(model, d: Dist):
    from torch.nn.parallel import DistributedDataParallel

    ids = [d.device.index] if d.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, process_group=d.sub("dp_cp").get_group())


def apply_sharding(model, cfg: ShardingConfig, d: Dist, precision: str):
    """Step 11 of train.py's order: FSDP2 when asked, else DDP when gradients need averaging."""
    if cfg.fsdp:
        return apply_fsdp(model, cfg, d, precision)
    if d.grad_ranks > 1 and d.size("tp") > 1:  # compat: --tp x data parallel without --fsdp
        raise UserError(_tp_needs_fsdp(d.size("tp"), d.grad_ranks))
    if d.size("tp") > 1:  # FSDP over the one dp rank shards nothing but makes every parameter a
        return apply_fsdp(model, cfg, d, precision)  # DTensor: AdamW's foreach refuses mixed groups (torch 2.13)
    return apply_ddp(model, d) if d.grad_ranks > 1 else model


def gather_full(model, d: Dist):
    """Full parameters for the final export on rank 0, gathered on every rank: each sharded
    DTensor parameter (FSDP2, TP) is replaced by its full tensor (the run is over, nothing reshards)."""
    from torch.distributed.tensor import DTensor

    if d.mesh is None:
        return model
    full = {}  # one full tensor a sharded parameter: tied ones (embeddings and head) stay one in the export
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if isinstance(p, DTensor):
                if id(p) not in full:
                    full[id(p)] = _full_parameter(module, name, p.full_tensor(), p.requires_grad)
                module.register_parameter(name, full[id(p)])
    return model


def _full_parameter(module, name: str, full: torch.Tensor, requires_grad: bool) -> torch.nn.Parameter:
    quant_state = getattr(module, "quant_state", None)  # bitsandbytes Linear4bit keeps it for FSDP
    if name != "weight" or quant_state is None:
        return torch.nn.Parameter(full, requires_grad)
    import bitsandbytes as bnb  # --qlora: the packed 4-bit bytes (FSDP stored them as bf16)

    return bnb.nn.Params4bit(full.view(torch.uint8), requires_grad=False, quant_state=quant_state,
                             quant_type=quant_state.quant_type, module=module, bnb_quantized=True)


def apply(model, cfg, run):
    """--fsdp / --ddp / HSDP: shard or replicate the final modules over the data-parallel ranks."""
    return apply_sharding(model, cfg.sharding, run.d, run.precision)
