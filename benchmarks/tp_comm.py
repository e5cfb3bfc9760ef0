"""Collectives, DTensor ops and step time of --fsdp --tp 2 against plain --fsdp, per optimizer step.

    # 2 GPUs: the shape of the tp-full row of gpu_distributed.sh scaling (Llama-3.1-8B, seq 4096, 8 sequences a step)
    python benchmarks/tp_comm.py --model llama3-8b --seq-len 4096 --precision bf16 --out /tmp/tp_comm.md
    # CPU, gloo (tests/test_tp_plan.py):
    python benchmarks/tp_comm.py --model tiny-llama --device cpu --seq-len 64 --global-batch 2
    # CPU, the host cost at the 8B depth: 32 thin layers, 16 tokens (compute negligible)
    python benchmarks/tp_comm.py --model tiny-llama --layers 32 --device cpu --seq-len 16 --global-batch 4 --timed 3

Layouts (--layouts), each `torchrun --standalone --nproc_per_node 2` of this file with --worker:
    fsdp         FSDP2 over the 2 ranks (data parallel: each reads half of the global batch)
    tp2          --fsdp --tp 2: features/tensor_parallel.py's Megatron plan (both ranks read every row)
    tp2-dtensor  --fsdp --tp 2 with torch's ColwiseParallel / RowwiseParallel (the plan before 2026-11-29)
The model, sharding, optimizer, loss scaling and gradient-sync switch are train.py's (features/),
on rows of random token ids (the same global batch for every layout). Per layout: one warm-up
step, --timed steps timed, then one step run again under torch.profiler (CPU events, shapes) and a
TorchDispatchMode: every c10d collective (all_reduce, _allgather_base, _reduce_scatter_base, ...;
DTensor's functional collectives and FSDP2's alike) counted by phase (forward, backward,
optimizer = clip + AdamW) with its full-size buffer in MiB, the ops dispatched on DTensors
(each one pays DTensor's sharding propagation on the host), and what attention reads: the type and
local head count of q_proj's output in the first block, and the attention ops the profiler saw.
The ideal Megatron plan costs 2 all-reduces of tokens x hidden per block and micro-batch in
forward and 2 in backward. Tables are printed (and written to --out); --json keeps the numbers.
"""

import argparse
import collections
import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = {"fsdp": 1, "tp2": 2, "tp2-dtensor": 2}  # name -> tp size (2 ranks each)
_DTYPE_BYTES = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2, "long int": 8, "int": 4,
                "unsigned char": 1, "signed char": 1, "bool": 1, "c10::Float8_e4m3fn": 1, "c10::Float8_e5m2": 1}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--layouts", default="fsdp,tp2,tp2-dtensor", help=f"comma-separated, of: {', '.join(LAYOUTS)}")
    p.add_argument("--layers", type=int, default=None,
                   help="the preset's decoder layers overridden (tiny-llama x 32: the host cost at the 8B depth)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step (micro-batch 1)")
    p.add_argument("--timed", type=int, default=2, help="steps timed after the warm-up step")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when visible")
    p.add_argument("--precision", default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--attn", default="auto", help="train.py's --attn")
    p.add_argument("--out", default=None, help="also write the tables here (Markdown)")
    p.add_argument("--json", default=None, help="write the numbers here (with --worker: that layout's)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    bad = [x for x in args.layouts.split(",") if x not in LAYOUTS]
    if bad:
        p.error(f"--layouts: unknown {', '.join(bad)}; choose from {', '.join(LAYOUTS)}")
    return args


# ---------------------------------------------------------------------------- the worker (one layout)


def _event_bytes(event, fallback: int) -> int:
    """Bytes of a c10d collective's largest buffer (all-gather output, reduce-scatter input, the
    all-reduced tensor), from the event or the backend event under it (gloo:/nccl: carry dtypes)."""
    for ev in (event, *event.cpu_children, *(g for c in event.cpu_children for g in c.cpu_children)):
        shapes = getattr(ev, "structured_input_shapes", None) or ev.input_shapes or []
        dtypes = getattr(ev, "input_dtypes", None) or []
        sizes = []
        for shape, dtype in zip(shapes[:2], dtypes[:2]):
            tensors = shape if shape and isinstance(shape[0], list) else [shape]
            numel = sum(_numel(s) for s in tensors if s)
            if numel and dtype in _DTYPE_BYTES:
                sizes.append(numel * _DTYPE_BYTES[dtype])
        if sizes:
            return max(sizes)
    shapes = getattr(event, "structured_input_shapes", None) or []
    flat = [s for shape in shapes[:2] for s in (shape if shape and isinstance(shape[0], list) else [shape]) if s]
    return max((_numel(s) * fallback for s in flat), default=0)


def _numel(shape) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


class _Counter:
    """Collectives (profiler) and DTensor ops (dispatch mode) by phase, over the regions it wraps."""

    def __init__(self, elem_bytes: int):
        self.elem_bytes = elem_bytes
        self.collectives = collections.Counter()  # (kind, phase) -> count
        self.bytes = collections.Counter()
        self.dtensor_ops = collections.Counter()  # phase -> ops on DTensors
        self.dtensor_kinds = collections.Counter()
        self.attention_ops = collections.Counter()

    @contextlib.contextmanager
    def phase(self, name: str):
        from torch.distributed.tensor import DTensor
        from torch.profiler import ProfilerActivity, profile
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        counter = self

        class DTensorOps(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if any(isinstance(a, DTensor) for a in tree_flatten((args, kwargs or {}))[0]):
                    counter.dtensor_ops[name] += 1
                    counter.dtensor_kinds[str(func.overloadpacket)] += 1
                return func(*args, **(kwargs or {}))

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof, DTensorOps():
            yield
        for ev in prof.events():
            if ev.name.startswith("c10d::"):
                kind = ev.name.removeprefix("c10d::").strip("_")
                self.collectives[kind, name] += 1
                self.bytes[kind, name] += _event_bytes(ev, self.elem_bytes)
            elif name == "forward" and ("attention" in ev.name.lower() or "flash" in ev.name.lower()):
                self.attention_ops[ev.name] += 1


def _rows(args, vocab: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (args.global_batch, args.seq_len), generator=g)


def _batch(row, device):
    import torch

    n = row.numel()
    return {"input_ids": row[None].to(device), "labels": row[None].to(device),
            "position_ids": torch.arange(n, device=device)[None],
            "cu_seqlens": torch.tensor([0, n], dtype=torch.int32, device=device), "max_seqlen": n}


def worker(args) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from core import attention
    from core.attention import AttentionConfig
    from core.distributed import MeshConfig, all_reduce_sum, init_distributed, sync_gradients, teardown
    from core.optim import clip_grad_norm
    from features.fsdp import ShardingConfig, apply_sharding
    from core.loss import forward_loss_sum
    from core.model import ModelConfig, autocast, load_config, load_model, load_tokenizer, resolve_precision
    from core.optim import OptimConfig, build_optimizer
    from features.tensor_parallel import apply_tensor_parallel

    layout, tp = args.worker, LAYOUTS[args.worker]
    d = init_distributed(args.device, MeshConfig(tp=tp), need_group=True)
    mcfg = ModelConfig(args.model, precision=args.precision)
    config = load_config(mcfg, load_tokenizer(mcfg))
    config.num_hidden_layers = args.layers or config.num_hidden_layers
    impl = attention.resolve(AttentionConfig(args.attn), d.device, config)
    precision = resolve_precision(mcfg, d.device)
    torch.manual_seed(0)
    model = load_model(mcfg, config, d.device, impl)
    if tp > 1:  # train.py's order: tensor parallel, then sharding (FSDP2 over the dp ranks)
        model = apply_tensor_parallel(model, d, dtensor_styles=layout == "tp2-dtensor")
    model = apply_sharding(model, ShardingConfig(fsdp=True), d, precision)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-5, warmup_steps=0), d.device)
    ctx = autocast(precision, d.device)
    accum = args.global_batch // d.dp_size
    rows = _rows(args, config.vocab_size)[d.dp_rank * accum:(d.dp_rank + 1) * accum]
    micro = [_batch(r, d.device) for r in rows]
    n_targets = args.global_batch * (args.seq_len - 1)
    seen = {}
    q_proj = next(m for name, m in model.named_modules() if name.endswith("layers.0.self_attn.q_proj"))
    q_proj.register_forward_hook(
        lambda m, a, out: None if "q" in seen else seen.update(q=(type(out).__name__, out.shape[-1])))

    def step(phase=lambda name: contextlib.nullcontext()) -> tuple[float, float]:
        total = torch.zeros((), dtype=torch.float64, device=d.device)
        for i, mb in enumerate(micro):  # train.py's step body
            with phase("forward"), sync_gradients(model, sync=i == len(micro) - 1), ctx:
                loss_sum = forward_loss_sum(model, mb, impl)
            with phase("backward"):
                (loss_sum * (d.grad_ranks / n_targets)).backward()
            total += loss_sum.detach()
        with phase("optimizer"):
            norm = clip_grad_norm(list(model.parameters()), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return (all_reduce_sum(total, d) / n_targets).item(), float(norm)

    def sync():
        if d.device.type == "cuda":
            torch.cuda.synchronize()
        torch.distributed.barrier()

    first = step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.timed):
        step()
    sync()
    step_s = (time.perf_counter() - t0) / max(args.timed, 1)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    counter = _Counter(torch.finfo(torch.bfloat16 if precision == "bf16" else torch.float32).bits // 8)
    step(counter.phase)
    result = {"layout": layout, "world": d.world_size, "tp": tp, "dp": d.dp_size, "micro_batches": accum,
              "layers": config.num_hidden_layers, "seq_len": args.seq_len, "attn_impl": impl,
              "loss": first[0], "grad_norm": first[1], "step_s": step_s,
              "tokens_per_s_per_gpu": args.global_batch * args.seq_len / step_s / d.world_size,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if d.device.type == "cuda" else None,
              "collectives": [{"kind": k, "phase": ph, "count": n, "mib": counter.bytes[k, ph] / 2**20}
                              for (k, ph), n in sorted(counter.collectives.items())],
              "dtensor_ops": dict(counter.dtensor_ops), "dtensor_op_kinds": dict(counter.dtensor_kinds.most_common(8)),
              "attention_input": {"type": seen["q"][0], "local_heads": seen["q"][1] // head_dim,
                                  "heads": config.num_attention_heads},
              "attention_ops": dict(counter.attention_ops)}
    if d.is_main and args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    teardown()


# ---------------------------------------------------------------------------- the launcher and tables


def run_layout(args, layout: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--worker", layout, "--json", str(out), "--model", args.model, "--seq-len", str(args.seq_len),
           *(["--layers", str(args.layers)] if args.layers else []),
           "--global-batch", str(args.global_batch), "--timed", str(args.timed), "--device", args.device,
           "--precision", args.precision, "--attn", args.attn]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    print(f"== {layout}: {shlex.join(cmd[2:])}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        # the worker's own error (an exception, or nanotune's "error: ..." line), else torchrun's exit code line;
        # not torchrun's report of it ("raise ChildFailedError(")
        errors = [line for line in lines if ("Error" in line or "error:" in line) and "ChildFailedError" not in line
                  and "torch.distributed.elastic" not in line] or [line for line in lines if "exitcode" in line]
        errors = errors or lines[-3:]
        return {"layout": layout, "error": f"exit {proc.returncode}: {errors[-1].strip()[:300]}"}
    return json.loads(out.read_text())


def tables(results: list[dict], args) -> str:
    lines = [f"Model {args.model}, seq {args.seq_len}, global batch {args.global_batch} sequences (micro-batch 1), "
             f"{args.precision}, {args.device}, 2 ranks. Counts and MiB are per optimizer step on one rank; "
             "MiB = each collective's full-size buffer.", "",
             "| layout | collective | phase | count / step | MiB / step | per block x micro-batch |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['layout']} | error: {r['error'][:300].replace('|', '/')} | | | | |")
            continue
        for c in r["collectives"]:
            per = c["count"] / (r["layers"] * r["micro_batches"]) if c["phase"] != "optimizer" else None
            lines.append(f"| {r['layout']} | {c['kind']} | {c['phase']} | {c['count']} | {c['mib']:,.1f} | "
                         f"{'' if per is None else f'{per:g}'} |")
        if not r["collectives"]:
            lines.append(f"| {r['layout']} | (none) | | 0 | 0 | |")
    lines += ["", "| layout | micro-batches / rank | DTensor ops fwd / bwd / optimizer | "
              "attention input (q_proj out) | "
              "attention ops (forward) | step s | tokens/s per GPU | peak GiB | loss (step 1) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            continue
        ops = r["dtensor_ops"]
        a = r["attention_input"]
        att = ", ".join(f"{k} x{v}" for k, v in sorted(r["attention_ops"].items())) or "n/a"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "n/a"
        lines.append(f"| {r['layout']} | {r['micro_batches']} | {ops.get('forward', 0)} / {ops.get('backward', 0)} / "
                     f"{ops.get('optimizer', 0)} | {a['type']}, {a['local_heads']} of {a['heads']} heads | {att} | "
                     f"{r['step_s']:.3f} | {r['tokens_per_s_per_gpu']:,.0f} | {peak} | {r['loss']:.6f} |")
    lines += ["", "Ideal Megatron TP: 2 all_reduce per block x micro-batch in forward (after o_proj and down_proj) "
              "and 2 in backward (the input gradients of q/k/v and of gate/up, each summed once)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse(argv)
    if args.worker:
        worker(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_layout(args, layout, Path(tmp) / f"{layout}.json") for layout in args.layouts.split(",")]
    text = tables(results, args)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(text)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
