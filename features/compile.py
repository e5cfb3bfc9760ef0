"""torch.compile per decoder block (regional compilation): fused norms, RoPE and residual adds.

    python train.py --lora --lora-kernels --compile
    python train.py --compile --compile-mode max-autotune-no-cudagraphs   # slower start, tuned matmuls
    python train.py --lora --compile-mode default   # no CUDA graphs (auto: under 0.75B parameters)

Every decoder block is compiled in place (`nn.Module.compile`), so parameter names, peft adapters,
checkpoints and `save_pretrained` are unchanged. All blocks run the same code on parameters that
dynamo treats as inputs, so one graph serves all of them: start-up costs one block's compile, not
a whole model's. Inductor fuses what eager runs as separate memory-bound kernels: RMSNorm's fp32
upcast, square, mean and rescale, RoPE's rotate-half, the residual adds, SiLU * up; the fused LoRA
Functions are traced into the same graph. FlashAttention (FA2/FA4) and xformers are registered as
opaque calls (torch.compiler.disable): dynamo otherwise traces into FA4's Python launcher and splits
each block into a dozen graph fragments, whose guards and launch gaps cost more host time than the
fusion saves (measured: the idle gap, in benchmarks/results/2026-11-25-perf.md).

Order (train.py's docstring, step 10): after adapters, fused LoRA kernels and activation
checkpointing (the checkpoint wraps the compiled block), before sharding. Packed rows are padded
to --seq-len, so shapes are static; the number of documents per row varies, which dynamo handles
by marking the cu_seqlens length dynamic after the first recompile. Reference: PyTorch's regional
compilation recipe (torch.compiler, "Reducing torch.compile cold start compilation time with
regional compilation"); torchtitan's apply_compile.

The plain loss (--loss ce) is compiled too (compile_loss). Eager cross entropy upcasts the bf16
logits to an fp32 copy and saves fp32 log-probabilities for backward: two tokens x vocabulary fp32
tensors (16.8 GB at 16K tokens x 128K vocabulary) and a visible share of the 8B shape's step in
memory-bound kernels (benchmarks/results/2026-11-29-perf-h200.md). Compiled, one pass reads the
bf16 logits (fp32 in registers) and backward keeps only them plus two floats per token.

--compile-mode reduce-overhead replays each block's compiled graphs as CUDA graphs (inductor's
CUDA graph trees): one launch instead of dozens of kernel launches and op dispatches, for a model
small enough that the host, not the GPU, bounds the step. With LoRA it paid on the small models
measured, and not from the 1B shape up or for a small full fine-tune
(benchmarks/results/2026-12-04-cuda-graphs-sizes-h200.md), so --compile-mode auto (the default) picks
it for LoRA/QLoRA under 0.75B parameters, in runs of 200 steps or more (recording costs seconds at
start), on packed rows (core/defaults.py compile_mode): padded rows (--no-packing) vary in length, and
each new length records a graph of its own. The training loop marks each micro-step (step_begin),
keeps the gradients allocated (keep_grads) and evaluates eagerly (eager_during). One process only,
and not under --ac or --offload (core/compat.py).

Works with: every --attn backend, --lora / --qlora / --lora-kernels, --ac, --loss. On CPU it
runs too (inductor's C++ backend, slow to compile: for tests use --compile-backend aot_eager).
"""

import dataclasses
import warnings
from typing import Literal

import torch

from core import UserError
from core.model import decoder_blocks
from core.loss import cross_entropy_sum


@dataclasses.dataclass
class CompileConfig:
    compile: bool = False
    """torch.compile each decoder block (regional compilation: one graph for all blocks, short start-up); on by default on a CUDA GPU."""  # noqa: E501
    no_compile: bool = False
    """Do not compile, also on a CUDA GPU (where --compile is on by default)."""
    compile_mode: Literal["auto", "default", "max-autotune-no-cudagraphs", "reduce-overhead"] = "auto"
    """Inductor mode; auto: reduce-overhead for LoRA/QLoRA on a model under 0.75B parameters, 200+ steps, packed rows, one process, a CUDA GPU (core/defaults.py), else default; max-autotune-no-cudagraphs benchmarks matmul/fusion choices at start (minutes); reduce-overhead replays the blocks as CUDA graphs (host-bound small models)."""  # noqa: E501
    compile_backend: Literal["inductor", "aot_eager"] = "inductor"
    """inductor (fused kernels); aot_eager traces the same graphs without code generation (tests, debugging)."""


def validate(cfg) -> None:
    if cfg.compile.no_compile and cfg.compile.compile_mode not in ("auto", "default"):
        raise UserError(f"--compile-mode {cfg.compile.compile_mode} with --no-compile: nothing is compiled; drop one")


def apply_compile(model, cfg: CompileConfig):
    blocks = decoder_blocks(model)
    if not blocks:
        raise UserError("--compile compiles each decoder block, but this model's decoder layers are not "
                        "transformers' GradientCheckpointingLayer; drop --compile")
    # Graphs are shared across blocks; the default limit of 8 recompiles is reached by packed batches'
    # varying document counts before dynamo settles on dynamic shapes (torch 2.11).
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    _opaque_attention(model.config._attn_implementation)
    for block in blocks:
        block.compile(backend=cfg.compile_backend, mode=_mode(cfg))
    return model


def _mode(cfg: CompileConfig) -> str | None:
    plain = cfg.compile_mode in ("auto", "default") or cfg.compile_backend != "inductor"  # auto: not resolved here
    return None if plain else cfg.compile_mode


def compile_loss(cfg: CompileConfig, ce=cross_entropy_sum):
    """The token-loss function `ce` (train.py's choice: cross_entropy_sum, or a loss of your own) as one
    fused graph (shapes marked dynamic after the first new one: padded batches vary in length,
    evaluation runs its own no-grad graph)."""
    mode = _mode(cfg)  # the loss stays out of CUDA graphs: one graph a micro-step, little host time to save
    # Inductor splits a long row reduction (the vocabulary) over blocks and warns that its online softmax
    # is then off; the split kernel is the one it chose as faster. Said at compile time, on every GPU run.
    warnings.filterwarnings("ignore", r"\s*Online softmax is disabled on the fly", UserWarning)
    return torch.compile(ce, backend=cfg.compile_backend,
                         mode=None if mode == "reduce-overhead" else mode)


def cudagraphs(cfg: CompileConfig) -> bool:
    """--compile-mode reduce-overhead: the blocks' compiled graphs replay as CUDA graphs."""
    return cfg.compile and _mode(cfg) == "reduce-overhead"


def step_begin(cfg: CompileConfig) -> None:
    """A new micro-step: CUDA graphs may reuse the previous one's output buffers. (Only under them:
    the call's first use imports inductor's CUDA graph module, seconds on a CPU run.)"""
    if cudagraphs(cfg):
        torch.compiler.cudagraph_mark_step_begin()


def keep_grads(params, cfg: CompileConfig) -> bool:
    """Under CUDA graphs each .grad is allocated once and zeroed in place (the return value: zero_grad's
    set_to_none). Left to autograd, a first micro-step's gradient would be the backward graph's own
    output buffer, which the next micro-step's replay overwrites before the accumulation reads it."""
    if not cudagraphs(cfg):
        return True
    for p in params:
        p.grad = torch.zeros_like(p)
    return False


def eager_during(fn, cfg: CompileConfig):
    """fn with the compiled code run eagerly, under CUDA graphs (evaluation): padded batches of many
    shapes would record a graph each, and a no-grad replay of the graph all blocks share would
    overwrite the previous block's output while the residual stream still holds it."""
    if not cudagraphs(cfg):
        return fn

    def eager(*args, **kwargs):
        with torch.compiler.set_stance("force_eager"):
            return fn(*args, **kwargs)
    return eager


def backend(cfg: CompileConfig) -> str | None:
    """--compile-backend for what compiles outside the blocks (adamw-sr's update); None under --no-compile."""
    return cfg.compile_backend if cfg.compile else None


_OPAQUE = ("flash_attention_2", "flash_attention_3", "flash_attention_4", "nanotune_xformers")


def _opaque_attention(impl: str) -> None:
    """Re-register a kernel-launching attention function under its own name, wrapped so that dynamo
    calls it as one opaque function (one graph break per block) instead of tracing into it."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    fn = ALL_ATTENTION_FUNCTIONS.get(impl)
    if impl in _OPAQUE and fn is not None and not getattr(fn, "nanotune_opaque", False):
        wrapped = torch.compiler.disable(fn)
        wrapped.nanotune_opaque = True
        AttentionInterface.register(impl, wrapped)


def apply(model, cfg, run):
    """--compile: torch.compile per decoder block, around every wrapper applied before it."""
    return apply_compile(model, cfg.compile)
