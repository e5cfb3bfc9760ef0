"""Held-out evaluation: validation loss, and exact match of greedy answers.

    python train.py --eval-every 50 --eval-exact-match 64

Validation loss is token-weighted over the whole validation set (the same accounting as
training). Exact match counts the first N prompted validation samples whose greedy answer equals
the reference: the trained span of the last response, its end-of-turn (or end-of-sequence) token
included, so an answer that is right but does not stop is wrong (see core/chat.py for the span).
Greedy generation would stop at the tokenizer's eos and at the references' end-of-turn tokens. It
is read off one forward per micro-batch (exact_match), so it costs about as much as the loss. It is
meaningful for tasks with one right answer, like the embedded dataset; on open-ended data it reads
near 0, so unset it is on only where the held-out answers are short (core/defaults.py).
"""

import inspect
import time

import torch

from core.attention import eval_attention, model_inputs
from core.batches import collate_padded, eval_batches, to_device
from core.chat import special_ids
from core.records import IGNORE, Sample
from core.distributed import Dist, all_reduce_sum, is_sharded, unwrap
from core.loss import count_targets, forward_loss_sum, real_logits


def padded_for_ranks(samples: list[Sample], ranks: int) -> list[Sample]:
    """Whole shares for `ranks` ranks: the ranks short of one sample get a copy with no target, which
    adds no loss and no token (every sample is scored, as in one process)."""
    filler = Sample(samples[0].input_ids, [IGNORE] * len(samples[0].input_ids), 0) if samples else None
    return samples + [filler] * (-len(samples) % ranks)


@torch.no_grad()
def validation_loss(model, samples: list[Sample], micro_batch_size: int, pad_id: int, d: Dist,
                    autocast, loss_fn=forward_loss_sum) -> float:
    net = unwrap(model)
    net.eval()
    total = torch.zeros(2, dtype=torch.float64, device=d.device)  # (loss sum, tokens)
    with eval_attention(net) as impl:
        if is_sharded(net):  # sharded (FSDP / TP / ZeRO-3) forwards are collective: equal batch counts per rank
            samples = padded_for_ranks(samples, d.dp_size)
        for batch in eval_batches(samples, micro_batch_size, pad_id, d.dp_rank, d.dp_size):
            batch = to_device(batch, d.device)
            with autocast:
                total[0] += loss_fn(net, batch, attn_impl=impl).double()
            total[1] += count_targets(batch["labels"])
    net.train()
    total = all_reduce_sum(total, d)
    return (total[0] / total[1].clamp(min=1)).item()


def _stop_ids(refs: list[list[int]], tokenizer) -> set[int]:
    """Where greedy generation would stop: the tokenizer's eos and the references' end-of-turn tokens."""
    special = special_ids(tokenizer)
    return {tokenizer.eos_token_id} | {ref[-1] for ref in refs if ref[-1] in special}


def _takes_logits_to_keep(net) -> bool:
    """transformers' causal LMs compute the head's logits for the last N positions only when asked
    (logits_to_keep=N); a model of its own code (--trust-remote-code) may not take the argument."""
    base = net.get_base_model() if hasattr(net, "get_base_model") else net
    return "logits_to_keep" in inspect.signature(base.forward).parameters


@torch.no_grad()
def exact_match(model, samples: list[Sample], n: int, tokenizer, d: Dist, autocast,
                micro_batch_size: int = 8) -> float | None:
    """Fraction of the first n prompted validation samples that greedy decoding answers exactly; None
    if there are none. Read off one teacher-forced forward, no decoding: greedy decoding writes the
    reference iff, at each of its positions, the logits' argmax given the prompt and the reference so
    far is the reference's token (by induction over the positions), and no stop token comes before
    its end. The same answer as generate(), up to rounding at a near-tie, at about the cost of the
    validation loss (benchmarks/results/2026-12-04-exact-match-h200.md: decoding took minutes)."""
    chosen = [s for s in samples if s.prompted][:n]
    net = unwrap(model)
    stop, keep_arg = _stop_ids([s.answer for s in chosen], tokenizer), _takes_logits_to_keep(net)
    mine = chosen[d.dp_rank::d.dp_size]
    scored = len(mine)
    if is_sharded(net):  # sharded forwards are collective: a rank short of one sample runs a copy, unscored
        mine += chosen[:1] * (-(-len(chosen) // d.dp_size) - scored)
    net.eval()
    hits = torch.zeros(2, dtype=torch.float64, device=d.device)  # (correct, total)
    with eval_attention(net) as impl, real_logits(net):
        for i in range(0, len(mine), micro_batch_size):
            group = mine[i:i + micro_batch_size]
            batch = to_device(collate_padded(group, tokenizer.pad_token_id), d.device)
            first = min(s.prompt_len for s in group) - 1  # the first position that predicts an answer token
            keep = batch["input_ids"].shape[1] - first
            with autocast:  # logits for the positions from `first` on only
                logits = net(**model_inputs(batch, impl), **({"logits_to_keep": keep} if keep_arg else {})).logits
            guesses = logits[:, -keep:].argmax(-1).tolist()
            for row, s in enumerate(group[:max(0, scored - i)]):
                ref, start = s.answer, s.prompt_len - 1 - first  # start: where row's answer is predicted
                hits[0] += guesses[row][start:start + len(ref)] == ref and not stop.intersection(ref[:-1])
                hits[1] += 1
    net.train()
    hits = all_reduce_sum(hits, d)
    return (hits[0] / hits[1]).item() if hits[1] > 0 else None


def eval_rows(samples: list[Sample], micro_batch_size: int, seq_len: int) -> int:
    """Samples in a padded evaluation batch: as many tokens as a training micro-batch of --seq-len rows.
    A packed row holds many short samples, so one sample a batch (a packed run's micro-batch of 1 row)
    would run a forward per sample: 100 held-out samples took 10 s where 8 a batch took 1.5 s
    (benchmarks/results/2026-12-06-packed-rows-h100.md)."""
    longest = max((len(s.input_ids) for s in samples), default=seq_len)
    return max(micro_batch_size, micro_batch_size * seq_len // longest)


def evaluate(model, val, cfg, tok, d: Dist, ctx, loss_fn) -> dict:
    """Validation loss and exact match of a run (`cfg`: train.Config); {} without a validation set."""
    if val is None:
        return {}
    start = time.perf_counter()
    rows = eval_rows(val.samples, cfg.train.micro_batch_size, cfg.data.seq_len)
    result = {"val_loss": validation_loss(model, val.samples, rows, tok.pad_token_id, d, ctx, loss_fn)}
    if cfg.train.eval_exact_match:  # unset (None) only without a validation set
        em = exact_match(model, val.samples, cfg.train.eval_exact_match, tok, d, ctx, rows)
        if em is not None:
            result["exact_match"] = em
    result["eval_s"] = time.perf_counter() - start  # the loss came back to the host: the GPU is done
    return result


def report(summary: dict) -> None:
    """The run's last lines: validation loss and exact match, before -> after (after alone when the
    step-0 values are not in this run directory's metrics: a --resume PATH into another one)."""
    before = summary.get("before") or {}
    for key, name, shown in (("val_loss", "validation loss", "{:.4f}"),
                             ("exact_match", "held-out exact match", "{:.1%}")):
        if key in summary:
            start = shown.format(before[key]) + " -> " if key in before else ""
            print(f"{name} {start}{shown.format(summary[key])}")
