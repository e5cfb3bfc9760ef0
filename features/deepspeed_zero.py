"""DeepSpeed ZeRO stages 1-3 (+ CPU offload) through DeepSpeed's engine.

    torchrun --nproc_per_node 8 train.py --deepspeed zero2               # optimizer state + grads partitioned
    torchrun --nproc_per_node 8 train.py --deepspeed zero3 --ds-offload  # + params; offloaded to the CPU
    torchrun --nproc_per_node 8 train.py --deepspeed my_ds_config.json   # your own DeepSpeed config

The ZeRO config is built from the flags (stage, offload, --max-grad-norm, --precision) or read
from a json file, whose batch and clipping keys are then set from nanotune's flags (they must
agree with the data plan). nanotune keeps its own AdamW, schedule and accounting: the loop calls
plain `loss.backward()` per micro-batch (DeepSpeed >= 0.18 supports torch-style backward with
ZeRO optimizers) and the engine's `step()` once per optimizer step, with DeepSpeed's
`managed_gradient_accumulation: false`, so the gradient is reduced once per step and averaged
over the dp ranks like DDP. Checkpoints use DeepSpeed's own format (engine.save_checkpoint),
resumable on the same number of ranks. Reference: Rajbhandari et al. 2020, ZeRO; deepspeed.ai.

Precision, from the flags: --precision bf16 is pure bf16 as without DeepSpeed: bf16 weights, gradient
partitions and AdamW states (DeepSpeed's bf16_master_weights_and_grads + bf16_optimizer_states; its
plain bf16 mode would keep fp32 master weights and AdamW states: another update, and more memory).
With --ds-offload it cannot: DeepSpeed 0.19.8 takes bf16 masters offloaded only with its compiled
DeepSpeedCPUAdam, so offload keeps fp32 master weights and AdamW states on the CPU (a mixed-precision
update; a warning says so). LoRA under --precision bf16 keeps fp32 adapter masters and AdamW states
as the plain run's fp32 adapters do (DeepSpeed casts every parameter of the module to bf16, and bf16
adapter weights drop lr-sized updates, so the loss drifts off the plain run's:
benchmarks/results/2026-11-29-scaling-2xh200.md); they are a few MB, so DeepSpeed's plain bf16 mode
costs nothing there. --precision bf16-mixed: fp32 weights and AdamW states, matmuls under the
engine's bf16 autocast. fp32: fp32 throughout. A json config's own bf16 / fp16 sections are kept
as written (only the batch and clipping keys are set from the flags).

ZeRO-3 gathers each decoder block whole (gather_blocks_whole), as FSDP2 does, and runs with
DeepSpeed's overlap_comm (its all-gathers and reductions on a side stream; DeepSpeed's own default
for stage 3): a little faster than without, full fine-tune and LoRA alike, at the same peak memory
(benchmarks/results/2026-11-30-scaling-2xh200.md). --ds-overlap-comm asks for it with ZeRO-1/2 too
(off there by default, as in DeepSpeed; not measured).

Works with: LoRA, activation checkpointing, packing, bf16 / bf16-mixed. Refused with: --fsdp,
--ddp, --tp, --cp (DeepSpeed owns data parallelism), --qlora (use --fsdp), --compile; ZeRO-3 also
with --loss chunked / cce / liger (check_head_loss).
"""

import contextlib
import dataclasses
import io
import json
import warnings
from pathlib import Path

import torch

from core import UserError, optional
from core.config import adapters_on
from core.distributed import attention_blocks

# DeepSpeed 0.19.8 warns at import, on a machine without a GPU, that it runs on the CPU (as asked: gloo)
optional.drop_records("DeepSpeed", "Setting accelerator to CPU")

STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}
HEAD_LOSSES = ("chunked", "cce", "liger")  # they multiply the output head's weight after the model's forward


@dataclasses.dataclass
class DeepSpeedConfig:
    deepspeed: str | None = None
    """DeepSpeed ZeRO: zero1 (optimizer state), zero2 (+ gradients), zero3 (+ parameters) partitioned over ranks, or a DeepSpeed json config path."""  # noqa: E501
    ds_offload: bool = False
    """With --deepspeed: optimizer state (and zero3's parameters) on the CPU (ZeRO-Offload)."""
    ds_overlap_comm: bool = False
    """With --deepspeed zero1/zero2: DeepSpeed's overlap_comm (gradient reduction on a side stream, overlapping compute; more memory for its buckets). zero3 always runs with it (DeepSpeed's default there)."""  # noqa: E501


def enabled(cfg: DeepSpeedConfig) -> bool:
    return cfg.deepspeed is not None


def validate(cfg) -> None:
    """The --deepspeed value (what it needs or cannot run with: core/compat.py)."""
    ds = cfg.deepspeed
    if not enabled(ds):
        return
    if ds.deepspeed not in STAGES and not (ds.deepspeed.endswith(".json") and Path(ds.deepspeed).is_file()):
        raise UserError(f"--deepspeed {ds.deepspeed!r}: pass zero1, zero2, zero3 or an existing .json config")
    if ds.deepspeed not in STAGES and (ds.ds_offload or ds.ds_overlap_comm):  # the json's own settings rule
        flag = "--ds-offload" if ds.ds_offload else "--ds-overlap-comm"
        raise UserError(f"{flag} with --deepspeed {ds.deepspeed}: a json config keeps its own zero_optimization; "
                        f"set {'offload_optimizer / offload_param' if ds.ds_offload else 'overlap_comm'} there")
    check_head_loss(cfg.loss.loss, stage(ds))


def stage(cfg: DeepSpeedConfig) -> int | None:
    """The ZeRO stage of --deepspeed: the flag's, or its json config's (None where the json sets none)."""
    if cfg.deepspeed in STAGES:
        return STAGES[cfg.deepspeed]
    try:
        zero = json.loads(Path(cfg.deepspeed).read_text()).get("zero_optimization", {})
    except (ValueError, AttributeError) as e:  # before the model loads, not a traceback after
        raise UserError(f"--deepspeed {cfg.deepspeed}: not a JSON object of DeepSpeed settings ({e})") from e
    return zero.get("stage") if isinstance(zero, dict) else None


def check_head_loss(loss: str, zero_stage: int | None) -> None:
    """ZeRO-3 gathers the head's weight only inside the head's forward; --loss chunked / cce / liger read
    it after the model's forward, where each rank holds a partition of it (a size-mismatch error)."""
    if zero_stage == 3 and loss in HEAD_LOSSES:
        raise UserError(f"--loss {loss} with ZeRO-3 (--deepspeed): ZeRO-3 partitions the output head's weight, "
                        f"which this loss multiplies outside the model's forward; use --loss ce, or ZeRO-2 "
                        f"(--deepspeed zero2) or --fsdp")


def build_config(cfg: DeepSpeedConfig, micro_batch_size: int, grad_accum: int, max_grad_norm: float,
                 precision: str, dp_size: int, adapters: bool = False) -> dict:
    """The DeepSpeed config: from the flags, or the user's json with nanotune's batch keys set.
    adapters: only LoRA adapters train (fp32 masters and states for them under --precision bf16)."""
    if cfg.deepspeed in STAGES:
        stage = STAGES[cfg.deepspeed]
        zero = {"stage": stage, "overlap_comm": cfg.ds_overlap_comm or stage == 3}
        if cfg.ds_offload:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
            if stage == 3:
                zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        ds = {"zero_optimization": zero, "bf16": _bf16_section(precision, cfg.ds_offload, adapters),
              # bf16-mixed: the engine's forward turns an outer torch.autocast off unless its own
              # torch_autocast section is on (deepspeed 0.19.8 runtime/torch_autocast.py); without it
              # fp32 activations reach FlashAttention (benchmarks/results/2026-11-25-distributed-1gpu.md)
              "torch_autocast": {"enabled": precision == "bf16-mixed", "dtype": "bfloat16"},
              # offload runs nanotune's torch AdamW on the CPU partitions (DeepSpeedCPUAdam would need a
              # compiled op); DeepSpeed 0.19.8 refuses a client optimizer there unless told
              "zero_force_ds_cpu_optimizer": not cfg.ds_offload}
    else:
        ds = json.loads(Path(cfg.deepspeed).read_text())
    # nanotune accumulates micro-batches itself (one engine step per optimizer step): to DeepSpeed a
    # step is one "micro-batch" of all of this rank's rows
    ds.update(train_micro_batch_size_per_gpu=micro_batch_size * grad_accum, gradient_accumulation_steps=1,
              train_batch_size=micro_batch_size * grad_accum * dp_size, gradient_clipping=max_grad_norm,
              managed_gradient_accumulation=False, steps_per_print=2**62)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _bf16_section(precision: str, offload: bool, adapters: bool) -> dict:
    """DeepSpeed's bf16 section for --precision. Its plain bf16 mode keeps fp32 master weights and
    gradient partitions and hands them to the optimizer (fp32 AdamW states): a mixed-precision update,
    not the plain run's pure bf16 one, and fp32 copies of every partition: far more memory a GPU than
    --fsdp, and losses that drift off the plain run's (benchmarks/results/2026-11-29-scaling-2xh200.md)."""
    bf16 = {"enabled": precision == "bf16"}
    if precision != "bf16":
        return bf16  # bf16-mixed: fp32 weights and optimizer under the engine's autocast, as without DeepSpeed
    if adapters:  # the plain run trains fp32 adapters (peft's autocast_adapter_dtype): fp32 masters here too
        return bf16
    if offload:  # DeepSpeed 0.19.8 asserts DeepSpeedCPUAdam(fp32_optimizer_states=False) for bf16 masters offloaded
        warnings.warn("--ds-offload with --precision bf16: DeepSpeed keeps fp32 master weights and fp32 AdamW "
                      "states on the CPU (bf16 ones need its compiled DeepSpeedCPUAdam), so the update is mixed "
                      "precision, not the pure bf16 of a run without --ds-offload", stacklevel=3)
        return bf16
    return dict(bf16, bf16_master_weights_and_grads=True, bf16_optimizer_states=True)


def apply_deepspeed(model, optimizer, ds_config: dict):
    """The DeepSpeed engine around model + nanotune's optimizer; returns (engine, a stand-in optimizer
    whose step/zero_grad do nothing: the engine steps, see step())."""
    try:
        import deepspeed
    except ImportError as e:
        raise UserError("--deepspeed needs DeepSpeed: pip install deepspeed") from e
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed 0.19.8 prints that its CPU shm op was built
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    # ...and calls torch 2.13's deprecated collectives each step, a FutureWarning each
    warnings.filterwarnings("ignore", r"`torch\.distributed\.(reduce_scatter|all_gather_into)_tensor` is deprecated",
                            FutureWarning)
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage") == 3 and "leaf_module" not in zero:  # a json config's own leaf_module wins
        gather_blocks_whole(model)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, _EngineSteps(optimizer)


def gather_blocks_whole(model) -> None:
    """ZeRO-3 gathers and releases each decoder block as one unit (a "leaf module"), as FSDP2 does,
    instead of each of its submodules: about 13 hooked modules a block, 41 under peft's LoRA (lora.Linear
    + base_layer, dropout, lora_A, lora_B), each with forward and backward hooks that fetch, release
    and keep ZeRO's trace. As leaves, a step makes far fewer hook calls and spends less host time
    (most of all under LoRA), and ZeRO-3 scales much better, though still below FSDP2
    (benchmarks/results/2026-11-30-scaling-2xh200.md)."""
    import deepspeed

    blocks = attention_blocks(model, "--deepspeed zero3")
    deepspeed.utils.set_z3_leaf_modules(model, [type(blocks[0])])
    embeddings = model.get_input_embeddings()
    if not any(p.requires_grad for p in embeddings.parameters()):
        # ZeRO reduces a leaf's gradients in its full backward hook; when no input of the first block
        # needs a gradient (frozen embeddings: LoRA), torch runs that hook before the block's own
        # backward, which then finds its weights released
        embeddings.register_forward_hook(lambda module, args, out: out.requires_grad_(True))


class _EngineSteps:
    """What train.py's loop and scheduler see as the optimizer under DeepSpeed: the engine owns the
    update (step()), the schedule still writes the learning rate into the wrapped AdamW's groups."""

    def __init__(self, optimizer):
        self.inner, self.param_groups = optimizer, optimizer.param_groups

    def step(self):  # the engine already stepped in deepspeed_zero.step
        pass

    def zero_grad(self, set_to_none: bool = True):  # the engine zeroes its gradient partitions itself
        pass


def is_engine(model) -> bool:
    return type(model).__name__ == "DeepSpeedEngine"


def step(engine) -> torch.Tensor:
    """Reduce the accumulated gradients, clip to --max-grad-norm, update: one optimizer step.
    Returns the gradient norm before clipping."""
    engine.step()
    norm = engine.get_global_grad_norm()
    return torch.as_tensor(float(norm) if norm is not None else float("nan"))


def gather_full(engine):
    """The wrapped model with full parameters, for the final export (ZeRO-3 partitions gathered on
    every rank into plain parameters; the run is over, nothing re-partitions them)."""
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        full = {}  # one full tensor a partitioned parameter: tied ones (embeddings and head) stay one in the export
        for sub in module.modules():
            params = list(sub.named_parameters(recurse=False))
            if params:
                with deepspeed.zero.GatheredParameters([p for _, p in params]):
                    for name, p in params:
                        if id(p) not in full:
                            full[id(p)] = torch.nn.Parameter(p.data.clone(), p.requires_grad)
                        sub.register_parameter(name, full[id(p)])
    return module


def apply(model, optimizer, cfg, run):
    """--deepspeed: DeepSpeed's engine wraps the model and the optimizer, once both are built (the one
    feature that takes the optimizer too). Returns (engine, engine's optimizer)."""
    ds_config = build_config(cfg.deepspeed, cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.optim.max_grad_norm,
                             run.precision, run.d.dp_size, adapters=adapters_on(cfg.lora))
    return apply_deepspeed(model, optimizer, ds_config)
