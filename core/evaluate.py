"""Held-out evaluation: validation loss, and exact match of greedy answers.

    python train.py --eval-every 50 --eval-exact-match 64

Validation loss is token-weighted over the whole validation set (the same accounting as
training). Exact match greedily generates the response of the first N validation samples from
their prompt and counts those whose tokens equal the reference: the trained span of the last
response, its end-of-turn (or end-of-sequence) token included, so an answer that is right but
does not stop is wrong (see core/data.py for the span). Generation stops at the tokenizer's
eos and at the references' end-of-turn tokens. It is meaningful for tasks with one right answer,
like the embedded dataset; set --eval-exact-match 0 for open-ended data.
"""

import time

import torch

from core.attention import eval_attention
from core.batches import eval_batches, to_device
from core.chat import special_ids
from core.records import Sample
from core.distributed import Dist, all_reduce_sum, is_sharded, unwrap
from core.loss import real_logits, count_targets, forward_loss_sum


@torch.no_grad()
def validation_loss(model, samples: list[Sample], micro_batch_size: int, pad_id: int, d: Dist,
                    autocast, loss_fn=forward_loss_sum) -> float:
    net = unwrap(model)
    net.eval()
    total = torch.zeros(2, dtype=torch.float64, device=d.device)  # (loss sum, tokens)
    with eval_attention(net) as impl:
        if is_sharded(net):  # sharded (FSDP / TP) forwards are collective: equal batch counts per rank
            samples = samples[:len(samples) - len(samples) % d.dp_size]
        for batch in eval_batches(samples, micro_batch_size, pad_id, d.dp_rank, d.dp_size):
            batch = to_device(batch, d.device)
            with autocast:
                total[0] += loss_fn(net, batch, attn_impl=impl).double()
            total[1] += count_targets(batch["labels"])
    net.train()
    total = all_reduce_sum(total, d)
    return (total[0] / total[1].clamp(min=1)).item()


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def exact_match(model, samples: list[Sample], n: int, tokenizer, d: Dist, autocast,
                batch_size: int = 32) -> float | None:
    """Fraction of the first n prompted validation samples answered exactly; None if there are none."""
    chosen = [s for s in samples if 0 < s.prompt_len < len(s.input_ids)][:n]
    # generate() runs a data-dependent number of forwards; sharded (FSDP / TP) forwards are
    # collective, so with a mesh every rank answers the same prompts (identical greedy steps)
    sharded = is_sharded(model)
    chosen = chosen if sharded else chosen[d.dp_rank::d.dp_size]
    net, special = unwrap(model), special_ids(tokenizer)
    net.eval()
    hits = torch.zeros(2, dtype=torch.float64, device=d.device)  # (correct, total)
    for i in range(0, len(chosen), batch_size):
        group = chosen[i:i + batch_size]
        refs = [s.input_ids[s.prompt_len:s.response_end] for s in group]
        stop = sorted({tokenizer.eos_token_id} | {ref[-1] for ref in refs if ref[-1] in special})
        ids, mask = _left_pad([s.input_ids[:s.prompt_len] for s in group], tokenizer.pad_token_id, d.device)
        with autocast, eval_attention(net), real_logits(net), eager_blocks():
            out = net.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(map(len, refs)),
                               do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=stop)
        for row, ref in enumerate(refs):
            hits[0] += out[row, ids.shape[1]:ids.shape[1] + len(ref)].tolist() == ref
        hits[1] += len(group)
    net.train()
    hits = hits if sharded else all_reduce_sum(hits, d)
    return (hits[0] / hits[1]).item() if hits[1] > 0 else None


def eager_blocks():
    """Decoding runs --compile's blocks eagerly: the KV cache's per-layer state and the growing length
    would recompile the one graph all blocks share for each layer and step, until dynamo's recompile
    limit (a warning, and minutes of compiling for an evaluation that runs a few forwards)."""
    return torch.compiler.set_stance("force_eager")


def evaluate(model, val, cfg, tok, d: Dist, ctx, loss_fn, with_generation: bool) -> dict:
    """Validation loss (and, `with_generation`, exact match) of a run (`cfg`: train.Config); {} without a
    validation set."""
    if val is None:
        return {}
    start = time.perf_counter()
    result = {"val_loss": validation_loss(model, val.samples, cfg.train.micro_batch_size,
                                          tok.pad_token_id, d, ctx, loss_fn)}
    if with_generation and cfg.train.eval_exact_match > 0:
        em = exact_match(model, val.samples, cfg.train.eval_exact_match, tok, d, ctx)
        if em is not None:
            result["exact_match"] = em
    result["eval_s"] = time.perf_counter() - start  # the loss came back to the host: the GPU is done
    return result


def report(summary: dict) -> None:
    """The run's last lines: validation loss and exact match, before -> after."""
    before, after = summary.get("before", {}), summary
    if "val_loss" in before and "val_loss" in after:
        print(f"validation loss {before['val_loss']:.4f} -> {after['val_loss']:.4f}")
    if "exact_match" in before and "exact_match" in after:
        print(f"held-out exact match {100 * before['exact_match']:.1f}% -> {100 * after['exact_match']:.1f}%")
