"""Tensor parallelism of the decoder with DTensor: column-parallel q/k/v/gate/up, row-parallel o/down.

    torchrun --nproc_per_node 2 train.py --tp 2                       # 2-way TP, one data-parallel rank
    torchrun --nproc_per_node 8 train.py --tp 2 --fsdp                # 4-way FSDP x 2-way TP (2-D)

Each tp rank holds 1/tp of the attention heads and of the MLP's intermediate features; one
all-reduce after o_proj and one after down_proj per block (Megatron-LM's f/g pair, done by
DTensor's ColwiseParallel / RowwiseParallel). Embeddings, norms and the head stay whole on every
tp rank. The tp ranks of a dp rank read the same batch (see features/distributed.py).
Reference: Shoeybi et al. 2019, Megatron-LM; torch.distributed.tensor.parallel; gpt-fast's tp.py.

Works with: --fsdp (FSDP shards the TP'd DTensors over the dp dims), packing, every attention
backend (heads are local), activation checkpointing, DCP checkpoints (a 1-D FSDP checkpoint
resumes as FSDP x TP). Without --fsdp and one dp rank, FSDP over that rank still wraps the model
(nothing sharded) so every parameter is a DTensor, as AdamW's foreach kernels need. Refused with:
heads or kv heads not divisible by --tp; LoRA/QLoRA (peft's layers are not nn.Linear); --ddp;
several dp ranks without --fsdp.
"""

import torch

from features import UserError
from features.distributed import Dist

_COLWISE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
_ROWWISE = ("self_attn.o_proj", "mlp.down_proj")


def validate(tp: int, model_config, lora_enabled: bool) -> None:
    if tp == 1:
        return
    if lora_enabled:  # compat: --tp x --lora/--qlora
        raise UserError("--tp shards nn.Linear layers and peft's LoRA layers are not; drop --tp (use --fsdp) "
                        "or train without LoRA")
    heads, kv = model_config.num_attention_heads, getattr(model_config, "num_key_value_heads", None)
    kv = kv or heads
    if heads % tp or kv % tp:
        raise UserError(f"--tp {tp} must divide the attention heads ({heads}) and key/value heads ({kv}) "
                        f"of the model; pick a --tp that divides both")


def apply_tensor_parallel(model, d: Dist):
    """Shard each decoder block's projections over the "tp" mesh dim (in place)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {name: ColwiseParallel() for name in _COLWISE} | {name: RowwiseParallel() for name in _ROWWISE}
    for block in _decoder_blocks(model):
        parallelize_module(block, d.mesh["tp"], {k: v for k, v in plan.items() if _has(block, k)})
    return model


def _has(module, dotted: str) -> bool:
    try:
        module.get_submodule(dotted)
        return True
    except AttributeError:
        return False


def _decoder_blocks(model) -> list[torch.nn.Module]:
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and hasattr(module[0], "self_attn"):
            return list(module)
    raise UserError("--tp: found no decoder blocks (a ModuleList of layers with self_attn) in the model")
