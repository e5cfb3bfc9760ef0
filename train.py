"""nanotune: fine-tune open LLMs with one readable PyTorch loop.

    python train.py                                        # the embedded CPU demo (a few minutes)
    python train.py --model meta-llama/Llama-3.1-8B --dataset my.jsonl --seq-len 4096
    torchrun --nproc_per_node 8 train.py --model llama3-8b --dataset my.jsonl
    python train.py --help                                 # every flag

The story, top to bottom: parse -> dist -> data -> model -> features -> optimizer -> steps -> save.
`core/` is what every run uses; each module in `features/` is one flag-switched optimization with
a config dataclass, `validate(cfg)` and `apply(model, cfg, run)` (to add one: docs/adding-a-feature.md).
`build_model` applies them in this order, one `if` each; the reason for each place:

 1. attention backend, config overrides (--rope-scaling), load: both are load-time arguments, as is
    a 4-/8-bit or GPTQ base
 2. --liger, --qat, --fp8: module swaps of the plain model, before anything wraps its linears
 3. --lora / --qlora / --lora-8bit (peft; --gptq: on the GPTQ linears): wrap the final linears;
    --fp8-base then quantizes the base linears peft wrapped
 4. --lora-kernels: replace the adapted layers' forward, so they need the adapters (and their base)
 5. --tiled-mlp: tiles each MLP's forward as the adapters and kernels left it
 6. --loss chunked / cce / liger: the head returns hidden states; its weight must still be the
    model's own Parameter, before sharding wraps it
 7. --tp, then --cp (sequence parallel): shard the projections, then attention over the cp ranks
 8. --ac, then --offload: checkpoint each block, then hook its saved tensors
 9. --offload-embeddings: the frozen table to CPU memory, once nothing moves the model again
10. --compile: per block, around every wrapper above, so they compile into one graph
11. --fsdp / --ddp: last, around the final modules (its hooks stay outside the compiled graphs)
12. --deepspeed: after the optimizer is built; its engine wraps both
The step loop branches twice, both commented (DeepSpeed's engine steps itself; --tp sums lora_A's
gradients once a step); other per-step work goes through optimizer hooks (--qat start, --fp8 scales).
"""

from __future__ import annotations  # fields named as their modules (lora: lora.LoraConfig) resolve at module level

import dataclasses
import functools
import sys

import torch
import tyro

import core.checkpoint
import core.config
import core.data
import core.evaluate
import core.gguf
import core.loss
import core.model
import core.quantize
from core import attention, batches, compat, defaults, distributed, faults, optim, packing, runlog, tracking
from core.distributed import all_reduce_sum, global_count, sync_gradients, unwrap
from core.run import Run
from features import (activation_checkpointing, activation_offload, alst, chunked_loss, compile, deepspeed_zero,
                      embedding_offload, fp8, fp8_base, fsdp, fused_loss, gptq, liger, lora, lora_kernels, overrides,
                      qat, sequence_parallel, tensor_parallel, tiled_mlp)
from core.prefetch import Prefetched


@dataclasses.dataclass
class Config:
    model: core.model.ModelConfig = dataclasses.field(default_factory=core.model.ModelConfig)
    overrides: overrides.OverridesConfig = dataclasses.field(default_factory=overrides.OverridesConfig)
    attention: attention.AttentionConfig = dataclasses.field(default_factory=attention.AttentionConfig)
    data: core.data.DataConfig = dataclasses.field(default_factory=core.data.DataConfig)
    packing: packing.PackingConfig = dataclasses.field(default_factory=packing.PackingConfig)
    lora: lora.LoraConfig = dataclasses.field(default_factory=lora.LoraConfig)
    lora_kernels: lora_kernels.LoraKernelsConfig = dataclasses.field(default_factory=lora_kernels.LoraKernelsConfig)
    alst: alst.AlstConfig = dataclasses.field(default_factory=alst.AlstConfig)
    liger: liger.LigerConfig = dataclasses.field(default_factory=liger.LigerConfig)
    tiled_mlp: tiled_mlp.TiledMLPConfig = dataclasses.field(default_factory=tiled_mlp.TiledMLPConfig)
    qat: qat.QatConfig = dataclasses.field(default_factory=qat.QatConfig)
    fp8: fp8.Fp8Config = dataclasses.field(default_factory=fp8.Fp8Config)
    fp8_base: fp8_base.Fp8BaseConfig = dataclasses.field(default_factory=fp8_base.Fp8BaseConfig)
    gptq: gptq.GptqConfig = dataclasses.field(default_factory=gptq.GptqConfig)
    checkpointing: activation_checkpointing.CheckpointingConfig = dataclasses.field(
        default_factory=activation_checkpointing.CheckpointingConfig)
    offload: activation_offload.OffloadConfig = dataclasses.field(default_factory=activation_offload.OffloadConfig)
    embedding_offload: embedding_offload.EmbeddingOffloadConfig = dataclasses.field(
        default_factory=embedding_offload.EmbeddingOffloadConfig)
    compile: compile.CompileConfig = dataclasses.field(default_factory=compile.CompileConfig)
    loss: core.loss.LossConfig = dataclasses.field(default_factory=core.loss.LossConfig)
    optim: optim.OptimConfig = dataclasses.field(default_factory=optim.OptimConfig)
    faults: faults.FaultsConfig = dataclasses.field(default_factory=faults.FaultsConfig)
    mesh: distributed.MeshConfig = dataclasses.field(default_factory=distributed.MeshConfig)
    sharding: fsdp.ShardingConfig = dataclasses.field(default_factory=fsdp.ShardingConfig)
    deepspeed: deepspeed_zero.DeepSpeedConfig = dataclasses.field(default_factory=deepspeed_zero.DeepSpeedConfig)
    sequence_parallel: sequence_parallel.SequenceParallelConfig = dataclasses.field(
        default_factory=sequence_parallel.SequenceParallelConfig)
    train: core.config.TrainConfig = dataclasses.field(default_factory=core.config.TrainConfig)
    tracking: tracking.TrackingConfig = dataclasses.field(default_factory=tracking.TrackingConfig)
    auto: tyro.conf.Suppress[list[str]] = dataclasses.field(default_factory=list)
    """The values core/defaults.py chose, each with its reason (not a flag; kept in config.json)."""


CLI = (tyro.conf.OmitArgPrefixes, tyro.conf.FlagCreatePairsOff)  # --packing; --no-packing is its own field


def validate(cfg: Config) -> None:
    """One pass before anything loads: single values, then the compatibility matrix (every pair of
    feature flags is refused there), then each module's own values and settings."""
    core.config.check_values(cfg)
    defaults.validate(cfg)  # --x with --no-x
    compat.check(cfg, cuda=uses_cuda(cfg))
    # the validate(cfg) of each config's module, once, in Config's order: adding a feature needs no line here
    owners = dict.fromkeys(type(value).__module__ for f in dataclasses.fields(cfg)
                           if dataclasses.is_dataclass(value := getattr(cfg, f.name)))
    for module in (sys.modules[name] for name in owners):
        if hasattr(module, "validate"):
            module.validate(cfg)


def uses_cuda(cfg: Config) -> bool:
    return cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())


def parse_config(argv: list[str] | None = None) -> Config:
    cfg = tyro.cli(Config, args=argv, config=CLI, description=__doc__.split("\n\n")[0])
    alst.expand(cfg)  # a recipe: its flags are set before they are validated
    validate(cfg)  # what the user typed, before anything is chosen for them
    defaults.resolve_flags(cfg, cuda=uses_cuda(cfg))  # unset hyperparameters; the GPU speedups that apply
    return cfg


def build_model(cfg: Config, run: Run):
    """The model with every feature applied, in the order of the module docstring."""
    if cfg.gptq.gptq:
        model = gptq.load_model(cfg.model, run.model_config, run.device, run.attn_impl)
    else:
        quantized = fsdp.quantization_storage(core.quantize.quantization_config(cfg.lora, run.device), cfg.sharding)
        model = core.model.load_model(cfg.model, run.model_config, run.device, run.attn_impl, quantized)
    if cfg.liger.liger:
        model = liger.apply(model, cfg, run)
    if cfg.qat.qat:
        model = qat.apply(model, cfg, run)
    if cfg.fp8.fp8 != "none":
        model = fp8.apply(model, cfg, run)
    if core.config.adapters_on(cfg.lora):
        model = gptq.apply(model, cfg, run) if cfg.gptq.gptq else lora.apply(model, cfg, run)
    if cfg.fp8_base.fp8_base:
        model = fp8_base.apply(model, cfg, run)
    if cfg.lora_kernels.lora_kernels:
        model = lora_kernels.apply(model, cfg, run)
    if cfg.tiled_mlp.tiled_mlp:
        model = tiled_mlp.apply(model, cfg, run)
    if cfg.loss.loss != "ce":  # chunked, cce, liger: the head returns hidden states, the loss multiplies them
        model = chunked_loss.apply(model, cfg, run)
    if cfg.mesh.tp > 1:
        model = tensor_parallel.apply(model, cfg, run)
    if cfg.sequence_parallel.sp_mode != "none":
        model = sequence_parallel.apply(model, cfg, run)
    if cfg.checkpointing.ac != "none":
        model = activation_checkpointing.apply(model, cfg, run)
    if cfg.offload.offload != "none":
        model = activation_offload.apply(model, cfg, run)
    if cfg.embedding_offload.offload_embeddings:
        model = embedding_offload.apply(model, cfg, run)
    if cfg.compile.compile:
        model = compile.apply(model, cfg, run)
    if not deepspeed_zero.enabled(cfg.deepspeed):
        model = fsdp.apply(model, cfg, run)
    return model


def build_loss(cfg: Config, run: Run):
    """loss_fn(model, batch) -> the summed token loss of a micro-batch: --loss, then sequence parallel."""
    if cfg.loss.loss == "chunked":
        loss_fn = functools.partial(chunked_loss.forward_chunked_loss_sum, chunk=cfg.loss.loss_chunk)
    elif cfg.loss.loss in ("cce", "liger"):
        loss_fn = functools.partial(fused_loss.forward_fused_loss_sum, kernel=cfg.loss.loss)
    else:  # the full logits; under --compile, the token loss compiled into one fused kernel
        ce = core.loss.cross_entropy_sum  # a loss of your own goes here (core/loss.py)
        if cfg.compile.compile:
            ce = compile.compile_loss(cfg.compile, ce)
        loss_fn = functools.partial(core.loss.forward_loss_sum, ce=ce)
    loss_fn = functools.partial(loss_fn, attn_impl=run.attn_impl)
    if cfg.sequence_parallel.sp_mode != "none":
        loss_fn = sequence_parallel.wrap_loss(loss_fn, cfg, run)
    return loss_fn


def train(cfg: Config) -> dict:
    # ---- processes, seeds, run directory
    d = distributed.init_distributed(cfg.train.device, cfg.mesh,
                                     need_group=cfg.sharding.fsdp or deepspeed_zero.enabled(cfg.deepspeed))
    torch.manual_seed(cfg.train.seed)
    out = core.checkpoint.prepare_output_dir(cfg.train.output_dir, cfg.train.resume, d)
    say = print if d.is_main else (lambda *a, **k: None)

    # ---- the model's config (its context bounds an unset --seq-len), then the data
    if core.gguf.is_gguf(cfg.model.path):  # llama.cpp's format: from here on, the Hugging Face directory made of it
        cfg.model.path = core.gguf.hf_dir(cfg.model.path, say)
    tok = core.model.load_tokenizer(cfg.model)
    model_config = overrides.apply_overrides(core.model.load_config(cfg.model, tok), cfg.overrides)
    core.model.check_vocab(model_config, tok, cfg.model.path)
    context = getattr(model_config, "max_position_embeddings", None)
    choose_seq_len = functools.partial(defaults.seq_len, cfg, context=context)
    train_split, val = core.data.load_splits(cfg.data, tok, choose_seq_len)
    defaults.step_rows(cfg, train_split.samples, model_config, d.device)  # packed or not, ~8 samples a step
    step_source = batches.StepBatches(train_split.samples, cfg.train.micro_batch_size, cfg.train.grad_accum,
                                      cfg.train.seed, tok.pad_token_id, d.dp_rank, d.dp_size,
                                      pack_to=cfg.data.seq_len if cfg.packing.packing else None,
                                      row_multiple=attention.row_multiple(cfg.attention))
    step_source.check_one_step(cfg.data.dataset)
    total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else step_source.total_steps(cfg.train.epochs)
    defaults.resolve_run(cfg, total_steps, step_source.steps_in_epoch(0), d, model_config, val)
    say("defaults: " + "; ".join(cfg.auto) if cfg.auto else "defaults: every value set by hand")
    say(core.data.describe(train_split, val) + "\n" + step_source.describe(total_steps))
    resume_from = core.checkpoint.resolve_resume(cfg.train.resume, out, d)  # refused here, before the model loads
    state = core.checkpoint.check_resume(resume_from, optim.schedule_plan(cfg.optim, total_steps), step_source, d,
                                         deepspeed_zero.enabled(cfg.deepspeed)) if resume_from else {}

    # ---- the model and its features, the loss
    run = Run(d, attention.resolve(cfg.attention, d.device, model_config),
              core.model.resolve_precision(cfg.model, d.device), model_config, say)
    say(f"attention: {sequence_parallel.describe(cfg, attention.describe(run.attn_impl))}")
    if cfg.alst.alst:
        say(alst.describe(cfg))
    model = build_model(cfg, run)
    loss_fn = build_loss(cfg, run)
    ctx = core.model.autocast(run.precision, d.device)
    total_params, trainable = core.model.count_params(model)
    say(f"model: {cfg.model.path}, {total_params / 1e6:.1f}M params ({trainable / 1e6:.1f}M trainable), "
        f"{run.precision}{lora.quantized_base(cfg.lora)} on {d.device}, world size {d.world_size}")

    for notice in (overrides.context_notice(cfg, model_config), optim.rounding_notice(cfg, run.precision)):
        if notice:
            say(notice)

    # ---- optimizer, schedule, resume
    optimizer = optim.build_optimizer(model, cfg.optim, d.device, compile.backend(cfg.compile))
    scheduler = optim.build_scheduler(optimizer, cfg.optim, total_steps)
    set_to_none = compile.keep_grads(optim.trained_params(optimizer), cfg.compile)  # CUDA graphs: allocated once
    if deepspeed_zero.enabled(cfg.deepspeed):
        model, optimizer = deepspeed_zero.apply(model, optimizer, cfg, run)
    if resume_from:
        core.checkpoint.load_checkpoint(resume_from, state, model, optimizer, scheduler, d)
    start, seen_tokens = state.get("step", 0), state.get("tokens", 0)
    if cfg.qat.qat:  # an optimizer post-step hook turns fake quantization on at --qat-start-step
        qat.schedule(model, optimizer, cfg.qat, steps_done=start)
    if cfg.fp8.fp8 != "none":  # FP8 all-gather: the next step's weight scales, in an optimizer post-step hook
        fp8.register_hooks(model, optimizer, cfg.fp8, fsdp=cfg.sharding.fsdp)
    if d.is_main:
        runlog.write_run_info(out, cfg, d.device, d.world_size, {"data": {"train": train_split.stats,
                              "val": val.stats if val else None, "token_slot_efficiency": step_source.efficiency(0),
                              "dropped_per_epoch": step_source.dropped(0)}, "total_steps": total_steps,
                              "resumed_from": str(resume_from) if resume_from else None})
    log = runlog.MetricsLog(out, total_steps, start, d.is_main)
    if cfg.tracking.wandb:  # W&B mirrors every metrics record (rank 0)
        tracking.apply_tracking(log, cfg, out)
    if resume_from:
        log.print(f"resumed from {resume_from} at step {start}")
    evaluate = compile.eager_during(functools.partial(core.evaluate.evaluate, model, val, cfg, tok, d, ctx, loss_fn),
                                    cfg.compile)
    # the evaluation before training; a resumed run reads it from the history it kept, for the closing lines
    summary = {"step": start, "before": evaluate() if start == 0 else log.record_at(0)}
    if start == 0 and summary["before"]:  # nothing to show without a validation set
        log.log({"step": 0, **summary["before"]})

    # ---- the loop
    meter = runlog.StepMeter(d.device, d.world_size, core.model.train_flops(unwrap(model)), total_steps, start,
                             seen_tokens)
    step_batches = Prefetched(step_source, d.device)  # the next steps collated, counted (pinned on CUDA) in a thread
    guard = faults.StepGuard(cfg.faults, d)  # polled once per step: non-finite steps, stop signals (preemption)
    try:
        for step in range(start + 1, total_steps + 1):
            micro, targets = next(step_batches)  # targets counted on the host, before the copy
            n_targets = global_count(sum(targets), d)
            step_loss = torch.zeros((), dtype=torch.float64, device=d.device)
            for i, mb in enumerate(micro):
                mb = batches.to_device(mb, d.device)
                compile.step_begin(cfg.compile)
                with sync_gradients(model, sync=i == len(micro) - 1), ctx:
                    loss_sum = loss_fn(model, mb)
                # DDP / FSDP average gradients over the dp x cp ranks: scale by them to get sum / global targets
                (loss_sum * (d.grad_ranks / n_targets)).backward()
                step_loss += loss_sum.detach()
            if deepspeed_zero.is_engine(model):  # DeepSpeed's engine reduces, clips, updates (a documented branch)
                grad_norm = deepspeed_zero.step(model)
            else:
                if d.size("tp") > 1:  # --tp --lora: lora_A's gradients, summed over tp once a step
                    tensor_parallel.sum_partial_grads(model)
                grad_norm = optim.clip_grad_norm(optim.trained_params(optimizer), cfg.optim.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            if guard.update_ok(step_loss, grad_norm, step):  # a non-finite step is skipped, counted, not logged
                optimizer.step()
                scheduler.step()
                meter.count(sum(targets), sum(map(batches.count_tokens, micro)), sum(mb["sum_sq_len"] for mb in micro))
                meter.add_loss(step_loss)
            optimizer.zero_grad(set_to_none=set_to_none)
            log.advance(meter.step_done())

            is_last = step == total_steps
            is_save = guard.stop or (cfg.train.save_every > 0 and (step % cfg.train.save_every == 0 or is_last))
            is_eval = is_last or (cfg.train.eval_every > 0 and step % cfg.train.eval_every == 0)
            if step % cfg.train.log_every == 0 or step == 1 or is_last or is_save or is_eval:
                record = meter.record(step, lr, grad_norm, lambda t: all_reduce_sum(t, d)) | guard.metrics()
                if is_eval:
                    record.update(evaluate())
                    meter.restart_clock()
                log.log(record)
                summary.update(record)
            if is_save:
                path = core.checkpoint.save_checkpoint(out, step, model, optimizer, scheduler, step_batches, d,
                                                       cfg.train.keep_checkpoints, tokens=meter.tokens)
                log.print(f"saved {path}")
                meter.restart_clock()  # evaluation and checkpoint time are not training throughput
            if guard.stop:  # SIGTERM / SIGUSR1 (preemption), Ctrl-C: this step is saved; --resume auto continues it
                log.print(guard.stop_message(path, cfg.train.output_dir is not None))
                break
    finally:  # on every exit, errors too: a prefetch thread still inside a torch call aborts the interpreter's
        step_batches.close()  # shutdown ("terminate called without an active exception", exit 134)
        guard.close()
    log.close()
    if guard.stop:
        return summary | {"stopped": guard.signal or "signal"}
    save_final(model, cfg, tok, out, d, say)
    if d.is_main:
        core.evaluate.report(summary)
    return summary


def save_final(model, cfg: Config, tok, out, d, say) -> None:
    """The final model in <output-dir>/final: the adapter in peft's format, or the whole model."""
    if cfg.train.skip_export:
        return
    # sharded weights (FSDP / TP / ZeRO-3) made whole on every rank for the export
    model = deepspeed_zero.gather_full(model) if deepspeed_zero.is_engine(model) else fsdp.gather_full(model, d)
    if core.config.adapters_on(cfg.lora):  # the adapter in peft's format (+ a preset's random base)
        final = lora.export(unwrap(model), tok, out / "final") if d.is_main else None
    else:
        final = core.checkpoint.export_hf(model, tok, out / "final", d)
    distributed.barrier(d)
    if final:
        say(f"saved the final model to {final}")
    if final and cfg.qat.qat:  # convert consumes the model: last
        qat.export(unwrap(model), tok, out / "final-quantized", cfg.qat, plain_dir=final, say=say)


def main(argv: list[str] | None = None) -> int:
    """Parse, train, and end in one line on a user error (exit 2), out of memory (3) or a lost peer (1)."""
    return faults.run(lambda: parse_config(argv), train)


if __name__ == "__main__":
    sys.exit(main())
