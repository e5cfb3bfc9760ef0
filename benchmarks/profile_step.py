"""Where a training step's GPU time goes: train.py under torch.profiler, kernels by category.

    python benchmarks/profile_step.py --out prof.md -- --model llama3-8b --lora --precision bf16 \
        --attn flash --lora-kernels --seq-len 4096 --micro-batch-size 1 --max-steps 8 ...

    # several GPUs: every rank profiles, rank 0 writes the table
    torchrun --nproc_per_node 2 benchmarks/profile_step.py --out prof.md -- --model llama3-8b --fsdp ...

Everything after `--` is train.py's own flags. Steps 5 and 6 are profiled (after warm-up and any
compilation); the table splits their GPU kernel time into matmul (cuBLAS/CUTLASS GEMMs),
attention, the fused loss kernels (--loss cce / liger: CCE computes the head's matmuls inside its
own), elementwise/reduction (norms, RoPE, activations, casts, adds, loss, optimizer) and copies,
and reports idle = wall time with no kernel running (host overhead, syncs, launch gaps).
Communication (NCCL) kernels run on their own streams beside the compute: they are reported apart,
in total and where nothing else runs (exposed: the GPU waits on the network). Then the idle time:
the longest gaps with the host ops that overlap them, all gaps by length (many short ones: launch-
bound; a few long ones: syncs), the kernels the gaps held up, and the host ops that overlapped the
most idle time over all gaps.
"""

import argparse
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

COMM = "communication"
ANNOTATION = re.compile(r"^[A-Za-z_][\w.]*#")  # record_function ranges: ProfilerStep#5, Optimizer.step#AdamW.step
CATEGORIES = [  # first match wins; names as CUDA reports them (cuBLAS, CUTLASS, FA4, inductor, aten, NCCL)
    (COMM, r"nccl"),
    ("attention", r"flash|fmha|attn|attention"),
    # CCE's and Liger's Triton loss kernels: the head's matmuls run inside CCE's, so they are not elementwise
    ("fused loss", r"_cce_|indexed_neg_dot|cross_entropy_kernel"),
    ("matmul", r"gemm|nvjet|sm90_xmma|cutlass|matmul|splitk|cublas"),
    ("copy", r"memcpy|memset|copy_kernel|Memcpy|Memset"),
    ("triton (compiled)", r"^triton_"),
    ("elementwise/reduction", r"."),
]


def category(name: str) -> str:
    return next(c for c, pattern in CATEGORIES if re.search(pattern, name, re.IGNORECASE))


def covered(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def kernel_events(events) -> list[tuple[str, float, float]]:
    """(name, start us, end us) of the CUDA kernels among profiler events. The GPU-side ranges of
    annotations (`ProfilerStep#5`, `Optimizer.step#AdamW.step`) are not kernels: counted, they
    charged the optimizer's kernels twice (44.6 ms a step of an 8B full fine-tune)."""
    return [(e.name, e.time_range.start, e.time_range.end) for e in events
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
            and not ANNOTATION.match(e.name)]


def cpu_events(events) -> list[tuple[str, float, float]]:
    """(name, start us, end us) of the host-side ops and annotations (the profiler's step ranges left out)."""
    return [(e.name, e.time_range.start, e.time_range.end) for e in events
            if e.device_type == DeviceType.CPU and not e.name.startswith("ProfilerStep")]


def gaps(kernels: list[tuple[str, float, float]]) -> list[tuple[float, float, str, str]]:
    """(start, end, kernel before, kernel after) of every stretch with no kernel running, in order."""
    found, end, last = [], None, None
    for name, a, b in sorted(kernels, key=lambda k: k[1]):
        if end is not None and a > end:
            found.append((end, a, last, name))
        if end is None or b > end:
            end, last = b, name
    return found


def idle_gaps(idle: list[tuple[float, float, str, str]], host: list[tuple[str, float, float]],
              top: int = 8, min_us: float = 200) -> str:
    """The longest stretches with no kernel running, each with the kernels around it and the host ops
    that overlap it most: what the host was doing while the GPU waited (a sync, a launch-bound
    optimizer, data loading). Nested ops all overlap a gap, so an outer op and its inner ones show."""
    long = sorted(((b - a, a, b, before, after) for a, b, before, after in idle if b - a >= min_us), reverse=True)
    if not long:
        return f"no gap of {min_us / 1e3:g} ms or more without a kernel"
    lines = ["| idle gap (ms) | after kernel | before kernel | host ops overlapping it (ms) |", "|---|---|---|---|"]
    for length, a, b, before, after in long[:top]:
        overlap = sorted(((min(e, b) - max(s, a), n) for n, s, e in host if s < b and e > a), reverse=True)[:4]
        ops = ", ".join(f"`{n[:50]}` {t / 1e3:.1f}" for t, n in overlap) or "none recorded"
        lines.append(f"| {length / 1e3:.2f} | `{before[:40]}` | `{after[:40]}` | {ops} |")
    return "\n".join(lines)


GAP_LENGTHS = [(0, 50, "under 0.05 ms"), (50, 500, "0.05-0.5 ms"), (500, 5000, "0.5-5 ms"),
               (5000, float("inf"), "5 ms or more")]


def idle_by_length(idle: list[tuple[float, float, str, str]], steps: int) -> str:
    """Idle time by gap length: many short gaps are a host that launches slower than the GPU runs,
    a few long ones are syncs or host work between phases of the step."""
    lines = ["| gap length | gaps a step | idle ms a step |", "|---|---|---|"]
    for low, high, label in GAP_LENGTHS:
        inside = [b - a for a, b, *_ in idle if low <= b - a < high]
        lines.append(f"| {label} | {len(inside) / steps:.0f} | {sum(inside) / steps / 1e3:.1f} |")
    return "\n".join(lines)


def idle_by_next_kernel(idle: list[tuple[float, float, str, str]], steps: int, min_us: float = 50,
                        top: int = 10) -> str:
    """Idle time of the gaps of min_us or more, by the kernel each one held up: the launch the GPU waited
    for. Hundreds of gaps a step before one kernel point at the host path that launches it."""
    by_kernel = defaultdict(lambda: [0.0, 0])
    for a, b, _, after in idle:
        if b - a >= min_us:
            by_kernel[after][0] += b - a
            by_kernel[after][1] += 1
    if not by_kernel:
        return f"no gap of {min_us / 1e3:g} ms or more without a kernel"
    lines = ["| kernel after the gap | gaps a step | idle ms a step |", "|---|---|---|"]
    for name, (t, n) in sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"| `{name[:70]}` | {n / steps:.0f} | {t / steps / 1e3:.1f} |")
    return "\n".join(lines)


def idle_by_host_op(idle: list[tuple[float, float, str, str]], host: list[tuple[str, float, float]],
                    steps: int, top: int = 12) -> str:
    """The idle time each host op overlapped, over every gap (nested ops each count theirs): the host
    work the GPU waited on, summed where the longest-gaps table shows single gaps."""
    if not idle or not host:
        return "no idle time or no host ops recorded"
    starts, ends = (torch.tensor(column, dtype=torch.float64) for column in list(zip(*idle))[:2])
    before = torch.cat([torch.zeros(1, dtype=torch.float64), (ends - starts).cumsum(0)])

    def idle_until(t: torch.Tensor) -> torch.Tensor:  # the idle time before each moment t
        i = torch.searchsorted(starts, t, right=True)
        still_open = (ends[(i - 1).clamp(min=0)] - t).clamp(min=0) * (i > 0)
        return before[i] - still_open

    names = [n for n, _, _ in host]
    overlap = idle_until(torch.tensor([e for _, _, e in host], dtype=torch.float64)) - \
        idle_until(torch.tensor([s for _, s, _ in host], dtype=torch.float64))
    by_name = defaultdict(float)
    for name, t in zip(names, overlap.tolist()):
        by_name[name] += t
    lines = ["| host op | idle ms a step it overlapped |", "|---|---|"]
    for name, t in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| `{name[:70]}` | {t / steps / 1e3:.1f} |")
    return "\n".join(lines)


def summarize(prof, steps: int) -> str:
    events = prof.events()
    kernels, host = kernel_events(events), cpu_events(events)
    idle = gaps(kernels)
    return "\n\n".join([table(kernels, steps), "Where the GPU waited (longest gaps over all profiled steps):",
                        idle_gaps(idle, host), "Idle time by gap length:", idle_by_length(idle, steps),
                        "Idle time by the kernel each gap held up (gaps of 0.05 ms or more):",
                        idle_by_next_kernel(idle, steps),
                        "Idle time by the host ops that overlapped it:", idle_by_host_op(idle, host, steps)])


def table(kernels: list[tuple[str, float, float]], steps: int) -> str:
    """The Markdown breakdown of (name, start us, end us) kernels recorded over `steps` steps."""
    if not kernels:
        return "no CUDA kernels recorded"
    start = min(a for _, a, _ in kernels)
    wall = max(b for _, _, b in kernels) - start  # us
    by_cat, by_name = defaultdict(float), defaultdict(lambda: [0.0, 0])
    for name, a, b in kernels:
        by_cat[category(name)] += b - a
        by_name[name][0] += b - a
        by_name[name][1] += 1
    compute = covered([(a, b) for name, a, b in kernels if category(name) != COMM])
    anything = covered([(a, b) for _, a, b in kernels])
    per = lambda t: f"{t / steps / 1e3:.1f} | {100 * t / wall:.1f}%"  # noqa: E731
    lines = [f"per step: wall {wall / steps / 1e3:.1f} ms, kernels {compute / steps / 1e3:.1f} ms, "
             f"{len(kernels) // steps} kernel launches", "",
             "| category | ms/step | share of wall |", "|---|---|---|"]
    for cat, t in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        if cat != COMM:
            lines.append(f"| {cat} | {per(t)} |")
    if COMM in by_cat:
        lines.append(f"| communication (NCCL, beside compute) | {per(by_cat[COMM])} |")
        lines.append(f"| communication alone (exposed) | {per(anything - compute)} |")
    lines.append(f"| idle (no kernel running) | {per(wall - anything)} |")
    lines += ["", "| kernel (top 25 by time) | category | ms/step | calls/step |", "|---|---|---|---|"]
    for name, (t, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:25]:
        lines.append(f"| `{name[:90]}` | {category(name)} | {t / steps / 1e3:.2f} | {n // steps} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--first", type=int, default=5, help="first profiled step")
    p.add_argument("--steps", type=int, default=2, help="profiled steps")
    args, train_args = p.parse_known_args()
    train_args = [a for a in train_args if a != "--"]

    import train
    from core import runlog

    # one step of warm-up before the profiled ones, and events kept across the (single) cycle: torch warns otherwise
    schedule = torch.profiler.schedule(wait=max(args.first - 2, 0), warmup=1, active=args.steps, repeat=1)
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                              torch.profiler.ProfilerActivity.CUDA], schedule=schedule, acc_events=True)
    advance = runlog.MetricsLog.advance

    def advance_and_step(self, tokens_per_s):  # one profiler step per optimizer step
        advance(self, tokens_per_s)
        prof.step()

    runlog.MetricsLog.advance = advance_and_step
    with prof:
        train.train(train.parse_config(train_args))
    if int(os.environ.get("RANK", 0)):
        return  # one table, rank 0's
    text = summarize(prof, args.steps)
    print(text)
    if args.out:
        Path(args.out).write_text(f"train.py {' '.join(train_args)}\n\n{text}\n")


if __name__ == "__main__":
    main()
