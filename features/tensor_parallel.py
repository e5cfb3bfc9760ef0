"""Tensor parallelism of the decoder (Megatron-LM): column-parallel q/k/v/gate/up, row-parallel o/down.

    torchrun --nproc_per_node 2 train.py --tp 2                       # 2-way TP, one data-parallel rank
    torchrun --nproc_per_node 8 train.py --tp 2 --fsdp                # 4-way FSDP x 2-way TP (2-D)

Each tp rank holds 1/tp of the attention heads and of the MLP's intermediate features as DTensor
parameters with the placements of torch's ColwiseParallel / RowwiseParallel (q/k/v/gate/up
Shard(0), o/down Shard(1), an o/down bias Replicate), so FSDP2, AdamW, grad clipping, DCP
checkpoints and the export see the same DTensors as before. The projections compute on the local
shards as plain tensors, with Megatron's f and g done by hand once per attention and per MLP:
f on their input (identity forward; backward sums the input gradient over the tp ranks, once for
q, k and v together, once for gate and up), g on the o/down output (sum forward, identity
backward). A block costs 2 all-reduces in forward and 2 in backward, and attention, RoPE and the
activation run on plain tensors with heads / tp local heads.

Why not torch's ColwiseParallel / RowwiseParallel (apply_tensor_parallel's `dtensor_styles`): each
column-parallel projection all-reduces its own input gradient (5 all-reduces per block in
backward instead of 2), and every projection runs as ~13 ops dispatched through DTensor (t, view,
mm, ...: sharding propagation on the host for each), 2,912 per micro-batch at 32 layers; at
micro-batch 1 a GPU step cannot hide that host time (CPU counts and timings: benchmarks/tp_comm.py,
which runs both plans). Projections that are not plain nn.Linear (FP8's Float8Linear, QAT's
fake-quantized linears) keep the DTensor styles (--qat is refused with --tp: under them its
quantizers fail, "'IntxFakeQuantizer' object has no attribute 'weight'"). Embeddings, norms and
the head stay whole on every tp rank. The tp ranks of a dp rank read the same batch (see
core/distributed.py). Reference: Shoeybi et al. 2019, Megatron-LM (section 3, f and g);
gpt-fast's tp.py; torch.distributed.tensor.parallel.

LoRA (--lora, peft's lora.Linear around a projection): the frozen base is sharded as above, and
the adapter beside it so that no extra collective runs on activations: for a column-parallel
projection lora_A stays whole (the input is whole; each rank's gradient of it is a partial sum over
its features: sum_partial_grads sums them over the tp ranks once a step, all in one flat
all-reduce, before the norm and the update) and lora_B is split by rows; for a row-parallel one
lora_A is split by columns (its r outputs summed: an all-reduce of tokens x r) and lora_B stays
whole. The exported adapter is gathered whole, in peft's format. Why the r outputs get their own
all-reduce rather than joining the base's partial outputs before its one (sum_i W_i x_i + B A_i x_i):
in bf16 each rank's part of the small adapter update rounds away against its partial base output,
so the loss drifts far further off the plain run's, for no speed gain
(benchmarks/results/2026-11-30-scaling-2xh200.md; tests/test_tp_plan.py's bf16 test fails on it).

Works with: --fsdp (FSDP shards the TP'd DTensors over the dp dims), --lora, packing, every
attention backend (heads are local), activation checkpointing or --compile, --tiled-mlp, DCP
checkpoints (a 1-D FSDP checkpoint resumes as FSDP x TP), the export (gathered whole, the sharded
linears compute as plain ones). Without --fsdp and one dp rank, FSDP over that rank still wraps the
model (nothing sharded) so every parameter is a DTensor, as AdamW's foreach kernels need. Refused
with: heads or kv heads not divisible by --tp; a quantized base (--qlora, --lora-8bit), --dora,
--lora-kernels, --lora-dropout > 0 (each rank would draw its own mask for the shared lora_A); --ac
together with --compile (torch 2.13's compiled checkpoint refuses the DTensor weights saved for
backward); --ddp; several dp ranks without --fsdp.
"""

import torch
import torch.nn.functional as F

from core import UserError, optional
from core.distributed import Dist, attention_blocks

# (sub-module, column-parallel projections, row-parallel projections) of a decoder block
_PARTS = (("self_attn", ("q_proj", "k_proj", "v_proj"), ("o_proj",)),
          ("mlp", ("gate_proj", "up_proj"), ("down_proj",)))


def check_model(tp: int, model_config, lora_dropout: float = 0.0, ac: str = "none", compiled: bool = False) -> None:
    """What --tp N refuses once the model's config and the flags are known (not a config validator)."""
    if tp == 1:
        return
    if ac != "none" and compiled:  # found on CPU (torch 2.13, 2 and 4 gloo ranks), full fine-tune and LoRA alike
        raise UserError(f"--tp {tp} with --ac {ac} and --compile: torch's compiled checkpoint refuses the "
                        f"DTensor weights the sharded projections save for backward; drop --compile or --ac")
    if lora_dropout:  # the column-parallel lora_A sees the whole input on every tp rank: one mask for all
        raise UserError(f"--lora-dropout {lora_dropout} with --tp {tp}: each tp rank would drop other input "
                        f"features before the shared lora_A; use --lora-dropout 0 with --tp")
    heads, kv = model_config.num_attention_heads, getattr(model_config, "num_key_value_heads", None)
    kv = kv or heads
    if heads % tp or kv % tp:
        raise UserError(f"--tp {tp} must divide the attention heads ({heads}) and key/value heads ({kv}) "
                        f"of the model; pick a --tp that divides both")


def apply_tensor_parallel(model, d: Dist, dtensor_styles: bool = False):
    """Shard each decoder block's projections over the "tp" mesh dim (in place). dtensor_styles:
    torch's ColwiseParallel / RowwiseParallel on every projection, the plain DTensor plan
    (benchmarks/tp_comm.py measures both; train.py always uses the Megatron plan)."""
    mesh = d.sub("tp")
    for block in attention_blocks(model, "--tp"):
        for part_name, colwise, rowwise in _PARTS:
            part = getattr(block, part_name, None)
            names = [n for n in colwise + rowwise if part is not None and hasattr(part, n)]
            if not names:  # e.g. an MoE block's mlp: left whole
                continue
            if not set(names) & set(colwise) or not set(names) & set(rowwise):
                raise UserError(f"--tp: {type(part).__name__} has {', '.join(names)} but not both a column-parallel "
                                f"({', '.join(colwise)}) and a row-parallel ({', '.join(rowwise)}) projection; "
                                f"this architecture cannot use --tp (use --fsdp)")
            if dtensor_styles or not all(_shardable(getattr(part, n)) for n in names):
                _dtensor_styles(part, mesh, colwise, names)
                continue
            for n in names:
                _shard_projection(part, n, mesh, n in rowwise)
            part.register_forward_pre_hook(_copy_input_hook(mesh.get_group()), with_kwargs=True)
    return model


def _shardable(proj) -> bool:
    """A plain nn.Linear, or peft's lora.Linear (plain LoRA, no DoRA) around one."""
    if hasattr(proj, "base_layer"):
        return type(proj.base_layer) is torch.nn.Linear and not any(getattr(proj, "use_dora", {}).values())
    return type(proj) is torch.nn.Linear


def _shard_projection(part, name: str, mesh, rowwise: bool) -> None:
    """An nn.Linear, or peft's lora.Linear around one (base_layer, lora_A, lora_B; y = base(x) +
    B(A(x)) * scale). Column-parallel: x is whole, the output this rank's features: A whole (its
    gradient, a partial sum over the ranks' features, summed), B by rows. Row-parallel: x is this
    rank's features: A by columns with its r outputs summed (a g of rank r, tiny), B whole."""
    proj = getattr(part, name)
    if not hasattr(proj, "base_layer"):
        setattr(part, name, _ShardedLinear(proj, mesh, rowwise))
        return
    proj.base_layer = _ShardedLinear(proj.base_layer, mesh, rowwise)
    for key in proj.lora_A:
        a, b = proj.lora_A[key], proj.lora_B[key]
        proj.lora_A[key] = (_ShardedLinear(a, mesh, rowwise=True) if rowwise
                            else _ReplicatedLinear(a, mesh, sum_grad=True))
        proj.lora_B[key] = (_ReplicatedLinear(b, mesh, sum_grad=False) if rowwise
                            else _ShardedLinear(b, mesh, rowwise=False))


def _dtensor_styles(part, mesh, colwise, names) -> None:
    """Linear subclasses (Float8Linear, QAT's fake-quantized linears) compute through DTensor."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    parallelize_module(part, mesh, {n: ColwiseParallel() if n in colwise else RowwiseParallel() for n in names})


class _ShardedLinear(torch.nn.Linear):
    """A column- (weight Shard(0)) or row-parallel (Shard(1), output all-reduced) nn.Linear whose
    forward runs on the local shard: one `to_local` per parameter instead of DTensor's dispatch of
    every op. After gather_full (export) its parameters are whole tensors and it is a plain Linear."""

    def __init__(self, linear: torch.nn.Linear, mesh, rowwise: bool):
        from torch.distributed.tensor import Replicate, Shard

        has_bias = linear.bias is not None
        super().__init__(linear.in_features, linear.out_features, has_bias, device="meta")
        self.rowwise, self.group = rowwise, mesh.get_group()
        self.weight = _distribute(linear.weight, mesh, Shard(1) if rowwise else Shard(0))
        if has_bias:
            self.bias = _distribute(linear.bias, mesh, Replicate() if rowwise else Shard(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        weight, bias = self.weight, self.bias
        if not isinstance(weight, DTensor):  # gathered whole for the export
            return F.linear(x, weight, bias)
        if not self.rowwise:
            return F.linear(x, weight.to_local(), None if bias is None else bias.to_local())
        out = _SumOverRanks.apply(F.linear(x, weight.to_local()), self.group)  # Megatron's g
        return out if bias is None else out + bias.to_local()


class _ReplicatedLinear(torch.nn.Linear):
    """A LoRA matrix kept whole on every tp rank (a Replicate DTensor, as AdamW's foreach and FSDP
    need). sum_grad: the input is whole but the output feeds this rank's features only, so each
    rank's weight gradient is a partial sum, left for sum_partial_grads to sum over the ranks once a
    step (Megatron's f, on the weight). Otherwise every rank computes the same gradient."""

    def __init__(self, linear: torch.nn.Linear, mesh, sum_grad: bool):
        from torch.distributed.tensor import Replicate

        super().__init__(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        self.sum_grad, self.group = sum_grad, mesh.get_group()
        self.weight = _distribute(linear.weight, mesh, Replicate())
        if linear.bias is not None:
            self.bias = _distribute(linear.bias, mesh, Replicate())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        weight, bias = self.weight, self.bias
        if not isinstance(weight, DTensor):  # gathered whole for the export
            return F.linear(x, weight, bias)
        return F.linear(x, weight.to_local(), None if bias is None else bias.to_local())


@torch.no_grad()
def sum_partial_grads(model) -> None:
    """Sum the column-parallel lora_A gradients (partial sums, see _ReplicatedLinear) over the tp ranks:
    once a step after the last backward (FSDP has reduced them over dp), in one flat all-reduce, not
    one per projection and micro-batch (5 a block: 160 small collectives a micro-batch on an 8B, each
    a point where the ranks wait for each other). A no-op without --tp --lora."""
    from torch.distributed.tensor import DTensor
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    mods = [m for m in model.modules() if isinstance(m, _ReplicatedLinear) and m.sum_grad and m.weight.grad is not None]
    if not mods:
        return
    grads = [m.weight.grad.to_local() if isinstance(m.weight.grad, DTensor) else m.weight.grad for m in mods]
    flat = _flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat, group=mods[0].group)
    for grad, summed in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(summed)


def _distribute(param: torch.nn.Parameter, mesh, placement) -> torch.nn.Parameter:
    from torch.distributed.tensor import distribute_tensor

    # from rank 0's values (src_data_rank=0), as ColwiseParallel / RowwiseParallel do
    return torch.nn.Parameter(distribute_tensor(param.detach(), mesh, [placement]), param.requires_grad)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    # the functional (out-of-place, traceable by torch.compile) collective DTensor itself uses (torch 2.13)
    out = torch.ops._c10d_functional.all_reduce(x.contiguous(), "sum", group.group_name)
    return torch.ops._c10d_functional.wait_tensor(out)


class _SumOverRanks(torch.autograd.Function):
    """Megatron's g: the row-parallel partial outputs summed over the tp ranks; the gradient is
    already whole on every rank."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _CopyToRanks(torch.autograd.Function):
    """Megatron's f: the input of the column-parallel projections is whole on every rank; its
    gradient (each rank's from its heads / features) is summed over the tp ranks, once for all
    the projections that read it."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


def _copy_input_hook(group):
    def hook(module, args, kwargs):
        if args:  # mlp(hidden_states)
            return (_CopyToRanks.apply(args[0], group), *args[1:]), kwargs
        if "hidden_states" in kwargs:  # self_attn(hidden_states=..., ...) (transformers 5)
            return args, kwargs | {"hidden_states": _CopyToRanks.apply(kwargs["hidden_states"], group)}
        raise UserError(f"--tp: {type(module).__name__} was called without hidden states to shard")

    return hook


def apply(model, cfg, run):
    """--tp N: the decoder's projections as column/row-parallel DTensors over the "tp" ranks (the
    heads and flags it needs are checked here, once the model's config is known)."""
    check_model(run.d.size("tp"), run.model_config, cfg.lora.lora_dropout, cfg.checkpointing.ac, cfg.compile.compile)
    # torch logs every 2-D gradient (FSDP x TP) that the norm or the final gather replicates in two
    # all-gathers as "suboptimal"; they are the small norm and the export's once-a-run gather
    optional.drop_records("torch.distributed.tensor._redistribute", "While redistributing")
    return apply_tensor_parallel(model, run.d)
