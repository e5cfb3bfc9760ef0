"""Host time of one call of the LoRA kernels' linear_plus: the plain function, the same function
registered with torch.library.custom_op, and registered as nanotune registers its ops (core/ops.py).

    python benchmarks/op_dispatch.py --out op-dispatch.md        # CPU; on a GPU add --device cuda

Tiny tensors, so the time is the dispatch, not the math; under no_grad, as inside a compiled graph.
The compiled LoRA and FP8-base steps call such an op once per base matmul, forward and backward:
hundreds of times a micro-step.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from features.lora_kernels import _linear_plus_eager  # noqa: E402  (registers torch.ops.nanotune.linear_plus)


@torch.library.custom_op("nanotune_bench::linear_plus", mutates_args=())
def _custom_op(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, c: torch.Tensor, d: torch.Tensor,
               s: float) -> torch.Tensor:
    return _linear_plus_eager(x, w, bias, c, d, s)


def per_call_us(fn, args, calls: int, device: torch.device) -> float:
    """Median over 5 repeats of the mean host time a call."""
    times = []
    for _ in range(5):
        for _ in range(100):
            fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        times.append((time.perf_counter() - start) / calls * 1e6)  # launches only: no sync inside the loop
    return sorted(times)[2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--calls", type=int, default=5000)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    x, w, c, d = (torch.randn(*shape, device=device) for shape in ((8, 16), (16, 16), (8, 4), (4, 16)))
    call = (x, w, None, c, d, 0.5)
    forms = [("plain function", _linear_plus_eager), ("torch.library.custom_op", torch.ops.nanotune_bench.linear_plus),
             ("core/ops.py opaque_op (nanotune's)", torch.ops.nanotune.linear_plus)]
    lines = [f"{device}, torch {torch.__version__}, {args.calls} calls x 5, median", "",
             "| form | us a call | over the plain function |", "|---|---|---|"]
    with torch.no_grad():
        times = [(name, per_call_us(fn, call, args.calls, device)) for name, fn in forms]
    lines += [f"| {name} | {us:.1f} | +{us - times[0][1]:.1f} |" for name, us in times]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
