"""Run by tests/test_distributed.py on several gloo ranks (CPU): for each parallel layout, one
training step's loss and full gradients, computed with train.py's accounting, against one
process on the same global batch (computed on every rank, on an unsharded copy).

    torchrun --nproc_per_node 4 tests/dist_worker.py OUT.json LAYOUT [LAYOUT ...]
    ranks.run(dist_worker.run, 4, OUT.json, [LAYOUT, ...])     # the tests: tests/ranks.py

A layout is name:dp_replicate,dp_shard,cp,tp[:fsdp][:gathered][:tiled] (gathered: --fsdp-keep-gathered;
tiled: --tiled-mlp with 3 tiles on the sharded model only; the reference stays untiled), or
name:zero1|zero2|zero3[:overlap] (DeepSpeed; overlap: --ds-overlap-comm). Rank 0 writes
{layout: {"loss": [got, want], "grad_max_abs_err": e, "grad_max_abs": m, "norm": [got, want],
"all_gathers": FSDP all-gathers in the step, "units": FSDP units}} to OUT.json.
"""

import json
import random
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from core import attention  # noqa: E402
from core.attention import AttentionConfig  # noqa: E402
from core.batches import StepBatches  # noqa: E402
from core.data import Sample  # noqa: E402
from core.distributed import Dist, build_mesh, global_count, init_distributed, sync_gradients  # noqa: E402
from core.optim import clip_grad_norm  # noqa: E402
from features.fsdp import ShardingConfig, apply_sharding  # noqa: E402
from core.loss import count_targets, forward_loss_sum  # noqa: E402
from core.model import ModelConfig, load_config, load_model, load_tokenizer  # noqa: E402
from features.tensor_parallel import apply_tensor_parallel  # noqa: E402
from features.tiled_mlp import TiledMLPConfig, apply_tiled_mlp  # noqa: E402

MBS, ACCUM, SEQ = 2, 2, 48


def samples(n: int, vocab: int) -> list[Sample]:
    rng = random.Random(0)
    out = []
    for _ in range(n):  # varied lengths and prompt masks, several documents per packed row
        ids = [rng.randrange(3, vocab) for _ in range(rng.randrange(6, 30))]
        prompt = rng.randrange(1, len(ids) - 1)
        out.append(Sample(ids, [-100] * prompt + ids[prompt:], prompt))
    return out


def new_model(config, impl):
    torch.manual_seed(0)
    return load_model(ModelConfig(precision="fp32"), config, torch.device("cpu"), impl)


def step(model, micro, d: Dist, impl) -> float:
    """train.py's step body: loss sum scaled by grad_ranks / global trained tokens."""
    n = global_count(sum(count_targets(mb["labels"]) for mb in micro), d)
    total = torch.zeros((), dtype=torch.float64)
    for i, mb in enumerate(micro):
        with sync_gradients(model, sync=i == len(micro) - 1):
            loss_sum = forward_loss_sum(model, mb, impl)
        (loss_sum * (d.grad_ranks / n)).backward()
        total += loss_sum.detach().double()
    if d.dp_size > 1:
        dist.all_reduce(total, group=d.sub("dp").get_group())
    return (total / n).item()


def full_grads(model) -> dict:
    from torch.distributed.tensor import DTensor

    return {n.replace("module.", ""): (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
            for n, p in model.named_parameters()}


def run_layout(layout: str, data, config, impl, rank: int, world: int) -> dict:
    name, dims, *flags = layout.split(":")
    shape = tuple(int(x) for x in dims.split(","))
    d = Dist(rank, 0, world, torch.device("cpu"), build_mesh("cpu", shape))
    ref_batches = StepBatches(data, MBS, ACCUM * d.dp_size, 0, 0, pack_to=SEQ)
    ref_d = Dist()
    ref = new_model(config, impl)
    want_loss = step(ref, next(iter(ref_batches)), ref_d, impl)
    want_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf")).item()
    want = full_grads(ref)

    model = new_model(config, impl)
    if "tiled" in flags:  # before sharding, as in train.py's order
        model = apply_tiled_mlp(model, TiledMLPConfig(tiled_mlp=True, tiled_mlp_shards=3))
    if d.size("tp") > 1:
        model = apply_tensor_parallel(model, d)
    model = apply_sharding(model, ShardingConfig(fsdp="fsdp" in flags, fsdp_keep_gathered="gathered" in flags),
                           d, "fp32")
    batches = StepBatches(data, MBS, ACCUM, 0, 0, d.dp_rank, d.dp_size, pack_to=SEQ)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got_loss = step(model, next(iter(batches)), d, impl)
    gathers = sum(e.name == "FSDP::all_gather" or e.name.startswith("FSDP::all_gather (") for e in prof.events())
    got_norm = clip_grad_norm(list(model.parameters()), 0.0).item()
    got = full_grads(model)
    torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True).step()  # the optimizer takes these params
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    err = max((got[k] - want[k]).abs().max().item() for k in want)
    return {name: {"loss": [got_loss, want_loss], "norm": [got_norm, want_norm], "grad_max_abs_err": err,
                   "grad_max_abs": max(g.abs().max().item() for g in want.values()), "all_gathers": gathers,
                   "units": sum(isinstance(m, FSDPModule) for m in model.modules())}}


def run_deepspeed(layout: str, data, config, impl, rank: int, world: int) -> dict:
    """ZeRO stage N: compared through one SGD step (lr 1), whose update is minus the gradient."""
    from features.deepspeed_zero import DeepSpeedConfig, apply_deepspeed, build_config, step as ds_step

    name, stage, *opts = layout.split(":")
    d = Dist(rank, 0, world, torch.device("cpu"), build_mesh("cpu", (1, world, 1, 1)))
    ref = new_model(config, impl)
    want_loss = step(ref, next(iter(StepBatches(data, MBS, ACCUM * d.dp_size, 0, 0, pack_to=SEQ))), Dist(), impl)
    want_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf")).item()
    want = full_grads(ref)

    model = new_model(config, impl)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ds_config = build_config(DeepSpeedConfig(stage, ds_overlap_comm="overlap" in opts), MBS, ACCUM, 0.0, "fp32",
                             d.dp_size)
    ds_config["zero_allow_untested_optimizer"] = True  # SGD: train.py uses AdamW, which DeepSpeed tests
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition all, as an 8B's
    engine, _ = apply_deepspeed(model, torch.optim.SGD(model.parameters(), lr=1.0), ds_config)
    batches = StepBatches(data, MBS, ACCUM, 0, 0, d.dp_rank, d.dp_size, pack_to=SEQ)
    got_loss = step(engine, next(iter(batches)), d, impl)
    got_norm = ds_step(engine).item()
    params = dict(engine.module.named_parameters())
    if stage == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            got = {n: before[n] - p.detach().clone() for n, p in params.items()}
    else:
        got = {n: before[n] - p.detach() for n, p in params.items()}
    err = max((got[k] - want[k]).abs().max().item() for k in want)
    return {name: {"loss": [got_loss, want_loss], "norm": [got_norm, want_norm], "grad_max_abs_err": err,
                   "grad_max_abs": max(g.abs().max().item() for g in want.values())}}


def run(out: str, layouts: list[str]) -> None:
    """One rank (torchrun's environment variables set): every layout, rank 0 writes OUT."""
    torch.set_num_threads(1)
    d0 = init_distributed("cpu")
    tok = load_tokenizer(ModelConfig(path="tiny-llama"))
    config = load_config(ModelConfig(path="tiny-llama"), tok)
    impl = attention.resolve(AttentionConfig(), torch.device("cpu"), config)
    data = samples(160, config.vocab_size)
    results = {}
    for layout in layouts:
        run = run_deepspeed if layout.split(":")[1].startswith("zero") else run_layout
        results.update(run(layout, data, config, impl, d0.rank, d0.world_size))
    if d0.rank == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2:])
