"""AdamW and the learning-rate schedule: linear warmup, then cosine or linear decay (or constant).

    python train.py --lr 2e-4 --warmup-steps 20 --lr-schedule cosine --min-lr-ratio 0.1

Weight decay applies to matrices only (not to norms or biases). AdamW is the fused CUDA kernel
on GPU and the foreach implementation elsewhere; `--optimizer adamw-8bit` is bitsandbytes' 8-bit
AdamW (block-wise quantized moments: 2 bytes of state per parameter instead of 8, for full
fine-tuning where the optimizer state is the largest piece of memory; Dettmers et al., "8-bit
Optimizers via Block-wise Quantization", 2022). Only parameters that require grad are given to
the optimizer, so a frozen base costs no optimizer memory or time.

`--optimizer adamw-sr` is for a full fine-tune on bf16 weights (`--precision bf16`, which it picks
under --precision auto). A bf16 weight near 0.02 moves in steps of 1.2e-4, so AdamW's updates at
lr 2e-5 round to nothing and the model barely trains; fp32 masters (bf16-mixed) fix that with 4
more bytes a weight. adamw-sr computes the update in fp32 (fp32 moments) and writes the weight back
with stochastic rounding: up with the probability of the remainder, so small updates survive on
average, at bf16's weight memory (Gupta et al., "Deep Learning with Limited Numerical Precision",
2015; Zamirai et al., "Revisiting BFloat16 Training", 2020). On fp32 weights it is AdamW exactly.
Under --compile (on by default on a CUDA GPU) the whole step is one compiled graph, a fused kernel
a tensor: eager, each tensor takes about 15 memory-bound kernels that move some 150 bytes a weight,
against 22 fused; and one compiled call a tensor would leave the GPU idle behind dynamo's per-call
host cost (measured in benchmarks/results/2026-12-03-adamw-sr-h200.md).

Another optimizer or schedule: a value in `optimizer`'s or `lr_schedule`'s Literal, and its branch in
`build_optimizer` or `lr_factor`. A new OptimConfig field is the flag of its name (`min_lr_ratio`:
`--min-lr-ratio`) and enters every checkpoint's plan (`schedule_plan`), so a resume that changes it is
refused. The other files such a change touches: docs/adding-a-feature.md.
"""

import dataclasses
import math
from typing import Literal

import torch

from core import UserError
from core.config import adapters_on


@dataclasses.dataclass
class OptimConfig:
    optimizer: Literal["adamw", "adamw-8bit", "adamw-sr"] = "adamw"
    """adamw (torch; fused on CUDA), adamw-8bit (bitsandbytes: 8-bit moments, a quarter of the state memory) or adamw-sr (bf16 weights updated with stochastic rounding; full fine-tune)."""  # noqa: E501
    lr: float | None = None
    """Peak learning rate; unset: 2e-4 for LoRA/QLoRA, 2e-5 for full fine-tuning, 2e-3 for the demo."""
    min_lr_ratio: float = 0.1
    """The schedule decays toward lr * min-lr-ratio, reached as the last step ends."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup, toward lr * min-lr-ratio (constant: none)."""
    warmup_steps: int | None = None
    """Linear warmup over this many optimizer steps (the first at lr / warmup-steps); unset: 3% of the steps (the demo: 50, at most a tenth)."""  # noqa: E501
    weight_decay: float = 0.0
    """AdamW decoupled weight decay, on matrices only."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping; the norm is still logged)."""


def validate(cfg) -> None:
    """--optimizer adamw-sr rounds bf16 weights; a precision that keeps fp32 weights leaves it nothing to do."""
    if cfg.optim.optimizer == "adamw-sr" and cfg.model.precision in ("fp32", "bf16-mixed"):
        raise UserError(f"--optimizer adamw-sr updates bf16 weights, and --precision {cfg.model.precision} keeps "
                        "them in fp32: use --precision bf16, or --optimizer adamw")


def rounding_notice(cfg, precision: str) -> str | None:
    """A line for the log where torch's AdamW updates bf16 weights of a full fine-tune (--precision
    bf16): updates under half a bf16 step round away, which leaves a fine-tune's loss well above fp32
    masters' (measured: benchmarks/results/2026-12-03-adamw-sr-h200.md). DeepSpeed keeps its own fp32
    masters; adapters train in fp32; bitsandbytes' 8-bit AdamW is not measured on bf16 weights."""
    if precision != "bf16" or cfg.optim.optimizer != "adamw" or adapters_on(cfg.lora) or cfg.deepspeed.deepspeed:
        return None
    return ("optimizer: adamw on bf16 weights rounds away updates under half a bf16 step (a step is 1.2e-4 "
            "near 0.02); --optimizer adamw-sr keeps them on average, --precision bf16-mixed keeps fp32 masters")


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device,
                    compile_backend: str | None = None) -> torch.optim.Optimizer:
    """--optimizer over the parameters that require grad: matrices with --weight-decay, norms and biases
    without. `compile_backend` (--compile's): on CUDA, adamw-sr's update compiled with it; None: eager."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kwargs = dict(lr=cfg.lr, eps=cfg.adam_eps, betas=(cfg.adam_beta1, cfg.adam_beta2))
    if cfg.optimizer == "adamw-8bit":
        try:
            import bitsandbytes
        except ImportError as e:
            raise UserError("--optimizer adamw-8bit needs bitsandbytes: pip install bitsandbytes") from e
        return bitsandbytes.optim.AdamW8bit(groups, **kwargs)
    if cfg.optimizer == "adamw-sr":
        backend = compile_backend if device.type == "cuda" else None
        return StochasticRoundingAdamW(groups, **kwargs, compile_backend=backend)
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, **kwargs, fused=fused, foreach=not fused)


class StochasticRoundingAdamW(torch.optim.Optimizer):
    """torch's AdamW (its single-tensor formula, fp32 moments) whose bf16 weights are updated in fp32
    and written back with stochastic rounding; fp32 weights are updated as torch's AdamW does.
    `compile_backend`: a group's update is one graph over all its tensors, compiled with it (None:
    eager); the step's scalars travel as a tensor, so a new lr does not recompile."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 compile_backend: str | None = None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.update = torch.compile(_adamw_updates, fullgraph=True, backend=compile_backend) \
            if compile_backend else _adamw_updates

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but the moments stay fp32: torch casts every loaded state to its weight's dtype."""
        super().load_state_dict(state_dict)
        saved = [i for group in state_dict["param_groups"] for i in group["params"]]
        for i, p in zip(saved, (p for group in self.param_groups for p in group["params"])):
            for key, value in state_dict["state"].get(i, {}).items():
                if torch.is_tensor(value) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            together = {}  # (step, device) -> [weights, gradients, first moments, second moments]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # moments like p (a DTensor's too, for sharded checkpoints), in fp32
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                tensors = [_local(t) for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])]
                lists = together.setdefault((state["step"], tensors[0].device), [[], [], [], []])
                for lst, t in zip(lists, tensors):
                    lst.append(t)
            for (step, device), lists in together.items():
                self.update(*lists, _step_scalars(group, step, device), *group["betas"], group["eps"])


def _local(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) parameter, gradient or moment's own shard; AdamW is elementwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def _step_scalars(group: dict, step: int, device: torch.device) -> torch.Tensor:
    """AdamW's per-step factors, as torch computes them (in float64 on the host): the weight's decay
    factor, the step size and the second moment's bias correction (its square root)."""
    lr, (beta1, beta2) = group["lr"], group["betas"]
    factors = [1 - lr * group["weight_decay"], lr / (1 - beta1 ** step), math.sqrt(1 - beta2 ** step)]
    return torch.tensor(factors, dtype=torch.float32, device=device)


def _adamw_updates(params, grads, exp_avgs, exp_avg_sqs, scalars, beta1: float, beta2: float, eps: float) -> None:
    for p, grad, exp_avg, exp_avg_sq in zip(params, grads, exp_avgs, exp_avg_sqs):
        _adamw_update(p, grad, exp_avg, exp_avg_sq, scalars, beta1, beta2, eps)


def _adamw_update(p, grad, exp_avg, exp_avg_sq, scalars, beta1: float, beta2: float, eps: float) -> None:
    decay, step_size, bias2_sqrt = scalars.unbind()
    grad = grad.float()
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    p32 = p.float() * decay - step_size * (exp_avg / (exp_avg_sq.sqrt() / bias2_sqrt + eps))
    p.copy_(p32 if p.dtype == torch.float32 else stochastic_round(p32, p.dtype))


def stochastic_round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 x to bf16, rounded up (in magnitude) with probability the remainder over bf16's step there:
    random bits added below bf16's 16 kept bits of the fp32 pattern, then those bits cleared."""
    if dtype != torch.bfloat16:
        return x.to(dtype)
    bits = x.view(torch.int32) + torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device)
    return (bits & -(1 << 16)).view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of --lr for the update made at optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def build_scheduler(optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over lr_factor. Its `plan` (in its state_dict, so in every checkpoint) holds what defines the
    schedule and the optimizer's update, which a resumed run must keep (core/checkpoint.py compares them)."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))
    scheduler.plan = schedule_plan(cfg, total_steps)
    return scheduler


def schedule_plan(cfg: OptimConfig, total_steps: int) -> dict:
    """The values that define the schedule and the optimizer's update (all but --max-grad-norm)."""
    return {"total_steps": total_steps, **{k: v for k, v in dataclasses.asdict(cfg).items() if k != "max_grad_norm"}}


def plan_flag(key: str) -> str:
    """The flag a plan value comes from: an OptimConfig field's flag is its name (the CLI omits section
    prefixes: lr_schedule -> --lr-schedule), so a new field needs no entry here."""
    return "the steps (--max-steps / --epochs)" if key == "total_steps" else "--" + key.replace("_", "-")


def plan_changes(saved: dict, now: dict) -> list[str]:
    """'--lr 0.001 (saved: 0.0003)' for each value of the plan a resumed run would change."""
    return [f"{plan_flag(k)} {now.get(k)} (saved: {saved[k]})" for k in saved if saved[k] != now.get(k)]


def trained_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters the optimizer updates, read from its groups: a walk of a peft model's modules
    each step (thousands of them) would leave the GPU idle before the optimizer."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The global gradient norm of params (and clipping to max_norm; 0 = no clipping), also for DTensor
    gradients on several meshes (FSDP x TP leaves some on the 2-D mesh, some on the dp mesh),
    which torch's clip_grad_norm_ cannot stack (torch 2.13)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
    groups: dict = {}
    for g in grads:
        groups.setdefault(g.device_mesh if isinstance(g, DTensor) else None, []).append(g)
    norms = []
    for mesh, group in groups.items():
        norm = torch.nn.utils.get_total_norm(group, foreach=True)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms])) if norms else torch.zeros(())
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for group in groups.values():
            torch._foreach_mul_(group, coef.item())
    return total
