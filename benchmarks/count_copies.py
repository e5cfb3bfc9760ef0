"""Count the activation-sized copies of one LoRA training step on CPU, and the line each comes from.

    python benchmarks/count_copies.py                    # eager and compiled (aot_eager)
    python benchmarks/count_copies.py --inductor         # compiled with inductor (slow to start on CPU)
    python benchmarks/count_copies.py --unfixed          # the LoRA kernels before the fix (addmm_ traced)

The model is the fastest LoRA recipe (--lora --lora-rank 16 --precision bf16 --lora-kernels
--compile, plain loss) on a small Llama of the same structure. Attention is sdpa wrapped in
torch.compiler.disable, so each compiled block splits around it as it does around FlashAttention
on the GPU (features/compile.py). A TorchDispatchMode sees every aten op, compiled ones included,
and logs the copies whose output has at least tokens x hidden elements: copy_, clone, cat,
same-dtype _to_copy, the *_scatter ops of slice backward, and out-of-place addmm on a 2-D input,
which CUDA's addmm runs as a copy of that input into the output followed by a GEMM with beta = 1
(ATen's addmm_out_cuda_impl; that copy is a `Memcpy DtoD` in a GPU profile, but runs inside the
kernel, not as a dispatched copy_). Casts are counted apart: they are elementwise kernels.
"""

import argparse
import collections
import os
import sys
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

aten = torch.ops.aten
COPIES = {aten.copy_.default, aten.clone.default, aten.cat.default, aten._to_copy.default,
          aten.slice_scatter.default, aten.select_scatter.default, aten.as_strided_scatter.default}
ADDMM = {aten.addmm.default, aten.addmm.out}
_node = None  # the FX node running now (compiled graphs), for its source line


def _where(stack_trace: str | None = None) -> str:
    """file:line of the innermost frame outside torch (and this script): ours, transformers', peft's."""
    if stack_trace:  # a compiled node's recorded trace, "  File "...", line N, in fn\n    code" lines
        frames = [ln.strip() for ln in stack_trace.splitlines() if ln.strip().startswith("File ")]
        frames = [(f.split('"')[1], f.split("line ")[1].split(",")[0]) for f in frames]
    else:
        frames = [(f.filename, f.lineno) for f in traceback.extract_stack()]
    for filename, line in reversed(frames):
        if "torchinductor" in filename:
            return "inductor's generated code"
        if "/torch/" in filename or filename == __file__ or filename.startswith("<"):
            continue
        short = filename.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
        return f"{short}:{line}"
    return "autograd engine / torch internals"


class CopyLog(TorchDispatchMode):
    """Logs large copies by (kind, op, source line)."""

    def __init__(self, min_numel: int):
        super().__init__()
        self.min_numel, self.counts = min_numel, collections.Counter()

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True  # let dynamo compile; the mode still sees the compiled graphs' ops when they run

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        kind = None
        if func in ADDMM:  # a copy of `self` into the output unless the output is `self` (addmm_)
            if args[0].dim() == 2 and args[0].numel() >= self.min_numel and kwargs.get("beta", 1) != 0:
                kind = "addmm input copy"
        elif func in COPIES:
            t = out if isinstance(out, torch.Tensor) else args[0]
            if t.numel() >= self.min_numel:
                same = func is not aten._to_copy.default or args[0].dtype == t.dtype
                kind = func.__name__.split(".")[0] + ("" if same else f" (cast {args[0].dtype}->{t.dtype})")
        if kind:
            self.counts[(kind, _where(_node.meta.get("stack_trace") if _node is not None else None))] += 1
        return out


class _Interpreter(torch.fx.Interpreter):
    def run_node(self, n):
        global _node
        _node = n
        try:
            return super().run_node(n)
        finally:
            _node = None


def _counting_backend():
    """aot_eager, with each FX node's source line known while it runs."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    def compiler(gm, example_inputs):
        return make_boxed_func(lambda *args: _Interpreter(gm).run(*args))

    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler)


def unfix() -> None:
    """The LoRA kernels as they were before 2026-11-29: addmm_ traced by the compiler, not the custom op."""
    from features import lora_kernels

    lora_kernels._linear_plus = lora_kernels._linear_plus_eager


def build(layers=2, hidden=256, intermediate=896, heads=4, kv_heads=2, vocab=1024, fp8_base=False):
    """The small Llama with bf16 weights, fp32 LoRA r=16 on every linear, and the fused kernels
    (fp8_base: over --fp8-base's FP8 copies of the base, as train.py applies them)."""
    import transformers
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from features.lora import LoraConfig, apply_lora
    from features.lora_kernels import apply_lora_kernels

    # sdpa as an opaque call, like FlashAttention under --compile (features/compile.py)
    AttentionInterface.register("count_opaque_sdpa", torch.compiler.disable(sdpa_attention_forward))
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                                      max_position_embeddings=4096)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                          attn_implementation="count_opaque_sdpa")
    model.config.use_cache = False
    model = apply_lora(model.train(), LoraConfig(lora=True, lora_rank=16))
    if fp8_base:
        from features import fp8_base as fp8

        every_layer = argparse.Namespace(fp8_base=fp8.Fp8BaseConfig(fp8_base=True, fp8_base_keep_last=0),
                                         lora=argparse.Namespace(qlora=False),
                                         lora_kernels=argparse.Namespace(lora_kernels=True))
        model = fp8.apply(model, every_layer, argparse.Namespace(say=lambda *a: None))
    model = apply_lora_kernels(model)
    for name, p in model.named_parameters():  # peft's zero init would hide lora_A's gradient path
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def batch(vocab, micro_batch=2, seq=256):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (micro_batch, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(seq).repeat(micro_batch, 1)}


def compile_blocks(model, backend) -> None:
    """What features/compile.py's apply_compile does, with any backend."""
    from core.model import decoder_blocks

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for block in decoder_blocks(model):
        block.compile(backend=backend)


def step(model, b):
    """Forward, plain summed cross entropy (train.py's --loss ce), backward."""
    from core.loss import forward_loss_sum

    model.zero_grad(set_to_none=True)
    loss = forward_loss_sum(model, b, attn_impl="count_opaque_sdpa")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def count(model, b, min_numel) -> collections.Counter:
    step(model, b)  # warm-up: compiles
    log = CopyLog(min_numel)
    with log:
        step(model, b)
    return log.counts


def compiled_copies(model, b) -> dict:
    """The large copies of one step with the blocks compiled (aot_eager graphs, counted); casts apart."""
    compile_blocks(model, _counting_backend())
    counts = count(model, b, b["input_ids"].numel() * model.config.hidden_size)
    return {k: n for k, n in counts.items() if "cast" not in k[0]}  # casts are elementwise kernels, not copies


def report(title, counts, layers) -> str:
    total = sum(counts.values())
    lines = [f"{title}: {total} large copies per step ({total / layers:.1f} per block if all are in blocks)"]
    for (kind, where), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  {n:4d}  {kind:40s} {where}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--inductor", action="store_true", help="also count under inductor (minutes on 2 cores)")
    p.add_argument("--unfixed", action="store_true", help="count the LoRA kernels as they were before the fix")
    args = p.parse_args()
    if args.unfixed:
        unfix()
    b = batch(1024)
    tokens, hidden = b["input_ids"].numel(), 256
    model = build(args.layers)
    print(report("eager", count(model, b, tokens * hidden), args.layers))
    compile_blocks(model, _counting_backend())
    print(report("compiled (aot_eager graphs)", count(model, b, tokens * hidden), args.layers))
    if args.inductor:
        torch._dynamo.reset()
        model = build(args.layers)
        compile_blocks(model, "inductor")
        print(report("compiled (inductor)", count(model, b, tokens * hidden), args.layers))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
