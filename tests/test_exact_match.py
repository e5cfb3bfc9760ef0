"""Exact match, read off one teacher-forced forward, against greedy decoding with generate().

The references are the model's own greedy answers, so decoding reproduces each one; a reference
with one token changed, or with a stop token before its end, is one decoding cannot write."""

import contextlib
from pathlib import Path

import pytest
import torch

from core.distributed import Dist
from core.evaluate import exact_match
from core.records import Sample


def greedy_references(model, prompts: list[list[int]], new_tokens: int, eos: int) -> list[list[int]]:
    """Each prompt's greedy answer by generate(), through its first eos (or `new_tokens` long)."""
    refs = []
    for prompt in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        answer = out[0, len(prompt):].tolist()
        refs.append(answer[:answer.index(eos) + 1] if eos in answer else answer)
    return refs


def samples_of(prompts, refs) -> list[Sample]:
    return [Sample(p + r, [-100] * len(p) + r, len(p)) for p, r in zip(prompts, refs)]


def changed(ref: list[int], vocab: int) -> list[int]:
    """The reference with its middle token replaced: decoding, having written the tokens before it,
    writes the model's own token there instead."""
    k = len(ref) // 2
    return [*ref[:k], (ref[k] + 1) % vocab, *ref[k + 1:]]


def score(model, samples, tok, micro_batch_size=3, d=None) -> float:
    return exact_match(model, samples, len(samples), tok, d or Dist(), contextlib.nullcontext(), micro_batch_size)


def tiny(tok):
    from core.model import ModelConfig, load_config, load_model

    torch.manual_seed(0)
    cfg = ModelConfig()
    return load_model(cfg, load_config(cfg, tok), torch.device("cpu"), "sdpa").eval()


def prompts_and_answers(model, tok):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, model.config.vocab_size, (n,), generator=g).tolist() for n in (4, 9, 6, 13, 7)]
    refs = greedy_references(model, prompts, 6, tok.eos_token_id)
    wrong = [changed(r, model.config.vocab_size) if i % 2 else r for i, r in enumerate(refs)]
    return prompts, refs, wrong


def test_own_greedy_answers_match_and_changed_ones_do_not(tok):
    """The tiny model, eager and with --compile's blocks, over micro-batches of unequal prompts."""
    from features.compile import CompileConfig, apply_compile

    model = tiny(tok)
    prompts, refs, wrong = prompts_and_answers(model, tok)
    assert score(model, samples_of(prompts, refs), tok) == 1.0
    assert score(model, samples_of(prompts, wrong), tok) == pytest.approx(3 / 5)
    compiled = apply_compile(model, CompileConfig(compile=True, compile_backend="aot_eager"))
    assert score(compiled, samples_of(prompts, wrong), tok) == pytest.approx(3 / 5)


def test_evaluation_batches_hold_a_training_micro_batchs_tokens(tok):
    """A packed run trains one 4096-token row a micro-batch; evaluation takes as many padded samples
    as fit in those tokens, and the validation loss and exact match do not depend on the batch."""
    from core.evaluate import eval_rows, validation_loss

    model = tiny(tok)
    prompts, refs, wrong = prompts_and_answers(model, tok)
    samples = samples_of(prompts, wrong)
    longest = max(len(s.input_ids) for s in samples)
    assert eval_rows(samples, 1, 4096) == 4096 // longest > len(samples)
    assert eval_rows(samples, 8, longest) == 8 and eval_rows([], 2, 64) == 2  # unpacked rows as trained
    rows = eval_rows(samples, 1, 4096)
    losses = [validation_loss(model, samples, n, tok.pad_token_id, Dist(), contextlib.nullcontext())
              for n in (1, rows)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert score(model, samples, tok, micro_batch_size=rows) == score(model, samples, tok, 1) == pytest.approx(3 / 5)


def sharded_worker(out: str) -> None:
    """One of 2 gloo ranks: the tiny model sharded by FSDP2 (every forward a collective), each rank
    scoring its share of the samples; rank 0 writes [right, wrong] scores."""
    import json

    from core.distributed import build_mesh, init_distributed, is_sharded
    from core.model import ModelConfig, load_tokenizer
    from features.fsdp import ShardingConfig, apply_sharding

    d0 = init_distributed("cpu", need_group=True)
    d = Dist(d0.rank, 0, d0.world_size, torch.device("cpu"), build_mesh("cpu", (1, d0.world_size, 1, 1)))
    tok = load_tokenizer(ModelConfig())
    prompts, refs, wrong = prompts_and_answers(tiny(tok), tok)
    model = apply_sharding(tiny(tok), ShardingConfig(fsdp=True), d, "fp32")
    assert is_sharded(model)
    scores = [score(model, samples_of(prompts, r), tok, micro_batch_size=1, d=d) for r in (refs, wrong)]
    if d.rank == 0:
        Path(out).write_text(json.dumps(scores))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_sharded_ranks_split_the_samples(tmp_path):
    """5 samples on 2 FSDP ranks: every one scored, 3 and 2 a rank (and an unscored copy on the rank
    short of one: equal forwards, as collectives need), as one process scores them."""
    import json

    import ranks

    ranks.run(sharded_worker, 2, str(tmp_path / "scores.json"))
    assert json.loads((tmp_path / "scores.json").read_text()) == [1.0, pytest.approx(3 / 5)]


class OwnCode(torch.nn.Module):
    """A model whose forward takes no logits_to_keep (remote code): full logits for every position."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()


def test_a_model_without_logits_to_keep(tok):
    model = tiny(tok)
    prompts = [[7, 8, 9], [10, 11, 12, 13, 14]]
    refs = greedy_references(model, prompts, 4, tok.eos_token_id)
    assert score(OwnCode(model), samples_of(prompts, refs), tok) == 1.0
    assert score(OwnCode(model), samples_of(prompts, [changed(refs[0], model.config.vocab_size), refs[1]]),
                 tok) == pytest.approx(1 / 2)


@pytest.mark.slow
def test_real_checkpoint_greedy_answers(smollm2):
    """SmolLM2's chat prompts and its own answers, ended by its end-of-turn token <|im_end|>."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    questions = ["What is 2 + 3?", "Name a primary color.", "Say hello in French.", "Spell cat backwards.",
                 "What is the capital of Italy?", "Reply with one word: yes or no."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       return_dict=True)["input_ids"] for q in questions]
    refs = greedy_references(model, prompts, 32, tok.eos_token_id)
    assert tok.eos_token == "<|im_end|>" and sum(r[-1] == tok.eos_token_id for r in refs) >= 3  # half stop
    assert score(model, samples_of(prompts, refs), tok) == 1.0
    wrong = [changed(r, len(tok)) if i < 2 else r for i, r in enumerate(refs)]
    assert score(model, samples_of(prompts, wrong), tok) == pytest.approx(4 / 6)
    # the model's own greedy tokens past its end of turn: decoding stops at <|im_end|>, so it never writes them
    stopped = next(i for i, r in enumerate(refs) if r[-1] == tok.eos_token_id)
    on = list(refs[stopped])
    for _ in range(2):
        with torch.no_grad():
            on.append(int(model(torch.tensor([prompts[stopped] + on])).logits[0, -1].argmax()))
    longer = [on if i == stopped else r for i, r in enumerate(refs)]
    assert score(model, samples_of(prompts, longer), tok) == pytest.approx(5 / 6)


def test_the_closing_lines_show_the_start_when_this_run_has_it(capsys):
    from core.evaluate import report

    report({"before": {"val_loss": 2.5, "exact_match": 0.0}, "val_loss": 0.25, "exact_match": 0.96})
    report({"before": None, "val_loss": 0.25, "exact_match": 0.96})  # resumed into another directory
    report({"before": {}})  # no validation set
    assert capsys.readouterr().out.splitlines() == [
        "validation loss 2.5000 -> 0.2500", "held-out exact match 0.0% -> 96.0%",
        "validation loss 0.2500", "held-out exact match 96.0%"]
