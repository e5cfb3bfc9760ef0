"""--lora-kernels: the fused LoRA Functions against peft's own forward, on tiny random models.

Tolerances (max |fused - peft| / max |peft|, per tensor): fp64 1e-12, fp32 1e-5; a bf16 base with
fp32 adapters, bf16 autocast or a 4-bit base computing in bf16: 2e-2 (logits, loss) and 5e-2
(gradients, whose small entries round differently). lora_B is initialised randomly: peft's zero
init would make every lora_A gradient zero and the test blind to them.
"""

import copy

import pytest
import torch

from core import UserError
from features.lora_kernels import LoRALinear, LoRAMLP, apply_lora_kernels
from core.model import ModelConfig, load_config, load_model

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _model(tok, preset="tiny-llama", dtype=torch.float32, layers=2, quantize=None, device="cpu", **lora):
    import peft

    config = load_config(ModelConfig(path=preset), tok)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = load_model(ModelConfig(path=preset), config, torch.device(device)).to(dtype)
    if quantize is not None:
        _quantize_4bit(model, quantize, device)
    lora = dict(dict(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0), **lora)
    model = peft.get_peft_model(model, peft.LoraConfig(**lora))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def _quantize_4bit(model, compute_dtype, device):
    """Decoder linears -> bitsandbytes NF4 Linear4bit (what --qlora does to a preset)."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    for name, m in list(model.named_modules()):
        if type(m) is torch.nn.Linear and m is not head:
            new = bnb.nn.Linear4bit(m.in_features, m.out_features, m.bias is not None, compute_dtype,
                                    quant_type="nf4", device="meta")
            new.weight = bnb.nn.Params4bit(m.weight.data.cpu(), requires_grad=False, quant_type="nf4", module=new)
            if m.bias is not None:
                new.bias = torch.nn.Parameter(m.bias.data, requires_grad=False)
            new.support_avx512bf16_for_cpu = False  # the repacked inference kernel has no backward
            model.set_submodule(name, new.to(device))  # quantizes
    model.is_loaded_in_4bit = True  # peft dispatches its Linear4bit layer on this


def _step(model, ids, autocast=False):
    """logits, loss, the trainable gradients and the input-embedding gradient of one step."""
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(inputs_embeds=emb, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.float(), out.loss.float(), grads, emb.grad


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _assert_same(ref, fused, tol, grad_tol=None):
    (l0, loss0, g0, e0), (l1, loss1, g1, e1) = ref, fused
    assert _rel(l1, l0) <= tol and _rel(loss1, loss0) <= tol
    assert g1.keys() == g0.keys() and len(g0) > 0
    assert all(g0[k] is not None and g1[k] is not None for k in g0)
    worst = max((_rel(g1[k], g0[k]), k) for k in g0)
    assert worst[0] <= (grad_tol or tol), worst
    assert _rel(e1, e0) <= (grad_tol or tol)


def _compare(tok, tol, grad_tol=None, autocast=False, **kw):
    ref = _model(tok, **kw)
    fused = apply_lora_kernels(copy.deepcopy(ref))
    ids = torch.randint(0, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    ids = ids.to(kw.get("device", "cpu"))
    _assert_same(_step(ref, ids, autocast), _step(fused, ids, autocast), tol, grad_tol)
    return fused


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gemma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_logits_loss_and_grads_as_peft(tok, preset, dtype):
    fused = _compare(tok, TOL[dtype], preset=preset, dtype=dtype)
    kinds = {type(m).__name__ for m in fused.modules() if "forward" in vars(m)}
    assert kinds == {"Linear", preset[5:].capitalize() + "MLP"}  # q/k/v/o per projection, the MLP fused


def test_bf16_base_fp32_adapters(tok):
    fused = _compare(tok, TOL[torch.bfloat16], 5e-2, dtype=torch.bfloat16)
    assert {p.dtype for p in fused.parameters() if p.requires_grad} == {torch.float32}


def test_bf16_autocast(tok):
    _compare(tok, TOL[torch.bfloat16], 5e-2, autocast=True)


def test_only_attention_targets_use_per_projection_kernels(tok):
    fused = _compare(tok, TOL[torch.float32], target_modules=["q_proj", "v_proj"])
    assert {type(m).__name__ for m in fused.modules() if "forward" in vars(m)} == {"Linear"}


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])  # qwen2: a 4-bit base with a bias
def test_qlora_base_real_bitsandbytes(tok, preset):
    pytest.importorskip("bitsandbytes")
    fused = _compare(tok, TOL[torch.float32], preset=preset, quantize=torch.float32)
    # the dequantized weights are never saved for backward: nothing of a weight's shape is kept
    shapes = {tuple(p.quant_state.shape) for p in fused.parameters() if hasattr(p, "quant_state")}
    saved = _saved(lambda: fused(input_ids=torch.randint(0, 100, (2, 24))).logits, fused)[2]
    assert shapes and not shapes & saved


def test_compiled_qlora_saves_no_dequantized_weight(tok):
    """Under --compile, inductor's min-cut partitioner saves for backward the output of any custom op
    it cannot recompute, bitsandbytes' dequantize among them: a dense copy of every 4-bit weight held
    from forward to backward. The 4-bit matmuls are one opaque op (lora_kernels._base_plus), so only
    the packed weights are kept; the compiled step matches the eager kernels."""
    pytest.importorskip("bitsandbytes")
    import torch._dynamo
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    eager = apply_lora_kernels(_model(tok, layers=1, quantize=torch.float32))
    compiled = copy.deepcopy(eager)
    shapes = {tuple(p.quant_state.shape) for p in eager.parameters() if hasattr(p, "quant_state")}
    saved = []

    def forward_graph(gm, inputs):  # its outputs: the block's output, then what backward keeps
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        saved.extend(tuple(o.meta["val"].shape) for o in out if hasattr(o, "meta") and "val" in o.meta)
        return gm

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=forward_graph, bw_compiler=lambda gm, _: gm,
                           partition_fn=min_cut_rematerialization_partition)
    for layer in compiled.get_base_model().model.layers:
        layer.compile(backend=backend, fullgraph=True)
    ids = torch.randint(0, eager.config.vocab_size, (2, 24))
    _assert_same(_step(eager, ids), _step(compiled, ids), TOL[torch.float32])
    assert saved and shapes and not shapes & set(saved), (shapes, saved)
    torch._dynamo.reset()


def test_qlora_bf16_compute(tok):
    pytest.importorskip("bitsandbytes")
    _compare(tok, TOL[torch.bfloat16], 5e-2, quantize=torch.bfloat16)


def test_activation_checkpointing_and_disabled_adapter(tok):
    ref = _model(tok)
    fused = apply_lora_kernels(copy.deepcopy(ref))
    fused.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, ref.config.vocab_size, (2, 24))
    _assert_same(_step(ref, ids), _step(fused, ids), TOL[torch.float32])
    with torch.no_grad(), ref.disable_adapter(), fused.disable_adapter():  # peft's fallback path
        assert torch.equal(ref(input_ids=ids).logits, fused(input_ids=ids).logits)


def test_adapter_saves_like_peft(tok, tmp_path):
    from safetensors.torch import load_file

    ref = _model(tok)
    fused = apply_lora_kernels(copy.deepcopy(ref))
    ref.save_pretrained(tmp_path / "ref")
    fused.save_pretrained(tmp_path / "fused")
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ref", "fused"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_functions_pass_gradcheck():
    """The hand-written backward against finite differences (fp64), independent of peft."""
    f64 = dict(dtype=torch.float64)
    base = torch.nn.Linear(6, 5, **f64).requires_grad_(False)
    X, A, B = (torch.randn(*s, **f64, requires_grad=True) for s in ((2, 3, 6), (2, 6), (5, 2)))
    assert torch.autograd.gradcheck(lambda x, a, b: LoRALinear.apply(x, a, b, base, 0.7), (X, A, B))
    g, u, d = (torch.nn.Linear(i, o, bias=False, **f64).requires_grad_(False) for i, o in ((6, 7), (6, 7), (7, 6)))
    ws = [torch.randn(*s, **f64, requires_grad=True) for s in ((2, 6), (7, 2), (2, 6), (7, 2), (2, 7), (6, 2))]
    for act in ("SiLUActivation", "GELUTanh"):
        fn = lambda x, *w: LoRAMLP.apply(x, *w, (g, u, d), (0.5, 2.0, 1.5), act)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (X, *ws))


def _saved(fn, model):
    """(bytes, count, shapes) of the distinct non-parameter storages autograd saves while fn runs."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages, shapes = {}, set()

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            storages[st.data_ptr()] = st.nbytes()
            shapes.add(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()  # kept alive below, so no storage is freed and its address reused
    total = sum(storages.values())
    del out
    return total, len(storages), shapes


def _layer0(model):
    return model.get_base_model().model.layers[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_mlp_saves_less_than_peft(tok, dtype):
    ref = _model(tok, dtype=dtype, layers=1)
    fused = apply_lora_kernels(copy.deepcopy(ref))
    x = torch.randn(2, 64, ref.config.hidden_size, dtype=dtype, requires_grad=True)
    peft_bytes, _, _ = _saved(lambda: _layer0(ref).mlp(x), ref)
    fused_bytes, _, _ = _saved(lambda: _layer0(fused).mlp(x), fused)
    # fused: X, gate, up + three (tokens, r) products; peft also keeps silu(gate) and h (and, with
    # fp32 adapters on a bf16 base, fp32 copies of X and h)
    tokens, hidden, inter, r = 2 * 64, ref.config.hidden_size, ref.config.intermediate_size, 8
    assert fused_bytes == x.element_size() * (tokens * (hidden + 2 * inter) + tokens * r * 3)  # all in x's dtype
    assert peft_bytes >= fused_bytes + x.element_size() * tokens * 2 * inter


def test_attention_projections_save_x_once(tok):
    ref = _model(tok, dtype=torch.bfloat16, layers=1)
    fused = apply_lora_kernels(copy.deepcopy(ref))
    x = torch.randn(2, 64, ref.config.hidden_size, dtype=torch.bfloat16, requires_grad=True)

    def qkv(model):
        attn = _layer0(model).self_attn
        return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)

    peft_bytes, fused_bytes = _saved(lambda: qkv(ref), ref)[0], _saved(lambda: qkv(fused), fused)[0]
    assert fused_bytes == x.numel() * 2 + 3 * (2 * 64) * 8 * 2  # X once + 3 (tokens, r), all bf16
    assert peft_bytes > fused_bytes  # peft keeps an fp32 copy of X per projection


@pytest.mark.parametrize("lora, match", [(dict(lora_dropout=0.1), "--lora-dropout"),
                                         (dict(use_dora=True), "--dora")])
def test_refuses_dropout_and_dora(tok, lora, match):
    with pytest.raises(UserError, match=match) as e:
        apply_lora_kernels(_model(tok, layers=1, **lora))
    assert "--lora-kernels" in str(e.value) and "\n" not in str(e.value)


def test_refuses_an_8bit_base(tok):
    bnb = pytest.importorskip("bitsandbytes")
    model = _model(tok, layers=1)
    layer = _layer0(model).mlp.down_proj
    w = layer.base_layer.weight.data
    base = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], False, has_fp16_weights=False, device="meta")
    base.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    layer.base_layer = base.to("cpu")  # quantizes to int8
    assert layer.base_layer.weight.dtype == torch.int8
    with pytest.raises(UserError, match="--lora-8bit"):
        apply_lora_kernels(model)


def test_validate_refuses_before_loading():
    import train  # the adapter modes and --dora: core/compat.py's matrix; --lora-dropout: lora_kernels.validate
    from conftest import config
    from features.lora import LoraConfig
    from features.lora_kernels import LoraKernelsConfig, validate

    on = LoraKernelsConfig(lora_kernels=True)
    train.validate(config(lora_kernels=on, lora=LoraConfig(lora=True)))
    validate(config(lora=LoraConfig(lora_dropout=0.1)))  # kernels off: nothing to check
    for lora, match in ((LoraConfig(), "--lora-kernels needs --lora or --qlora"),
                        (LoraConfig(lora_8bit=True), "use --lora or --qlora"),
                        (LoraConfig(qlora=True, lora_dropout=0.05), "--lora-dropout 0"),
                        (LoraConfig(lora=True, dora=True), "--dora")):
        with pytest.raises(UserError, match=match):
            train.validate(config(lora_kernels=on, lora=lora))


def test_compiles_per_block_without_graph_breaks(tok):
    ref = _model(tok)
    fused = apply_lora_kernels(copy.deepcopy(ref))
    for layer in fused.get_base_model().model.layers:  # --compile's per-block order: after the kernels
        layer.compile(backend="aot_eager", fullgraph=True)
    ids = torch.randint(0, ref.config.vocab_size, (2, 24))
    _assert_same(_step(ref, ids), _step(fused, ids), TOL[torch.float32])


@pytest.mark.slow
def test_compiled_blocks_copy_no_lora_outputs(monkeypatch):
    """Under --compile, no LoRA linear copies its (tokens, out) output (the addmm_ that adds the
    low-rank product would become an out-of-place addmm: a Memcpy DtoD on CUDA, 14 per block on the
    8B shape), and the step is bit-identical to the kernels as they were (addmm_ traced).
    benchmarks/count_copies.py counts them; what stays is transformers' (RoPE's cat, a clone in
    the backward of q_proj's view)."""
    import torch._dynamo

    from benchmarks import count_copies as cc
    from features import lora_kernels

    def run(layers=2):
        torch._dynamo.reset()
        model, b = cc.build(layers), cc.batch(1024)
        eager = cc.step(model, b)
        copies = cc.compiled_copies(model, b)
        return eager, cc.step(model, b), copies

    eager, compiled, copies = run()
    assert not [k for k in copies if k[0] == "addmm input copy" or k[1].startswith("features/")], copies
    assert sum(copies.values()) <= 2 * 2, copies  # 2 blocks: RoPE's cat of q, the clone of q's gradient
    monkeypatch.setattr(lora_kernels, "_linear_plus", lora_kernels._linear_plus_eager)  # before the fix
    eager_before, compiled_before, copies_before = run()
    assert sum(n for k, n in copies_before.items() if k[0] == "addmm input copy") == 5 + 7 + 5 + 4, copies_before
    for a, b in ((eager, eager_before), (compiled, compiled_before)):
        assert torch.equal(a[0], b[0]) and a[1].keys() == b[1].keys()
        assert all(torch.equal(a[1][n], b[1][n]) for n in a[1])
    torch._dynamo.reset()


def test_refuses_a_plain_model_and_an_ungated_activation(tok):
    import peft

    with pytest.raises(UserError, match="--lora"):
        apply_lora_kernels(_model(tok, layers=1).get_base_model())
    config = load_config(ModelConfig(path="tiny-llama"), tok)
    config.hidden_act, config.num_hidden_layers = "relu", 1
    model = peft.get_peft_model(load_model(ModelConfig(), config, torch.device("cpu")),
                                peft.LoraConfig(r=4, target_modules="all-linear"))
    with pytest.raises(UserError, match="silu or gelu_pytorch_tanh"):
        apply_lora_kernels(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kw", [dict(dtype=torch.bfloat16), dict(autocast=True),
                                dict(dtype=torch.bfloat16, quantize=torch.bfloat16)],
                         ids=["bf16", "autocast", "qlora"])
def test_cuda_bf16_autocast_and_qlora(tok, kw):
    if "quantize" in kw:
        pytest.importorskip("bitsandbytes")
    _compare(tok, TOL[torch.bfloat16], 5e-2, device="cuda", **kw)


def test_compiled_mlp_saves_gate_and_up_only():
    """Under --compile the fused MLP keeps two (tokens, intermediate) tensors from forward to
    backward, gate and up; act(gate) * up is recomputed. inductor's min-cut partitioner decides what
    is saved; it would keep the product too if the backward's recompute were the forward's node."""
    import torch._dynamo
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    from benchmarks import count_copies as cc

    forwards = []

    def keep(gm, _):
        forwards.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    model, b = cc.build(1, hidden=256, intermediate=896), cc.batch(1024)
    cc.compile_blocks(model, aot_autograd(fw_compiler=keep, bw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                                          partition_fn=min_cut_rematerialization_partition))
    cc.step(model, b)
    torch._dynamo.reset()
    tokens = b["input_ids"].numel()
    saved = [v.meta["val"] for gm in forwards for v in next(n for n in gm.graph.nodes if n.op == "output").args[0]
             if v.op != "placeholder" and getattr(v.meta.get("val"), "shape", None) == (tokens, 896)]
    assert len(saved) == 2, [t.shape for t in saved]
