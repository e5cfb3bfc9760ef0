"""Run by tests/test_sequence_parallel.py on P gloo ranks (CPU, tests/ranks.py): one sequence-parallel group.

For each tiny preset and mode, one forward/backward of a packed batch through the sharded loss
(features/sequence_parallel.make_loss_fn) against one process on the unsharded batch, computed
on every rank (fp64, so the tolerances can be tight). Rank 0 writes the comparisons to a JSON file;
the test asserts on them.
"""

import copy
import functools
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def packed_batch(swap: bool = False) -> dict:
    """Two rows of several documents (one longer than tiny-mistral's window of 16), prompts
    masked; widths 49 and 50 so sharding has to pad."""
    from core.data import Sample
    from core.packing import collate_packed

    g = torch.Generator().manual_seed(1)
    rows = []
    for lengths in ((7, 13, 24, 5), (30, 11, 9)):
        row = []
        for n in lengths:
            ids = torch.randint(3, 300, (n,), generator=g).tolist()
            row.append(Sample(ids, [-100] * (n // 4) + ids[n // 4:], n // 4))
        rows.append(row)
    return collate_packed(rows[::-1] if swap else rows, 0)


def single_document_batch() -> dict:
    """Two rows of one 48-token document each (no packing, no padding): plain causal attention."""
    from core.batches import collate_padded
    from core.data import Sample

    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(3, 300, (48,), generator=g).tolist() for _ in range(2)]
    return collate_padded([Sample(ids, [-100] * 8 + ids[8:], 8) for ids in docs], 0)


def new_model(preset: str):
    import transformers

    from core.model import PRESETS

    cls, fields = PRESETS[preset]
    config = getattr(transformers, cls)(**fields, vocab_size=300, use_cache=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return getattr(transformers, cls.replace("Config", "ForCausalLM"))(config).double()


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def compare(ref, preset_model, mode: str, inner: str, group, batch) -> dict:
    from core import UserError
    from features import sequence_parallel as sp
    from core.attention import eval_attention
    from core.loss import forward_loss_sum

    cfg = sp.SequenceParallelConfig(mode)
    model = copy.deepcopy(preset_model)
    try:
        model = sp.apply_sequence_parallel(model, cfg, group, inner)
    except UserError as e:
        return {"refused": str(e)}
    loss_fn = sp.make_loss_fn(functools.partial(forward_loss_sum, attn_impl=inner), cfg, group)
    loss = loss_fn(model, batch)
    loss.backward()
    g = grads(model)
    dist.all_reduce(g, group=group)  # what DDP/FSDP over the cp ranks adds up
    want_loss, want_g = ref
    # evaluation: unsharded, each rank its own batch (here: the rows swapped on odd ranks)
    mine = packed_batch(swap=dist.get_rank() % 2 == 1)
    with torch.no_grad(), eval_attention(model) as impl:
        eval_loss = loss_fn(model, mine, attn_impl=impl)
    with torch.no_grad():
        eval_want = forward_loss_sum(preset_model, mine)
    eval_ok = torch.tensor(float(abs(eval_loss - eval_want) / eval_want))
    dist.all_reduce(eval_ok, op=dist.ReduceOp.MAX, group=group)
    return {"loss": [loss.item(), want_loss], "grad_err": (g - want_g).abs().max().item(),
            "grad_max": want_g.abs().max().item(), "eval_rel_err": eval_ok.item()}


def ring_leak(group) -> dict:
    """Attention-level: queries of document 1 must not see document 0's keys/values."""
    from features.ring_attention import ring_attention, shard_index

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    seq, g = 8 * world, torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, seq, 8, generator=g, dtype=torch.float64) for _ in range(3))
    split = seq // 2 + 1  # document 0 = [0, split), document 1 = the rest: crosses shard edges
    docs = torch.cat([torch.zeros(split), torch.ones(seq - split)]).long()[None]
    index = [shard_index(seq, j, world, zigzag=True) for j in range(world)]
    mine = index[rank]
    doc1 = docs[0, mine] == 1

    def run(k_full, v_full, doc):
        return ring_attention(q[:, :, mine], k_full[:, :, mine], v_full[:, :, mine], group, index, doc, 8 ** -0.5)

    k2, v2 = k.clone(), v.clone()
    k2[:, :, :split] += 1.0  # change document 0 only
    v2[:, :, :split] -= 1.0
    out = {"moved_with_documents": (run(k2, v2, docs) - run(k, v, docs))[:, :, doc1].abs().max().item(),
           "moved_without_documents": (run(k2, v2, docs * 0) - run(k, v, docs * 0))[:, :, doc1].abs().max().item()}
    # and the values equal dense document-causal attention of the whole sequence
    idx = torch.arange(seq)
    visible = (docs[0][:, None] == docs[0][None]) & (idx[None] <= idx[:, None])
    dense = torch.softmax((q @ k.transpose(-1, -2) * 8 ** -0.5).masked_fill(~visible, float("-inf")), -1) @ v
    out["dense_err"] = (run(k, v, docs) - dense[:, :, mine]).abs().max().item()
    for key in out:
        t = torch.tensor(out[key])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        out[key] = t.item()
    return out


def run(out_path: str, cases: list[str]) -> None:
    """One rank (torchrun's environment variables set). cases: "preset/mode/backend[/single]" strings,
    e.g. "tiny-llama/ulysses/sdpa"; /single: rows of one document each instead of packed rows."""
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    try:
        from core.loss import forward_loss_sum

        group = dist.new_group(list(range(world)))
        results = {"ring_leak": ring_leak(group)}
        for preset, rows in dict.fromkeys((case.split("/")[0], case.count("/single")) for case in cases):
            batch = single_document_batch() if rows else packed_batch()
            model = new_model(preset)
            reference = copy.deepcopy(model)
            loss = forward_loss_sum(reference, batch)
            loss.backward()
            ref = (loss.item(), grads(reference))
            for case in cases:
                name, mode, inner = case.split("/")[:3]
                if (name, case.count("/single")) == (preset, rows):
                    results[case] = compare(ref, model, mode, inner, group, batch)
        if dist.get_rank() == 0:
            Path(out_path).write_text(json.dumps(results, indent=1))
    finally:
        dist.destroy_process_group()

