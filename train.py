"""nanotune: fine-tune open LLMs with one readable PyTorch loop.

    python train.py                                        # the embedded CPU demo (< 3 minutes)
    python train.py --model meta-llama/Llama-3.1-8B --dataset my.jsonl --seq-len 4096
    torchrun --nproc_per_node 8 train.py --model llama3-8b --dataset my.jsonl
    python train.py --help                                 # every flag

The story, top to bottom: parse -> dist -> data -> model -> features (fixed order) ->
optimizer -> steps -> save. The step loop has no feature branches; a feature changes the model,
the batches or the loss before the loop starts.
"""

import dataclasses
import functools
import sys
import time
from pathlib import Path
from typing import Literal

import torch
import tyro

from features import UserError, attention, defaults, lora, lora_kernels, offload, overrides
from features.attention import AttentionConfig
from features.batches import StepBatches, count_tokens, to_device
from features.checkpointing import CheckpointingConfig, apply_checkpointing
from features.offload import OffloadConfig, apply_offload
from features.embedding_offload import EmbeddingOffloadConfig, apply_embedding_offload
from features import tiled_mlp
from features.tiled_mlp import TiledMLPConfig, apply_tiled_mlp
from features import liger
from features.liger import LigerConfig, apply_liger
from features import alst
from features.alst import AlstConfig
from features.chunked_loss import LossConfig, apply_chunked_loss, forward_chunked_loss_sum
from features import fused_loss
from features.fused_loss import forward_fused_loss_sum
from features.compile import CompileConfig, apply_compile, compile_loss
from features.checkpoint import checkpoints, export_hf, load_checkpoint, resolve_resume, save_checkpoint
from features.data import DataConfig, load_splits
from features.distributed import (Dist, all_reduce_sum, barrier, broadcast_object, global_count,
                                  init_distributed, sync_gradients, teardown, unwrap)
from features import distributed, fsdp, tensor_parallel
from features.distributed import MeshConfig
from features.fsdp import ShardingConfig, apply_sharding, clip_grad_norm, gather_full
from features.tensor_parallel import apply_tensor_parallel
from features import deepspeed_zero
from features.deepspeed_zero import DeepSpeedConfig
from features import sequence_parallel
from features.sequence_parallel import SequenceParallelConfig
from features.evaluate import exact_match, validation_loss
from features import compat, faults, optional
from features.faults import FaultsConfig, StepGuard
from features.lora import LoraConfig
from features.lora_kernels import LoraKernelsConfig
from features.loss import cross_entropy_sum, forward_loss_sum
from features.model import (ModelConfig, autocast, check_vocab, count_params, load_config, load_model,
                            load_tokenizer, resolve_precision, train_flops)
from features.optim import OptimConfig, build_optimizer, build_scheduler
from features.overrides import OverridesConfig, apply_overrides
from features.packing import PackingConfig
from features.prefetch import Prefetched
from features import qat
from features.qat import QatConfig
from features import fp8
from features.fp8 import Fp8Config
from features import gptq
from features.gptq import GptqConfig
from features.runlog import MetricsLog, StepMeter, write_run_info
from features import tracking
from features.tracking import TrackingConfig


@dataclasses.dataclass
class TrainConfig:
    micro_batch_size: int | None = None
    """Rows per forward/backward pass on each rank (samples, or packed --seq-len rows); unset: 2 (the demo: 32)."""
    grad_accum: int | None = None
    """Micro-batches per optimizer step (global batch = micro-batch-size x grad-accum x ranks); unset: 4 (demo: 1)."""
    max_steps: int = -1
    """Optimizer steps to run; -1 derives them from --epochs."""
    epochs: float | None = None
    """Passes over the training data (fractions allowed), when --max-steps is -1; unset: 3 (the demo: 1.6)."""
    seed: int = 0
    """Seeds the weights of presets, the data order and dropout."""
    output_dir: str | None = None
    """Run directory (config, metrics, checkpoints, final model); default runs/<date-time>."""
    log_every: int = 25
    """Optimizer steps between log lines (step 1 and the last step are always logged)."""
    eval_every: int = 0
    """Optimizer steps between validation passes; 0 = only before training and at the end."""
    eval_exact_match: int = 128
    """Validation samples answered greedily and scored by exact match, before and after training."""
    save_every: int = 0
    """Optimizer steps between checkpoints (0 = none; with N > 0 the last step is saved too)."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept on disk (0 keeps all)."""
    resume: str | None = None
    """A checkpoint directory to continue from, or 'auto' for the latest in --output-dir."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; auto picks CUDA when available."""
    skip_export: bool = False
    """Do not write the final model to <output-dir>/final (benchmarks; checkpoints still follow --save-every)."""


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    overrides: OverridesConfig = dataclasses.field(default_factory=OverridesConfig)
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    packing: PackingConfig = dataclasses.field(default_factory=PackingConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    lora_kernels: LoraKernelsConfig = dataclasses.field(default_factory=LoraKernelsConfig)
    alst: AlstConfig = dataclasses.field(default_factory=AlstConfig)
    liger: LigerConfig = dataclasses.field(default_factory=LigerConfig)
    tiled_mlp: TiledMLPConfig = dataclasses.field(default_factory=TiledMLPConfig)
    qat: QatConfig = dataclasses.field(default_factory=QatConfig)
    fp8: Fp8Config = dataclasses.field(default_factory=Fp8Config)
    gptq: GptqConfig = dataclasses.field(default_factory=GptqConfig)
    checkpointing: CheckpointingConfig = dataclasses.field(default_factory=CheckpointingConfig)
    offload: OffloadConfig = dataclasses.field(default_factory=OffloadConfig)
    embedding_offload: EmbeddingOffloadConfig = dataclasses.field(default_factory=EmbeddingOffloadConfig)
    compile: CompileConfig = dataclasses.field(default_factory=CompileConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    faults: FaultsConfig = dataclasses.field(default_factory=FaultsConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    sharding: ShardingConfig = dataclasses.field(default_factory=ShardingConfig)
    deepspeed: DeepSpeedConfig = dataclasses.field(default_factory=DeepSpeedConfig)
    sequence_parallel: SequenceParallelConfig = dataclasses.field(default_factory=SequenceParallelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    auto: tyro.conf.Suppress[list[str]] = dataclasses.field(default_factory=list)
    """The values features/defaults.py chose, each with its reason (not a flag; kept in config.json)."""


CLI = (tyro.conf.OmitArgPrefixes, tyro.conf.FlagCreatePairsOff)  # --packing; --no-packing is its own field


def validate(cfg: Config) -> None:
    """Refuse values and combinations that cannot work, naming the flag and the fix."""
    t, o, d = cfg.train, cfg.optim, cfg.data
    checks = [
        (d.seq_len is None or d.seq_len >= 2, f"--seq-len must be at least 2 (got {d.seq_len})"),
        (o.lr is None or o.lr > 0, f"--lr must be positive (got {o.lr})"),
        (0 <= o.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1] (got {o.min_lr_ratio})"),
        (o.warmup_steps is None or o.warmup_steps >= 0, f"--warmup-steps must be >= 0 (got {o.warmup_steps})"),
        (o.weight_decay >= 0, f"--weight-decay must be >= 0 (got {o.weight_decay})"),
        (o.max_grad_norm >= 0, f"--max-grad-norm must be >= 0, 0 disables clipping (got {o.max_grad_norm})"),
        (t.micro_batch_size is None or t.micro_batch_size >= 1,
         f"--micro-batch-size must be at least 1 (got {t.micro_batch_size})"),
        (t.grad_accum is None or t.grad_accum >= 1, f"--grad-accum must be at least 1 (got {t.grad_accum})"),
        (t.max_steps > 0 or t.max_steps == -1,
         f"--max-steps must be positive, or -1 to use --epochs (got {t.max_steps})"),
        (t.max_steps > 0 or t.epochs is None or t.epochs > 0, f"--epochs must be positive (got {t.epochs})"),
        (t.log_every >= 1, f"--log-every must be at least 1 (got {t.log_every})"),
        (min(t.eval_every, t.save_every, t.eval_exact_match, t.keep_checkpoints) >= 0,
         "--eval-every, --save-every, --eval-exact-match and --keep-checkpoints must be >= 0"),
        (d.val_size >= 0, f"--val-size must be >= 0 (got {d.val_size})"),
        (t.resume != "auto" or t.output_dir is not None, "--resume auto needs --output-dir (the run to continue)"),
        (t.device != "cuda" or torch.cuda.is_available(), "--device cuda: no CUDA device is visible; use --device cpu"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    defaults.validate(cfg)  # --x with --no-x
    # the compatibility matrix (features/compat.py): hardware, needed and refused flag pairs, one line each
    compat.check(cfg, cuda=uses_cuda(cfg))
    overrides.validate(cfg.overrides)
    lora.validate(cfg.lora)
    lora_kernels.validate(cfg.lora_kernels, cfg.lora)
    tracking.validate(cfg.tracking)
    distributed.validate(cfg.mesh)
    fsdp.validate(cfg.sharding, cfg.mesh)
    deepspeed_zero.validate(cfg.deepspeed, {"--fsdp": cfg.sharding.fsdp, "--ddp": cfg.sharding.ddp,
                            "--tp": cfg.mesh.tp > 1, "--cp": cfg.mesh.cp > 1, "--qlora": cfg.lora.qlora,
                            "--compile": cfg.compile.compile, "--qat": cfg.qat.qat})
    sequence_parallel.validate(cfg.sequence_parallel, cfg.mesh.cp, cfg.mesh.tp)
    qat.validate(cfg.qat, "--qlora" if cfg.lora.qlora else "--lora-8bit" if cfg.lora.lora_8bit else None)
    fp8.validate(cfg.fp8, cfg.train.device, adapters=lora.enabled(cfg.lora), qat=cfg.qat.qat)
    gptq.validate(cfg.gptq, cfg.lora, kernels=cfg.lora_kernels.lora_kernels, qat=cfg.qat.qat)
    offload.validate(cfg.offload)
    tiled_mlp.validate(cfg.tiled_mlp)
    faults.validate(cfg.faults)
    liger.validate(cfg.liger, cfg.train.device)
    fused_loss.validate(cfg.loss, cfg.train.device)


def uses_cuda(cfg: Config) -> bool:
    return cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())


def parse_config(argv: list[str] | None = None) -> Config:
    cfg = tyro.cli(Config, args=argv, config=CLI, description=__doc__.split("\n\n")[0])
    alst.expand(cfg)  # a recipe: its flags are set before they are validated
    validate(cfg)  # what the user typed, before anything is chosen for them
    defaults.resolve_flags(cfg, cuda=uses_cuda(cfg))  # unset hyperparameters; the GPU speedups that apply
    return cfg


def prepare_output_dir(cfg: Config, d: Dist) -> Path:
    out = Path(cfg.train.output_dir or broadcast_object(time.strftime("runs/%Y%m%d-%H%M%S"), d))
    if checkpoints(out) and cfg.train.resume is None:
        raise UserError(f"--output-dir {out} already holds checkpoints; pass --resume auto to continue "
                        f"that run, or choose another --output-dir")
    return out


def evaluate(model, val, cfg: Config, tok, d: Dist, ctx, loss_fn, with_generation: bool) -> dict:
    if val is None:
        return {}
    result = {"val_loss": validation_loss(model, val.samples, cfg.train.micro_batch_size,
                                          tok.pad_token_id, d, ctx, loss_fn)}
    if with_generation and cfg.train.eval_exact_match > 0:
        em = exact_match(model, val.samples, cfg.train.eval_exact_match, tok, d, ctx)
        if em is not None:
            result["exact_match"] = em
    return result


def train(cfg: Config) -> dict:
    # ---- processes, seeds, run directory
    d = init_distributed(cfg.train.device, cfg.mesh,
                         need_group=cfg.sharding.fsdp or deepspeed_zero.enabled(cfg.deepspeed))
    torch.manual_seed(cfg.train.seed)
    out = prepare_output_dir(cfg, d)
    say = print if d.is_main else (lambda *a, **k: None)

    # ---- the model's config (its context bounds an unset --seq-len), then the data
    tok = load_tokenizer(cfg.model)
    config = load_config(cfg.model, tok)  # 1. the model: config (+ RoPE / field overrides), attention, weights
    config = apply_overrides(config, cfg.overrides)
    check_vocab(config, tok, cfg.model.path)
    context = getattr(config, "max_position_embeddings", None)
    choose_seq_len = functools.partial(defaults.seq_len, cfg, context=context)  # when --seq-len is unset
    train_split, val = load_splits(cfg.data, tok, cfg.train.seed, choose_seq_len)
    batches = StepBatches(train_split.samples, cfg.train.micro_batch_size, cfg.train.grad_accum,
                          cfg.train.seed, tok.pad_token_id, d.dp_rank, d.dp_size,
                          pack_to=cfg.data.seq_len if cfg.packing.packing else None)
    if batches.steps_in_epoch(0) == 0:
        raise UserError(f"--dataset {cfg.data.dataset}: {len(train_split.samples)} samples are fewer than one "
                        f"step takes ({d.dp_size} data-parallel ranks x --micro-batch-size x --grad-accum); lower them")
    total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else batches.total_steps(cfg.train.epochs)
    defaults.warmup_steps(cfg, total_steps)
    defaults.precision(cfg, d.device)
    defaults.loss(cfg, d.device, config)
    defaults.embedding_offload(cfg, d.device, config, d.world_size)
    say("defaults: " + "; ".join(cfg.auto) if cfg.auto else "defaults: every value set by hand")
    say(f"data: train {train_split.stats}" + (f"\ndata: val {val.stats}" if val else "\ndata: no validation set"))
    say(f"data: {batches.steps_in_epoch(0)} steps/epoch, {batches.dropped(0)} samples/epoch left out to "
        f"keep full batches on every rank; {total_steps} steps; {100 * batches.efficiency(0):.1f}% of "
        f"token slots hold real tokens" + (" (packed)" if cfg.packing.packing else " (padded)"))

    # ---- model, then the features in their fixed order (each one an `if` below as it lands)
    precision = resolve_precision(cfg.model, d.device)
    attn_impl = attention.resolve(cfg.attention, d.device, config)
    say(f"attention: {attention.describe(attn_impl)}")
    if cfg.alst.alst:
        say(alst.describe(cfg))
    if cfg.gptq.gptq:  # a GPTQ checkpoint: 4-bit linears (transformers + gptqmodel, else features/gptq.py)
        model = gptq.load_model(cfg.model, config, d.device, attn_impl)
    else:
        model = load_model(cfg.model, config, d.device, attn_impl,
                           fsdp.quantization_storage(lora.quantization_config(cfg.lora, d.device), cfg.sharding))
    # 2. module swaps (Liger, TiledMLP, FP8, QAT) land here
    if cfg.liger.liger:  # Liger's norm / RoPE / GLU kernels (MLPs left to --lora-kernels when it is on)
        model = apply_liger(model, cfg.liger, fuse_mlp=not cfg.lora_kernels.lora_kernels)
    if cfg.qat.qat:  # fake-quantized decoder linears (switched on at --qat-start-step)
        model = qat.apply_qat(model, cfg.qat)
    if cfg.fp8.fp8 != "none":  # Float8Linear swaps, before FSDP wraps them (FP8 all-gather)
        model = fp8.apply_fp8(model, cfg.fp8, fsdp=cfg.sharding.fsdp, compiled=cfg.compile.compile, say=say)
    if lora.enabled(cfg.lora):  # 3. adapters, then the fused LoRA kernels
        model = gptq.apply_lora(model, cfg.lora) if cfg.gptq.gptq else lora.apply_lora(model, cfg.lora)
    if cfg.lora_kernels.lora_kernels:
        model = lora_kernels.apply_lora_kernels(model)
    if cfg.tiled_mlp.tiled_mlp:  # (2.) TiledMLP wraps each MLP's forward as the adapters and kernels left it
        model = apply_tiled_mlp(model, cfg.tiled_mlp)
    ctx = autocast(precision, d.device)
    ce = compile_loss(cfg.compile) if cfg.compile.compile else cross_entropy_sum  # (6.) fused under --compile
    loss_fn = functools.partial(forward_loss_sum, attn_impl=attn_impl, ce=ce)
    if cfg.loss.loss != "ce":  # 8. the loss on hidden states (its head swap goes before sharding wraps the model)
        model = apply_chunked_loss(model, cfg.loss)
        loss_fn = functools.partial(forward_chunked_loss_sum, attn_impl=attn_impl, chunk=cfg.loss.loss_chunk)
    if cfg.loss.loss in ("cce", "liger"):  # the same hidden states through a fused GPU kernel
        loss_fn = functools.partial(forward_fused_loss_sum, attn_impl=attn_impl, kernel=cfg.loss.loss)
    total_params, trainable = count_params(model)
    say(f"model: {cfg.model.path}, {total_params / 1e6:.1f}M params ({trainable / 1e6:.1f}M trainable), "
        f"{precision} on {d.device}, world size {d.world_size}")
    tensor_parallel.validate(d.size("tp"), config, cfg.lora.lora_dropout, cfg.checkpointing.ac, cfg.compile.compile)
    if d.size("tp") > 1:  # 4. tensor parallel (DTensor), then sequence parallel
        model = apply_tensor_parallel(model, d)
    if cfg.sequence_parallel.sp_mode != "none":  # sequence parallel attention over the "cp" ranks
        cp_group = d.sub("cp").get_group()
        model = sequence_parallel.apply_sequence_parallel(model, cfg.sequence_parallel, cp_group, attn_impl)
        loss_fn = sequence_parallel.make_loss_fn(loss_fn, cfg.sequence_parallel, cp_group)
    if cfg.checkpointing.ac != "none":  # 5. activation checkpointing, then activation offload
        model = apply_checkpointing(model, cfg.checkpointing)
    if cfg.offload.offload != "none":
        model = apply_offload(model, cfg.offload, d.device)
    if cfg.embedding_offload.offload_embeddings:  # the frozen input-embedding table to CPU memory
        model = apply_embedding_offload(model, d.world_size)
    if cfg.compile.compile:  # 6. torch.compile, per decoder block
        model = apply_compile(model, cfg.compile)
    if not deepspeed_zero.enabled(cfg.deepspeed):  # 7. sharding: FSDP2 / HSDP, or DDP with >1 rank
        model = apply_sharding(model, cfg.sharding, d, precision)

    # ---- optimizer, schedule, resume
    optimizer = build_optimizer(model, cfg.optim, d.device)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    if deepspeed_zero.enabled(cfg.deepspeed):  # 7'. DeepSpeed ZeRO: its engine wraps the model and the optimizer
        model, optimizer = deepspeed_zero.apply_deepspeed(model, optimizer, deepspeed_zero.build_config(
            cfg.deepspeed, cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.optim.max_grad_norm, precision,
            d.dp_size, adapters=lora.enabled(cfg.lora)))
    resume_from = resolve_resume(cfg.train.resume, out, d)
    state = load_checkpoint(resume_from, model, optimizer, scheduler, batches, d) if resume_from else {}
    start, seen_tokens = state.get("step", 0), state.get("tokens", 0)
    if cfg.qat.qat:  # an optimizer post-step hook turns fake quantization on at --qat-start-step
        qat.schedule(model, optimizer, cfg.qat, steps_done=start)
    if cfg.fp8.fp8 != "none":  # FP8 all-gather: the next step's weight scales, in an optimizer post-step hook
        fp8.register_hooks(model, optimizer, cfg.fp8, fsdp=cfg.sharding.fsdp)
    if d.is_main:
        write_run_info(out, cfg, d.device, d.world_size, {"data": {"train": train_split.stats,
                       "val": val.stats if val else None, "token_slot_efficiency": batches.efficiency(0),
                       "dropped_per_epoch": batches.dropped(0)}, "total_steps": total_steps,
                       "resumed_from": str(resume_from) if resume_from else None})
    log = MetricsLog(out, total_steps, start, d.is_main)
    if cfg.tracking.wandb:  # W&B mirrors every metrics record (rank 0)
        tracking.apply_tracking(log, cfg, out)
    if resume_from:
        log.print(f"resumed from {resume_from} at step {start}")
    summary = {"step": start}
    if start == 0:
        summary["before"] = evaluate(model, val, cfg, tok, d, ctx, loss_fn, with_generation=True)
        if summary["before"]:  # nothing to show without a validation set
            log.log({"step": 0, **summary["before"]})

    # ---- the loop
    meter = StepMeter(d.device, d.world_size, train_flops(unwrap(model)), total_steps, start, seen_tokens)
    step_batches = Prefetched(batches, d.device)  # the next steps collated, counted (pinned on CUDA) in a thread
    guard = StepGuard(cfg.faults, d)  # polled once per step: non-finite steps, stop signals (preemption)
    try:
        for step in range(start + 1, total_steps + 1):
            micro, targets = next(step_batches)  # targets counted on the host, before the copy
            n_targets = global_count(sum(targets), d)
            step_loss = torch.zeros((), dtype=torch.float64, device=d.device)
            for i, mb in enumerate(micro):
                mb = to_device(mb, d.device)
                with sync_gradients(model, sync=i == len(micro) - 1), ctx:
                    loss_sum = loss_fn(model, mb)
                # DDP / FSDP average gradients over the dp x cp ranks: scale by them to get sum / global targets
                (loss_sum * (d.grad_ranks / n_targets)).backward()
                step_loss += loss_sum.detach()
            if deepspeed_zero.is_engine(model):  # DeepSpeed's engine reduces, clips, updates (the one allowed branch)
                grad_norm = deepspeed_zero.step(model)
            else:
                if d.size("tp") > 1:  # --tp --lora: lora_A's gradients, summed over tp once a step
                    tensor_parallel.sum_partial_grads(model)
                grad_norm = clip_grad_norm(model, cfg.optim.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            if guard.update_ok(step_loss, grad_norm, step):  # a non-finite step is skipped, counted, not logged
                optimizer.step()
                scheduler.step()
                meter.count(sum(targets), sum(map(count_tokens, micro)), sum(mb["sum_sq_len"] for mb in micro))
                meter.add_loss(step_loss)
            optimizer.zero_grad(set_to_none=True)
            log.advance(meter.step_done())

            is_last = step == total_steps
            is_save = guard.stop or cfg.train.save_every > 0 and (step % cfg.train.save_every == 0 or is_last)
            if step % cfg.train.log_every == 0 or step == 1 or is_last or is_save:
                record = meter.record(step, lr, grad_norm, lambda t: all_reduce_sum(t, d)) | guard.metrics()
                if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or is_last:
                    record.update(evaluate(model, val, cfg, tok, d, ctx, loss_fn, with_generation=is_last))
                    meter.restart_clock()
                log.log(record)
                summary.update(record)
            if is_save:
                path = save_checkpoint(out, step, model, optimizer, scheduler, step_batches, d,  # the consumed position
                                       cfg.train.keep_checkpoints, tokens=meter.tokens)
                log.print(f"saved {path}")
                meter.restart_clock()  # evaluation and checkpoint time are not training throughput
            if guard.stop:  # SIGTERM / SIGUSR1 (preemption): this step is saved; --resume auto continues it
                log.print(guard.stop_message(path))
                break
    finally:  # on every exit, errors too: a prefetch thread still inside a torch call aborts the interpreter's
        step_batches.close()  # shutdown ("terminate called without an active exception", exit 134)
        guard.close()
    log.close()
    if guard.stop:
        return summary | {"stopped": guard.signal or "signal"}

    # ---- save
    if not cfg.train.skip_export:  # sharded weights (FSDP / TP) made whole on every rank for the export
        model = gather_full(model, d)
    if cfg.train.skip_export:
        final = None
    elif lora.enabled(cfg.lora):  # the adapter in peft's format (+ a preset's random base)
        final = lora.export(unwrap(model), tok, out / "final") if d.is_main else None
    else:
        final = export_hf(model, tok, out / "final", d)
    barrier(d)
    if final:
        say(f"saved the final model to {final}")
    if final and cfg.qat.qat:  # convert consumes the model: last
        qat.export(unwrap(model), tok, out / "final-quantized", cfg.qat, plain_dir=final, say=say)
    if d.is_main:
        report(summary)
    return summary


def report(summary: dict) -> None:
    before, after = summary.get("before", {}), summary
    if "val_loss" in before and "val_loss" in after:
        print(f"validation loss {before['val_loss']:.4f} -> {after['val_loss']:.4f}")
    if "exact_match" in before and "exact_match" in after:
        print(f"held-out exact match {100 * before['exact_match']:.1f}% -> {100 * after['exact_match']:.1f}%")


def main(argv: list[str] | None = None) -> int:
    cfg = None
    try:
        cfg = parse_config(argv)
        with optional.keep_out(optional.unused(cfg)):  # what other libraries would import on their own
            train(cfg)
        return 0
    except UserError as e:
        return fail(f"error: {e}", 2)
    except torch.OutOfMemoryError as e:  # one message with the sizes and the flags that save memory
        return fail(f"error: {faults.oom_report(e, cfg)}", 3)
    except RuntimeError as e:  # a collective broken by another rank's exit: that rank says why
        if not distributed.peer_failure(e):
            raise
        return fail(f"error: {distributed.peer_failure(e)}", 1)
    finally:
        teardown()


def fail(message: str, code: int) -> int:
    """The run's one-line error, on stderr and in torchrun's failure summary."""
    print(message, file=sys.stderr)
    distributed.record_error(message)
    return code


if __name__ == "__main__":
    sys.exit(main())
