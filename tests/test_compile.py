"""--compile: per-block torch.compile gives the same loss and gradients as eager, with LoRA kernels,
checkpointing and packing, and names stay those of the uncompiled model (checkpoints, peft).

The CPU tests trace with aot_eager (the same dynamo graphs and autograd split that inductor gets,
without C++ code generation, which takes minutes on 2 cores); the GPU test runs inductor.
"""

import copy
import warnings

import pytest
import torch
from conftest import run_train

from features.activation_checkpointing import CheckpointingConfig, apply_checkpointing
from features.compile import CompileConfig, apply_compile, compile_loss
from features.lora import LoraConfig, apply_lora
from features.lora_kernels import apply_lora_kernels
from core.loss import IGNORE, cross_entropy_sum
from core.model import ModelConfig, load_config, load_model


def _model(tok, device="cpu", dtype="fp32"):
    torch.manual_seed(0)
    cfg = ModelConfig(precision=dtype)
    return load_model(cfg, load_config(cfg, tok), torch.device(device), "sdpa")


def _packed_batch(vocab, device="cpu"):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, 48), generator=g)
    pos = torch.cat([torch.arange(20), torch.arange(28)]).repeat(2, 1)  # two documents per row
    return ids.to(device), pos.to(device)


def _loss_and_grads(model, ids, pos):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, position_ids=pos).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close(a, b, tol):
    (la, ga), (lb, gb) = a, b
    assert torch.allclose(la, lb, rtol=tol, atol=tol), (la, lb)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        assert torch.allclose(ga[name], gb[name], rtol=tol, atol=tol), name


@pytest.mark.parametrize("variant", ["full", "lora_kernels_ac"])
def test_same_loss_and_grads_as_eager(tok, variant):
    ref = _model(tok)
    if variant == "lora_kernels_ac":
        ref = apply_lora_kernels(apply_lora(ref, LoraConfig(lora=True, lora_rank=8)))
        ref = apply_checkpointing(ref, CheckpointingConfig(ac="full"))
    compiled = apply_compile(copy.deepcopy(ref), CompileConfig(compile=True, compile_backend="aot_eager"))
    names = [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in compiled.named_parameters()] == names  # in place: checkpoints see the same names
    ids, pos = _packed_batch(ref.config.vocab_size)
    for _ in range(2):  # the second call reuses the compiled graph
        _assert_close(_loss_and_grads(ref, ids, pos), _loss_and_grads(compiled, ids, pos), 1e-5)


def test_one_graph_serves_every_block(tok):
    import torch._dynamo.utils as dynamo_utils

    torch._dynamo.reset()
    model = apply_compile(_model(tok), CompileConfig(compile=True, compile_backend="aot_eager"))
    ids, pos = _packed_batch(model.config.vocab_size)
    dynamo_utils.counters.clear()
    model(input_ids=ids, position_ids=pos)
    assert model.config.num_hidden_layers > 1
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1  # compiled once, reused by all blocks


def test_refuses_a_model_without_decoder_blocks():
    from core import UserError

    with pytest.raises(UserError, match="--compile"):
        apply_compile(torch.nn.Sequential(torch.nn.Linear(4, 4)), CompileConfig(compile=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inductor_bf16(tok):
    ref = apply_lora_kernels(apply_lora(_model(tok, "cuda", "bf16"), LoraConfig(lora=True, lora_rank=8)))
    compiled = apply_compile(copy.deepcopy(ref), CompileConfig(compile=True))
    ids, pos = _packed_batch(ref.config.vocab_size, "cuda")
    _assert_close(_loss_and_grads(ref, ids, pos), _loss_and_grads(compiled, ids, pos), 3e-2)


def test_flash_attention_is_opaque_to_dynamo():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from features.compile import _opaque_attention

    _opaque_attention("flash_attention_2")
    wrapped = ALL_ATTENTION_FUNCTIONS["flash_attention_2"]
    assert wrapped.nanotune_opaque
    _opaque_attention("flash_attention_2")  # idempotent: not wrapped twice
    assert ALL_ATTENTION_FUNCTIONS["flash_attention_2"] is wrapped
    _opaque_attention("sdpa")  # traceable backends stay as they are
    assert not getattr(ALL_ATTENTION_FUNCTIONS["sdpa"], "nanotune_opaque", False)


def _loss_grad_saved(ce, logits, targets):
    """The summed loss, the logits' gradient, and every tensor autograd keeps for backward."""
    saved = []
    logits = logits.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = ce(logits, None, targets)
    loss.backward()
    return loss.detach(), logits.grad, saved


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_loss_is_exact_and_keeps_only_the_logits(dtype):
    """--compile's loss (inductor, as on the GPU): eager's loss and logit gradients, while backward
    keeps the logits as they came plus a few floats per token, where eager keeps fp32 copies of
    tokens x vocabulary size (the upcast logits' log-probabilities)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 64, 1000, generator=g).to(dtype)
    targets = torch.randint(0, 1000, (2, 64), generator=g)
    targets[0, :5] = IGNORE
    loss, grad, saved = _loss_grad_saved(compile_loss(CompileConfig(compile=True)), logits, targets)
    ref_loss, ref_grad, ref_saved = _loss_grad_saved(cross_entropy_sum, logits, targets)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, ref_grad)  # bf16 gradients to bf16's tolerance, fp32 to fp32's

    def big_bytes(tensors):  # tensors of tokens x vocabulary elements or more
        return sum(t.numel() * t.element_size() for t in tensors if t.numel() >= logits.numel())

    assert big_bytes(saved) == logits.numel() * logits.element_size()  # the logits themselves, once
    assert sum(t.numel() for t in saved if t.numel() < logits.numel()) <= 4 * 128  # per-token values
    assert big_bytes(ref_saved) >= 2 * logits.numel() * 4  # eager: two fp32 tokens x vocabulary tensors


def test_compiled_loss_is_the_loss_it_is_given():
    """build_loss hands compile_loss the function it picked: a loss of your own is compiled, not replaced
    by cross_entropy_sum."""
    def z_loss_sum(logits, labels, targets):  # a forker's variant: cross entropy plus a z-loss term
        trained = (targets != IGNORE).flatten()
        z = torch.logsumexp(logits.float(), -1).flatten()[trained].square().sum()
        return cross_entropy_sum(logits, labels, targets) + 1e-3 * z

    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(2, 16, 50, generator=g), torch.randint(0, 50, (2, 16), generator=g)
    compiled = compile_loss(CompileConfig(compile=True, compile_backend="aot_eager"), z_loss_sum)
    torch.testing.assert_close(compiled(logits, None, targets), z_loss_sum(logits, None, targets))
    assert not torch.allclose(compiled(logits, None, targets), cross_entropy_sum(logits, None, targets))


def test_inductors_online_softmax_note_stays_out_of_the_log():
    """Inductor says this once per compiled loss on a GPU (torch 2.11, a 49,152-entry vocabulary); the
    text is the one it printed there. Other UserWarnings still show."""
    said = ("\nOnline softmax is disabled on the fly since Inductor decides to\nsplit the reduction. Cut an issue "
            "to PyTorch if this is an\nimportant use case and you want to speed it up with online\nsoftmax.\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compile_loss(CompileConfig(compile=True))
        warnings.warn(said, UserWarning)
        warnings.warn("another note", UserWarning)
    said_here = [str(w.message) for w in caught if w.filename == __file__]
    assert said_here == ["another note"]


def test_train_uses_the_compiled_loss_under_compile(tmp_path, small_data, monkeypatch):
    import train

    calls = []

    def counting(cfg, ce):
        assert ce is cross_entropy_sum  # --loss ce's function, handed over by build_loss
        compiled = compile_loss(cfg, ce)

        def ce(*args):
            calls.append(args[0].shape)
            return compiled(*args)
        return ce

    monkeypatch.setattr(train.compile, "compile_loss", counting)
    assert run_train(tmp_path / "run", "--dataset", str(small_data), "--max-steps", "2", "--compile",
                     "--compile-backend", "aot_eager", "--val-dataset", "none", "--skip-export") == 0
    assert len(calls) == 2  # one micro-batch per step, both through the compiled loss


def test_cuda_graph_mode_keeps_grads_and_evaluates_eagerly():
    from torch._dynamo.testing import CompileCounter

    from features import compile as compile_feature

    graphs = CompileConfig(compile=True, compile_mode="reduce-overhead")
    assert compile_feature.cudagraphs(graphs)
    assert not compile_feature.cudagraphs(CompileConfig(compile=True))
    assert not compile_feature.cudagraphs(CompileConfig(compile=True, compile_mode="reduce-overhead",
                                                        compile_backend="aot_eager"))  # no inductor, no graphs
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]
    assert compile_feature.keep_grads(params, CompileConfig(compile=True)) is True  # zero_grad sets them to None
    assert all(p.grad is None for p in params)
    assert compile_feature.keep_grads(params, graphs) is False  # allocated once, zeroed in place
    assert all(p.grad is not None and not p.grad.any() for p in params)

    torch._dynamo.reset()
    counter = CompileCounter()
    double = torch.compile(lambda x: x * 2, backend=counter)
    assert compile_feature.eager_during(lambda: double(torch.ones(2)), graphs)().tolist() == [2.0, 2.0]
    assert counter.frame_count == 0  # ran eagerly: evaluation records no graph
    assert compile_feature.eager_during(lambda: double(torch.ones(2)), CompileConfig(compile=True))() is not None
    assert counter.frame_count == 1


def test_cuda_graph_mode_in_the_training_loop(tmp_path, small_data, monkeypatch):
    """train.py's side of --compile-mode reduce-overhead, with the graphs themselves left out (they need
    CUDA): gradients allocated once and zeroed in place, micro-steps marked, evaluation run eagerly.
    Two steps of 2 accumulated micro-batches give the same losses and validation as the plain run."""
    import json

    from features import compile as compile_feature

    def run(name):
        assert run_train(tmp_path / name, "--dataset", str(small_data), "--max-steps", "2", "--micro-batch-size", "2",
                         "--grad-accum", "2", "--compile", "--compile-backend", "aot_eager", "--skip-export") == 0
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if "loss" in k or k == "grad_norm"} for line in lines]

    marks, zero_grads = [], []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    plain = run("plain")
    assert marks == []  # without graphs nothing is marked (the mark would import inductor's CUDA graph module)
    monkeypatch.setattr(compile_feature, "cudagraphs", lambda cfg: cfg.compile)
    real_zero_grad, real_stance, stances = torch.optim.Optimizer.zero_grad, torch.compiler.set_stance, []
    monkeypatch.setattr(torch.optim.Optimizer, "zero_grad", lambda self, set_to_none=True:
                        zero_grads.append(set_to_none) or real_zero_grad(self, set_to_none))
    monkeypatch.setattr(torch.compiler, "set_stance", lambda stance, **kw:
                        stances.append(stance) or real_stance(stance, **kw))
    assert run("graphs") == pytest.approx(plain)
    assert len(marks) == 4 and zero_grads == [False, False]  # each micro-step marked; grads kept
    assert stances == ["force_eager", "force_eager"]  # the evaluations before and after training


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_accumulate_the_same_grads(tok):
    """--compile-mode reduce-overhead on CUDA: three steps of two accumulated micro-batches (the graphs are
    recorded on the early ones, replayed after) give the plain compiled blocks' loss and gradients."""
    from features import compile as compile_feature

    torch._dynamo.reset()
    ref = apply_lora_kernels(apply_lora(_model(tok, "cuda", "bf16"), LoraConfig(lora=True, lora_rank=8)))
    ids, pos = _packed_batch(ref.config.vocab_size, "cuda")

    def last_step(cfg):
        model = apply_compile(copy.deepcopy(ref), cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        set_to_none = compile_feature.keep_grads(params, cfg)
        for _ in range(3):
            model.zero_grad(set_to_none=set_to_none)
            losses = []
            for row in range(2):
                compile_feature.step_begin(cfg)
                logits = model(input_ids=ids[row:row + 1], position_ids=pos[row:row + 1]).logits.float()
                loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[row, 1:])
                loss.backward()
                losses.append(loss.detach())
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return torch.stack(losses).sum(), grads

    graphs = last_step(CompileConfig(compile=True, compile_mode="reduce-overhead"))
    _assert_close(last_step(CompileConfig(compile=True)), graphs, 3e-2)
