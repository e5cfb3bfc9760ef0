"""Every attention backend keeps packed documents apart: a packed batch gives the same loss and
gradients as the same documents unpacked, and changing one document never moves another's logits."""

import itertools

import pytest
import torch

from conftest import run_train
from core.attention import model_inputs
from core.batches import collate_padded
from core.data import Sample
from core.loss import forward_loss_sum
from core.model import ModelConfig, load_config, load_model
from core.packing import collate_packed

PRESETS = ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gemma"]  # MHA, GQA, sliding window, Gemma
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _docs(vocab=400, lengths=(7, 19, 33, 5, 26), seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        ids = torch.randint(4, vocab, (n,), generator=g).tolist()
        docs.append(Sample(ids, [-100] * (n // 3) + ids[n // 3:], n // 3))
    return docs


def _model(preset, impl, tok, device="cpu", dtype=None):
    torch.manual_seed(0)
    model = load_model(ModelConfig(preset, precision="fp32"), load_config(ModelConfig(preset), tok),
                       torch.device(device), impl)
    return model.to(dtype) if dtype else model


def _loss_and_grads(model, batch, impl):
    model.zero_grad()
    loss = forward_loss_sum(model, batch, impl)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("preset", PRESETS)
def test_packed_equals_unpacked_loss_and_gradients(tok, preset, impl):
    docs = _docs()
    model = _model(preset, impl, tok)
    packed = collate_packed([docs[:3], docs[3:]], tok.pad_token_id)  # rows of 59 and 31 tokens
    unpacked = collate_padded(docs, tok.pad_token_id)
    loss_p, grads_p = _loss_and_grads(model, packed, impl)
    loss_u, grads_u = _loss_and_grads(model, unpacked, impl)
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=1e-5)
    for name in grads_u:  # atol: a tied embedding's gradient sums over every position, in another order when packed
        torch.testing.assert_close(grads_p[name], grads_u[name], rtol=1e-4, atol=1e-5, msg=name)


def _doc_b_logits(model, impl, first_doc, docs):
    batch = collate_packed([[first_doc, docs[1]]], 0)
    with torch.no_grad():
        logits = model(**model_inputs(batch, impl)).logits
    return logits[0, len(first_doc.input_ids):]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_no_attention_crosses_a_document(tok, impl):
    docs = _docs()
    model = _model("tiny-llama", impl, tok)
    changed = Sample([t + 1 for t in docs[0].input_ids], docs[0].labels, 0)
    torch.testing.assert_close(_doc_b_logits(model, impl, docs[0], docs),
                               _doc_b_logits(model, impl, changed, docs), rtol=0, atol=1e-6)
    # the check can fail: with one causal sequence (positions not restarted) document B sees A
    def plain(first):
        return model(input_ids=collate_packed([[first, docs[1]]], 0)["input_ids"]).logits[0, 7:]

    with torch.no_grad():
        assert not torch.allclose(plain(docs[0]), plain(changed), atol=1e-3)


@pytest.mark.slow
def test_flex_forward_matches_unpacked_on_cpu(tok):
    """FlexAttention has no CPU backward (torch 2.13): forward here, gradients in the GPU test."""
    docs = _docs()
    model = _model("tiny-mistral", "flex_attention", tok)
    with torch.no_grad():
        packed = forward_loss_sum(model, collate_packed([docs[:3], docs[3:]], 0), "flex_attention")
        unpacked = forward_loss_sum(model, collate_padded(docs, 0), "sdpa")
    torch.testing.assert_close(packed, unpacked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn, message", [("flash", "--attn flash needs a CUDA GPU"),
                                           ("xformers", "--attn xformers needs a CUDA GPU"),
                                           ("flex", "--attn flex: FlexAttention has no backward pass on CPU")])
def test_backends_that_cannot_run_on_cpu_are_refused(tmp_path, capsys, attn, message):
    if torch.cuda.is_available():
        pytest.skip("CPU-only refusal")
    assert run_train(tmp_path, "--attn", attn, "--max-steps", "1") == 2
    assert message in capsys.readouterr().err


def test_packed_training_step_equals_unpacked(tmp_path, small_data):
    """One global step over the same 8 samples: padded micro-batch of 8 vs one packed row."""
    lines = small_data.read_text().splitlines()[:8]
    data = tmp_path / "eight.jsonl"
    data.write_text("\n".join(lines) + "\n")
    common = ["--dataset", str(data), "--val-dataset", "none", "--max-steps", "1", "--seq-len", "512"]
    assert run_train(tmp_path / "padded", *common, "--micro-batch-size", "8") == 0
    assert run_train(tmp_path / "packed", *common, "--micro-batch-size", "1", "--packing") == 0
    from conftest import read_metrics

    a, b = read_metrics(tmp_path / "padded")[-1], read_metrics(tmp_path / "packed")[-1]
    assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * a["grad_norm"]
    assert a["tokens"] == b["tokens"]


@pytest.mark.parametrize("impl", ["flash_attention_4", "flash_attention_2", "nanotune_varlen"])
def test_varlen_kernels_are_told_of_no_longest_document_under_the_floor(impl):
    """A row of only short documents gets the floor as its bound (so FlashAttention-4 keeps one kernel),
    never more than the tokens there are; a longer document keeps its own length."""
    from core.attention import LONGEST_FLOOR

    short = collate_packed([_docs(lengths=(40, 17, 63) * 10)], 0)
    assert short["max_seqlen"] == 63 and model_inputs(short, impl)["max_length_q"] == LONGEST_FLOOR
    tiny = collate_packed([_docs(lengths=(7, 19))], 0)
    assert model_inputs(tiny, impl)["max_length_k"] == 26
    long = collate_packed([_docs(lengths=(700, 40))], 0)
    assert model_inputs(long, impl)["max_length_q"] == 700
    assert model_inputs(short, "sdpa").keys() == {"input_ids", "position_ids"}


@pytest.mark.parametrize("pack_to", [None, 100])
def test_flex_rows_are_whole_blocks(tok, pack_to):
    """Under --attn flex every training row is padded to a multiple of 128 tokens (compiled flex finds no
    kernel for some shorter rows); the tokens and targets are those of the unwidened rows."""
    from core.attention import AttentionConfig, row_multiple
    from core.batches import StepBatches
    from core.loss import count_targets

    docs = _docs(lengths=(40, 17, 63, 9, 30, 51))
    plain, flex = (StepBatches(docs, 2, 1, 0, 0, pack_to=pack_to, row_multiple=row_multiple(AttentionConfig(a)))
                   for a in ("sdpa", "flex"))
    for (p,), (f,) in zip(itertools.islice(plain, 3), itertools.islice(flex, 3)):
        assert f["input_ids"].shape[1] == 128 and p["input_ids"].shape[1] < 128
        width = p["input_ids"].shape[1]
        for key in ("input_ids", "labels", "position_ids") + (("attention_mask",) if pack_to is None else ()):
            assert torch.equal(f[key][:, :width], p[key]), key
        assert count_targets(f["labels"]) == count_targets(p["labels"]) and f["num_tokens"] == p["num_tokens"]
    assert flex.efficiency() < plain.efficiency()


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [(300, 1200, 77, 900, 611, 1000), (40, 17, 63, 9, 30, 51)],
                         ids=["long", "short"])  # short: every document under LONGEST_FLOOR, rows under 128
@pytest.mark.parametrize("attn", ["flash", "flex", "sdpa"])
def test_gpu_packed_equals_unpacked_bf16(tok, attn, lengths):
    """bf16 on a small Llama shape: packed (backend under test, rows as wide as training makes them)
    vs unpacked (sdpa), loss and grads."""
    from core.attention import AttentionConfig, resolve, row_multiple

    impl = resolve(AttentionConfig(attn), torch.device("cuda"))
    docs = _docs(lengths=lengths)
    multiple, longest = row_multiple(AttentionConfig(attn)), max(sum(lengths[:3]), sum(lengths[3:]))
    ref = _model("tiny-qwen2", "sdpa", tok, "cuda", torch.bfloat16)
    model = _model("tiny-qwen2", impl, tok, "cuda", torch.bfloat16)

    def to(b):
        return {k: v.cuda() if torch.is_tensor(v) else v for k, v in b.items()}

    packed = collate_packed([docs[:3], docs[3:]], 0, -(-longest // multiple) * multiple)
    loss_p, grads_p = _loss_and_grads(model, to(packed), impl)
    loss_u, grads_u = _loss_and_grads(ref, to(collate_padded(docs, 0)), "sdpa")
    torch.testing.assert_close(loss_p.float(), loss_u.float(), rtol=1e-2, atol=0)
    for name in grads_u:  # bf16 kernels differ in summation order: compare relative to the norm
        diff = (grads_p[name].float() - grads_u[name].float()).norm() / grads_u[name].float().norm()
        assert diff < 2e-2, (name, diff.item())


def test_auto_picks_sdpa_on_cpu_and_eager_for_soft_capped_logits():
    import types

    from core.attention import AttentionConfig, resolve

    cpu = torch.device("cpu")
    assert AttentionConfig().attn == "auto"
    assert resolve(AttentionConfig(), cpu, types.SimpleNamespace()) == "sdpa"
    assert resolve(AttentionConfig(), cpu, types.SimpleNamespace(attn_logit_softcapping=50.0)) == "eager"
