"""The optimizer step alone on a preset's weights: torch's fused AdamW on fp32 weights (what bf16-mixed
trains) against --optimizer adamw-sr on bf16 weights, eager and compiled.

    python benchmarks/optimizer_step.py --model llama3.2-1b --out optimizer-step.md

Random gradients on the preset's parameter shapes (its model built on the meta device only); each
row times --steps steps after --warmup (which also compiles), with CUDA events around the loop. The
table gives milliseconds a step, the least memory traffic a step needs (weights, gradients and
moments read; weights and moments written) and that traffic over the step's time.
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from core.model import PRESETS  # noqa: E402
from core.optim import OptimConfig, build_optimizer  # noqa: E402

ROWS = [("torch AdamW, fused, fp32 weights", "adamw", torch.float32, False),
        ("adamw-sr, eager, bf16 weights", "adamw-sr", torch.bfloat16, False),
        ("adamw-sr, compiled, bf16 weights", "adamw-sr", torch.bfloat16, True)]


def preset_shapes(name: str) -> list[torch.Size]:
    """The preset's parameter shapes, from the model built on the meta device (no memory)."""
    import transformers

    config_class, fields = PRESETS[name]
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**fields))
    return [p.shape for p in model.parameters()]


def time_step(shapes, optimizer: str, dtype, compiled: bool, steps: int, warmup: int) -> float:
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype) * 0.02) for s in shapes]
    model = torch.nn.Module()
    model.params = torch.nn.ParameterList(params)
    opt = build_optimizer(model, OptimConfig(optimizer=optimizer, lr=2e-5), torch.device("cuda"),
                          "inductor" if compiled else None)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    for _ in range(warmup):
        opt.step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        opt.step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3.2-1b", choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    shapes = preset_shapes(args.model)
    numel = sum(s.numel() for s in shapes)
    lines = [f"{args.model}: {len(shapes)} tensors, {numel / 1e9:.3f}B parameters, {torch.cuda.get_device_name()}",
             "", "| optimizer | ms a step | least traffic (GB) | GB/s |", "|---|---|---|---|"]
    for name, optimizer, dtype, compiled in ROWS:
        ms = time_step(shapes, optimizer, dtype, compiled, args.steps, args.warmup)
        width = torch.finfo(dtype).bits // 8
        moved = numel * (2 * width + width + 8 + 8)  # weight read+write, gradient read, two fp32 moments read+write
        lines.append(f"| {name} | {ms:.2f} | {moved / 1e9:.1f} | {moved / ms / 1e6:,.0f} |")
        torch.cuda.empty_cache()
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
