"""--alst: the Arctic Long Sequence Training recipe as one flag, for the longest sequences.

    python train.py --alst --lora --seq-len 131072 --packing --attn flash
    torchrun --nproc_per_node 8 train.py --alst --cp 8 ...   # + Ulysses sequence parallel over --cp

Turns on, before the flags are validated, each part of the recipe the command line left at its
default: --tiled-mlp (auto tiles), --loss chunked (a hidden-state loss; --loss cce / liger are
kept when chosen), --offload cpu (checkpointed block inputs to pinned host memory; --offload disk
is kept), --ac full (--ac selective is kept), with an adapter that the fused kernels compute
--lora-kernels (kept off by --no-lora-kernels; peft's LoRA saves an fp32 copy of each projection's
input: a large share of what a recomputed block saves, benchmarks/results/2026-11-29-alst-memory-cpu.md),
and with --cp > 1 Ulysses sequence parallel (--sp-mode ulysses; ring is kept). train.py logs the resulting recipe.
Nothing is turned off. For the longest rows on one GPU add --liger and --offload-keep-gib too
(benchmarks/results/2026-11-29-long-context-h200.md).
Reference: Bekman et al., "Arctic Long Sequence Training: Scalable and Efficient Training for
Multi-Million Token Sequences" (2025, arXiv:2506.13996).
"""

import dataclasses


@dataclasses.dataclass
class AlstConfig:
    alst: bool = False
    """Long-sequence recipe: --tiled-mlp, --loss chunked, --offload cpu, --ac full, --lora-kernels with an adapter they compute (+ --sp-mode ulysses with --cp > 1); a value you set is kept."""  # noqa: E501


def _sequence_parallel(cfg):
    """The sequence-parallel config (the field holding `sp_mode`), once train.py has one."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if hasattr(value, "sp_mode"):
            return value
    return None


def _fused_lora_fits(lora) -> bool:
    """An adapter that --lora-kernels computes (core/compat.py: not DoRA, LLM.int8 or dropout)."""
    return (lora.lora or lora.qlora) and not (lora.dora or lora.lora_8bit) and lora.lora_dropout == 0


def expand(cfg) -> list[str]:
    """Set the recipe's flags on a train.py Config in place; returns the flags it turned on."""
    if not cfg.alst.alst:
        return []
    turned_on = []
    if not cfg.tiled_mlp.tiled_mlp:
        cfg.tiled_mlp.tiled_mlp = True
        turned_on.append("--tiled-mlp")
    if cfg.loss.loss == "auto":
        cfg.loss.loss = "chunked"
        turned_on.append("--loss chunked")
    if cfg.offload.offload == "none":
        cfg.offload.offload = "cpu"
        turned_on.append("--offload cpu")
    if cfg.checkpointing.ac == "none":
        cfg.checkpointing.ac = "full"
        turned_on.append("--ac full")
    kernels = cfg.lora_kernels
    if _fused_lora_fits(cfg.lora) and not cfg.gptq.gptq and not (kernels.lora_kernels or kernels.no_lora_kernels):
        cfg.lora_kernels.lora_kernels = True
        turned_on.append("--lora-kernels")
    sp = _sequence_parallel(cfg)
    if sp is not None and cfg.mesh.cp > 1 and sp.sp_mode == "none":
        sp.sp_mode = "ulysses"
        turned_on.append("--sp-mode ulysses")
    cfg.alst.turned_on = turned_on  # for describe(); not a field, so not a flag
    return turned_on


def describe(cfg) -> str:
    sp = _sequence_parallel(cfg)
    parts = [f"--tiled-mlp (shards {cfg.tiled_mlp.tiled_mlp_shards or 'auto'})", f"--loss {cfg.loss.loss}",
             f"--offload {cfg.offload.offload}", f"--ac {cfg.checkpointing.ac}"]
    if cfg.lora_kernels.lora_kernels:
        parts.append("--lora-kernels")
    if sp is not None and sp.sp_mode != "none":
        parts.append(f"--sp-mode {sp.sp_mode} over --cp {cfg.mesh.cp}")
    added = getattr(cfg.alst, "turned_on", [])
    return f"alst: {', '.join(parts)} (turned on by --alst: {', '.join(added) or 'none, all set already'})"
