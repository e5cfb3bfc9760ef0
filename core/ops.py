"""nanotune's opaque ops: one node each in a torch.compile graph, whatever runs inside them.

    opaque_op("linear_plus", _linear_plus_eager, fake)   # then torch.ops.nanotune.linear_plus(...)

The LoRA kernels and the FP8 base call a few functions that inductor must not trace into (an
in-place addmm_ it would copy around, a dequantized weight it would keep for backward, an FP8
matmul it would lower wrongly; each caller says which). Each is registered on the dispatcher
directly, through torch.library.Library, not with torch.library.custom_op: custom_op runs every call
through Python wrappers (an autograd wrapper, an output aliasing check) that cost several times the
dispatch itself, and these ops run hundreds of times a micro-step, where the host is what a step
waits on (benchmarks/op_dispatch.py; benchmarks/results/2026-12-03-op-dispatch-cpu.md).

They need no autograd formula: they appear only in the graphs torch.compile traces from the bodies
of autograd.Functions (the fused LoRA kernels, the FP8 matmuls), which write out their own backward,
so autograd never differentiates through them. Eager code calls the plain functions, no dispatch.
"""

import torch

_LIB = torch.library.Library("nanotune", "FRAGMENT")


def opaque_op(name: str, fn, fake):
    """torch.ops.nanotune.<name>: fn on every device (its schema read from fn's annotations), fake
    for tracing (the output's shape and dtype, on meta or fake tensors). fn must return a new tensor,
    not a view of an input."""
    _LIB.define(name + torch.library.infer_schema(fn, mutates_args=()))
    _LIB.impl(name, fn, "CompositeExplicitAutograd")
    torch.library.register_fake(f"nanotune::{name}", fake, lib=_LIB)
    return getattr(torch.ops.nanotune, name)
