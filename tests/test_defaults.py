"""core/defaults.py: unset values follow the model, the method and the machine; set values win."""

import json
import types

import pytest
import torch
import tyro

import train
from core import UserError, defaults


def _parsed(argv: list[str]) -> train.Config:
    """Parsed and validated, nothing chosen yet (what parse_config hands to defaults.resolve_flags)."""
    cfg = tyro.cli(train.Config, args=argv, config=train.CLI)
    train.alst.expand(cfg)
    train.validate(cfg)
    return cfg


def _resolved(argv: list[str], cuda: bool) -> train.Config:
    cfg = _parsed(argv)
    defaults.resolve_flags(cfg, cuda=cuda)
    return cfg


def test_the_demo_keeps_its_settings():
    cfg = train.parse_config([])
    assert (cfg.optim.lr, cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.epochs) == (2e-3, 32, 1, 1.6)
    cfg = train.parse_config(["--lora"])  # a tiny preset is the demo, whatever the method
    assert cfg.optim.lr == 2e-3


@pytest.mark.parametrize("method, lr", [([], 2e-5), (["--lora"], 2e-4), (["--qlora"], 2e-4), (["--lora-8bit"], 2e-4)])
def test_a_real_model_gets_the_peers_recipe(method, lr):
    cfg = _resolved(["--model", "llama3-8b", *method], cuda=False)
    assert (cfg.optim.lr, cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.epochs) == (lr, 2, 4, 3.0)
    assert f"--lr {lr:.0e}".replace("e-0", "e-") in cfg.auto[0] and "(auto: " in cfg.auto[0]


def test_values_set_by_hand_win():
    cfg = _resolved(["--model", "llama3-8b", "--lora", "--lr", "1e-4", "--micro-batch-size", "8",
                     "--grad-accum", "1", "--no-compile"], cuda=True)
    assert (cfg.optim.lr, cfg.train.micro_batch_size, cfg.train.grad_accum) == (1e-4, 8, 1)
    assert not cfg.compile.compile
    assert not any(line.startswith(("--lr", "--micro-batch-size", "--grad-accum", "--compile")) for line in cfg.auto)


def test_gpu_speedups_on_by_default():
    cfg = _resolved(["--model", "llama3-8b", "--lora"], cuda=True)
    assert cfg.compile.compile and cfg.lora_kernels.lora_kernels and cfg.packing.packing
    cpu = _resolved(["--model", "llama3-8b", "--lora"], cuda=False)
    assert not (cpu.compile.compile or cpu.lora_kernels.lora_kernels or cpu.packing.packing)


@pytest.mark.parametrize("argv, off", [
    (["--no-lora-kernels"], "lora_kernels"),
    (["--no-packing"], "packing"),
    (["--lora-dropout", "0.1"], "lora_kernels"),  # the fused kernels have no dropout
    (["--dora"], "lora_kernels"),
    (["--dataset-format", "pretrain"], "packing"),  # pretrain blocks are full rows already
])
def test_each_speedup_stays_off_where_it_does_not_apply(argv, off):
    cfg = _resolved(["--model", "llama3-8b", "--lora", *argv], cuda=True)
    assert not getattr(getattr(cfg, off), off)


def test_a_speedup_the_matrix_refuses_stays_off_with_the_reason():
    cfg = _resolved(["--model", "llama3-8b", "--deepspeed", "zero2"], cuda=True)
    assert not cfg.compile.compile
    assert any(line.startswith("--compile off (auto: --compile with --deepspeed: ") for line in cfg.auto)


def test_an_on_and_off_pair_is_refused():
    with pytest.raises(UserError, match="--compile and --no-compile"):
        train.parse_config(["--compile", "--no-compile"])


@pytest.mark.parametrize("argv, longest, context, want", [
    ([], 700, 8192, 704),  # a multiple of 64 over the longest sample
    (["--packing"], 700, 8192, 4096),  # packed rows are at least 4096 tokens
    (["--packing"], 700, 2048, 2048),  # ... capped at the model's context
    ([], 9000, 8192, 8192),
    (["--dataset-format", "pretrain"], None, 131072, 4096),
])
def test_seq_len_follows_the_data(argv, longest, context, want):
    cfg = _resolved(["--model", "llama3-8b", *argv], cuda=False)
    assert defaults.seq_len(cfg, longest, context) == want
    assert cfg.auto[-1].startswith(f"--seq-len {want} (auto: ")


def test_warmup_is_three_percent_of_the_steps():
    cfg = _resolved(["--model", "llama3-8b"], cuda=False)
    defaults.warmup_steps(cfg, 1000)
    assert cfg.optim.warmup_steps == 30
    demo = _resolved([], cuda=False)
    defaults.warmup_steps(demo, 1000)
    assert demo.optim.warmup_steps == 50
    short_demo = _resolved([], cuda=False)
    defaults.warmup_steps(short_demo, 30)
    assert short_demo.optim.warmup_steps == 3 and short_demo.auto[-1].endswith("a tenth of 30 steps)")


def _held_out(answer_lengths: list[int], prompt: int = 6):
    """A validation split whose samples answer `prompt` tokens with answers of these lengths."""
    from core.records import Sample

    return types.SimpleNamespace(samples=[Sample(list(range(prompt + n)), [-100] * prompt + list(range(n)), prompt)
                                          for n in answer_lengths])


@pytest.mark.parametrize("argv, answers, want", [
    ([], [1, 3, 5, 8, 200], 128),  # short answers (median 5), a long one among them
    ([], [30, 31, 32, 34, 400], 128),  # median 32 tokens: the bound
    ([], [1, 30, 33, 33, 34], 0),  # median 33
    ([], [40, 90, 180, 300, 700], 0),  # open-ended chats
    (["--eval-exact-match", "16"], [40, 90, 180], 16),  # set by hand
    (["--eval-exact-match", "0"], [1, 2, 3], 0),
])
def test_exact_match_where_the_held_out_answers_are_short(argv, answers, want):
    cfg = _resolved(["--model", "llama3-8b", *argv], cuda=False)
    defaults.eval_exact_match(cfg, _held_out(answers))
    assert cfg.train.eval_exact_match == want
    assert any(line.startswith(f"--eval-exact-match {want} (auto: held-out answers: median ") for line in cfg.auto) \
        == ("--eval-exact-match" not in argv)


def test_exact_match_is_off_without_prompted_samples_or_validation_set():
    cfg = _resolved(["--model", "llama3-8b"], cuda=False)
    defaults.eval_exact_match(cfg, None)  # no validation set: evaluation does not run
    assert cfg.train.eval_exact_match is None
    defaults.eval_exact_match(cfg, _held_out([5, 6], prompt=0))  # pretrain text: no prompt to answer
    assert cfg.train.eval_exact_match == 0


@pytest.mark.parametrize("argv, bf16, want", [
    (["--lora"], True, "bf16"),  # a frozen base: bf16 storage, adapters in fp32
    ([], True, "bf16-mixed"),  # full fine-tune: fp32 masters
    (["--lora"], False, "fp32"),
])
def test_precision_on_a_gpu(monkeypatch, argv, bf16, want):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    cfg = _resolved(argv, cuda=True)
    defaults.precision(cfg, torch.device("cuda"))
    assert cfg.model.precision == want
    cpu = _resolved(argv, cuda=False)
    defaults.precision(cpu, torch.device("cpu"))
    assert cpu.model.precision == "fp32"


H200, H100, L4 = 143.7e9, 85.0e9, 24.0e9  # bytes of GPU memory


def _preset_config(name: str, **changes):
    import transformers

    from core.model import PRESETS
    cls_name, fields = PRESETS[name]
    return getattr(transformers, cls_name)(**{**fields, **changes})


def _at(argv, cuda=True, seq_len=4096):
    cfg = _resolved(argv, cuda=cuda)
    cfg.data.seq_len = seq_len
    return cfg


@pytest.mark.parametrize("argv, device, gpu_bytes, changes, want", [
    (["--model", "llama3-8b", "--qlora"], "cuda", H200, {}, "ce"),  # the full logits fit: the fast path
    (["--model", "llama3-8b", "--lora"], "cuda", H100, {}, "ce"),  # ~58 of 79 GiB
    (["--model", "llama3-8b", "--lora", "--micro-batch-size", "4"], "cuda", H100, {}, "chunked"),
    (["--model", "llama3-8b", "--qlora"], "cuda", L4, {}, "chunked"),
    (["--model", "llama3-8b", "--lora"], "cuda", H200, {"num_local_experts": 8}, "chunked"),  # not sized
    (["--model", "llama3-8b", "--lora"], "cpu", None, {}, "ce"),  # the full-logits path is the CPU default
    (["--model", "llama3-8b"], "cuda", L4, {}, "ce"),  # a trained head: its weight gradient is its own GEMM
    (["--model", "llama3-8b", "--lora"], "cuda", L4, {"final_logit_softcapping": 30.0}, "ce"),  # Gemma 2
    (["--model", "llama3-8b", "--lora", "--loss", "ce"], "cuda", L4, {}, "ce"),  # set by hand
    (["--model", "llama3-8b", "--lora", "--loss-chunk", "512"], "cuda", L4, {}, "chunked"),
    (["--model", "llama3-8b", "--lora", "--deepspeed", "zero2"], "cuda", L4, {}, "chunked"),  # whole weights
    (["--model", "llama3-8b", "--lora", "--deepspeed", "zero3"], "cuda", L4, {}, "ce"),  # a partitioned head
])
def test_loss_auto_is_fast_where_the_logits_fit_and_lean_where_not(argv, device, gpu_bytes, changes, want):
    cfg = _at(argv, cuda=device == "cuda")
    defaults.loss(cfg, torch.device(device), _preset_config("llama3-8b", **changes), gpu_bytes)
    assert cfg.loss.loss == want
    if "--loss" not in argv and device == "cuda":
        assert f"--loss {want} (auto:" in " ".join(cfg.auto)
    adapters = "--lora" in argv or "--qlora" in argv
    assert cfg.loss.loss_chunk == (512 if "--loss-chunk" in argv else 256 if adapters else 4096)


def test_the_lean_choice_says_how_much_memory_the_logits_would_take():
    cfg = _at(["--model", "llama3-8b", "--qlora"])
    defaults.loss(cfg, torch.device("cuda"), _preset_config("llama3-8b"), L4)
    line = next(a for a in cfg.auto if a.startswith("--loss chunked"))
    assert "the step would take ~" in line and "of 22 GiB" in line and "--loss ce turns it off" in line


@pytest.mark.parametrize("argv, device, gpu_bytes, changes, world, want", [
    (["--model", "llama3-8b", "--qlora"], "cuda", L4, {}, 1, True),
    (["--model", "llama3-8b", "--qlora"], "cuda", H200, {}, 1, False),  # room to spare: the table stays
    (["--model", "llama3-8b", "--qlora"], "cpu", None, {}, 1, False),
    (["--model", "llama3-8b"], "cuda", L4, {}, 1, False),  # the table trains
    (["--model", "llama3-8b", "--lora"], "cuda", L4, {"tie_word_embeddings": True}, 1, False),  # the head needs it
    (["--model", "llama3-8b", "--lora"], "cuda", L4, {}, 2, False),  # one process only
    (["--model", "llama3-8b", "--lora", "--lora-targets", "q_proj,embed_tokens"], "cuda", L4, {}, 1, False),
    (["--model", "llama3-8b", "--lora", "--no-offload-embeddings"], "cuda", L4, {}, 1, False),
])
def test_embedding_offload_auto(argv, device, gpu_bytes, changes, world, want):
    cfg = _at(argv, cuda=device == "cuda")
    defaults.embedding_offload(cfg, torch.device(device), _preset_config("llama3-8b", **changes), world, gpu_bytes)
    assert cfg.embedding_offload.offload_embeddings is want
    assert ("--offload-embeddings on (auto:" in " ".join(cfg.auto)) is want


def test_embedding_offload_on_and_off_is_refused():
    with pytest.raises(UserError, match="--offload-embeddings and --no-offload-embeddings"):
        _parsed(["--model", "llama3-8b", "--lora", "--offload-embeddings", "--no-offload-embeddings"])


def test_a_run_of_a_local_checkpoint_says_what_it_chose(tmp_path):
    """A local model directory is a real model: the real-model defaults, --seq-len from its data."""
    import transformers

    from core.model import PRESETS, load_tokenizer, ModelConfig

    tok = load_tokenizer(ModelConfig())
    cls_name, fields = PRESETS["tiny-llama"]
    config = getattr(transformers, cls_name)(**fields, vocab_size=len(tok))
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": "repeat " * (n % 7 + 1), "output": "ok " * (n % 5 + 1)})
                            + "\n" for n in range(64)))
    out = tmp_path / "run"
    assert train.main(["--model", str(tmp_path / "model"), "--dataset", str(data), "--max-steps", "2",
                       "--eval-exact-match", "0", "--output-dir", str(out), "--device", "cpu"]) == 0
    saved = json.loads((out / "config.json").read_text())
    longest = max(len(tok(json.loads(line)["output"])["input_ids"]) for line in data.read_text().splitlines())
    assert saved["optim"]["lr"] == 2e-5 and saved["train"]["micro_batch_size"] == 2
    assert saved["data"]["seq_len"] % 64 == 0 and saved["data"]["seq_len"] > longest
    assert any(line.startswith(f"--seq-len {saved['data']['seq_len']} (auto: longest sample") for line in saved["auto"])
    assert saved["model"]["precision"] == "fp32" and saved["optim"]["warmup_steps"] == 1


@pytest.mark.parametrize("argv, gpu_bytes, want", [
    (["--model", "llama3.2-1b", "--qlora"], H200, (8, 1)),  # host-bound at 2 rows: 8 fit in 40%
    (["--model", "llama3.2-1b", "--qlora"], H100, (4, 2)),
    (["--model", "llama3-8b", "--lora"], H200, (2, 4)),  # 4 rows would take 60% of the GPU
    (["--model", "llama3-8b", "--qlora"], H200, (2, 4)),
    (["--model", "llama3-8b", "--lora"], H100, (2, 4)),  # never below the peers' 2 rows
    (["--model", "llama3.2-1b"], H200, (4, 2)),  # a full fine-tune: gradients, Adam moments, fp32 logits
    (["--model", "llama3.2-1b", "--qlora", "--micro-batch-size", "2"], H200, (2, 4)),  # set by hand
    (["--model", "llama3.2-1b", "--qlora", "--grad-accum", "8"], H200, (2, 8)),
])
def test_micro_batch_grows_where_the_gpu_memory_allows(argv, gpu_bytes, want):
    cfg = _at(argv)
    defaults.micro_batch(cfg, _preset_config(argv[1]), torch.device("cuda"), gpu_bytes)
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum) == want
    if want[0] > 2:
        assert f"--micro-batch-size {want[0]} (auto: a real model; {want[0]} rows fit in 40%" in " ".join(cfg.auto)
        assert f"--grad-accum {want[1]} (auto: {want[0]} x {want[1]}, 8 rows a step)" in cfg.auto


@pytest.mark.parametrize("argv, tokens, want", [
    (["--model", "llama3-8b", "--lora"], 200, (1, 1)),  # a 4096-token row holds ~20 chats: 1 row a step
    (["--model", "llama3-8b", "--lora"], 1000, (2, 1)),  # ~4 a row: 2 rows, 8 samples
    (["--model", "llama3-8b", "--lora"], 4096, (2, 4)),  # one sample a row (the speed benchmarks): 8 rows
    (["--model", "llama3-8b", "--lora", "--no-packing"], 200, (2, 4)),  # unpacked: 8 samples already
    (["--model", "llama3-8b", "--lora", "--grad-accum", "4"], 200, (2, 4)),  # set by hand
])
def test_a_packed_step_holds_about_as_many_samples_as_an_unpacked_one(argv, tokens, want):
    from core.records import Sample

    cfg = _at(argv)
    defaults.packed_rows(cfg, [Sample([5] * tokens, [5] * tokens, 0)] * 16)
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum) == want
    if want == (1, 1):
        assert "--grad-accum 1 (auto: packed rows of about 20 samples; 1 a step, about 20 samples)" in cfg.auto


def test_micro_batch_keeps_2_on_a_cpu_for_the_demo_and_for_a_mixture_of_experts():
    moe = _preset_config("llama3.2-1b")
    moe.num_local_experts = 8  # the estimate knows dense decoders only
    for argv, device, config in ((["--model", "llama3.2-1b", "--qlora"], "cpu", _preset_config("llama3.2-1b")),
                                 ([], "cuda", _preset_config("llama3.2-1b")),
                                 (["--model", "llama3.2-1b", "--qlora"], "cuda", moe)):
        cfg = _at(argv, cuda=device == "cuda", seq_len=512)
        before = (cfg.train.micro_batch_size, cfg.train.grad_accum)
        defaults.micro_batch(cfg, config, torch.device(device), H200)
        assert (cfg.train.micro_batch_size, cfg.train.grad_accum) == before


def test_a_cpu_run_takes_micro_batches_of_one_row_or_is_refused_before_the_kernel_kills_it(monkeypatch):
    """SmolLM2-135M LoRA on a 24 GiB CPU machine: 2 rows of 5,696 tokens were killed by the kernel at
    step 2 (23.9 GB resident); 1 row peaked at 16.1 GB. Rows the user set are kept; what cannot fit is
    refused in one line naming the --seq-len that does."""
    smol = _preset_config("tiny-llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    ram, cpu = 24 * 2**30, torch.device("cpu")
    cfg = _at(["--model", "llama3.2-1b", "--lora"], cuda=False, seq_len=5696)
    defaults.cpu_memory(cfg, smol, cpu, ram)
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum) == (1, 8)
    assert "--grad-accum 8 (auto: 1 x 8, 8 rows a step)" in cfg.auto
    assert any(a.startswith("--micro-batch-size 1 (auto: CPU; more rows at once would take ~") for a in cfg.auto)
    full = _at(["--model", "llama3.2-1b"], cuda=False, seq_len=5696)  # measured: 13.1 GB at 1 row
    defaults.cpu_memory(full, smol, cpu, ram)
    assert (full.train.micro_batch_size, full.train.grad_accum) == (1, 8)
    short = _at(["--model", "llama3.2-1b", "--lora"], cuda=False, seq_len=1024)  # fits as it is
    defaults.cpu_memory(short, smol, cpu, ram)
    assert (short.train.micro_batch_size, short.train.grad_accum) == (2, 4)
    for argv in (["--model", "llama3.2-1b", "--lora", "--micro-batch-size", "2"], ["--model", "llama3.2-1b", "--lora"]):
        tight = _at(argv, cuda=False, seq_len=5696)
        with pytest.raises(UserError, match=r"^--seq-len 5696 x --micro-batch-size \d: a step on this CPU would take "
                                            r"~\d+ of its 8 GiB memory; pass --seq-len \d+ "):
            defaults.cpu_memory(tight, smol, cpu, 8 * 2**30)
        assert tight.train.micro_batch_size == (2 if "--micro-batch-size" in argv else 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four processes share the machine: 6 GiB each
    with pytest.raises(UserError, match=r"of its 6 GiB memory"):
        defaults.cpu_memory(_at(["--model", "llama3.2-1b", "--lora"], cuda=False, seq_len=5696), smol, cpu, ram)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    on_gpu = _at(["--model", "llama3.2-1b", "--lora"], cuda=False, seq_len=5696)
    defaults.cpu_memory(on_gpu, smol, torch.device("cuda"), ram)
    assert (on_gpu.train.micro_batch_size, on_gpu.train.grad_accum) == (2, 4)


def test_a_cpu_run_counts_the_memory_its_flags_save_and_its_rows_padded_to_their_samples():
    """Measured on SmolLM2-135M (4 of its layers, 1,920 tokens, LoRA): 2.40 GB resident plain, 1.03 GB
    with --alst. The estimate must not refuse a length --alst or --ac full makes fit, nor count unpacked
    rows as --seq-len long; the refusal names --alst where activations are not yet recomputed."""
    smol = _preset_config("tiny-llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    ram, cpu = 24 * 2**30, torch.device("cpu")
    lora = ["--model", "llama3.2-1b", "--lora", "--micro-batch-size", "1", "--grad-accum", "1"]
    with pytest.raises(UserError, match=r"^--seq-len 16384 .* ~4\d of its 24 GiB memory; pass --seq-len \d+ .*--alst"):
        defaults.cpu_memory(_at(lora, cuda=False, seq_len=16384), smol, cpu, ram)
    for flags in (["--alst"], ["--ac", "full", "--loss", "chunked"]):
        cfg = _at(lora + flags, cuda=False, seq_len=16384)
        assert cfg.checkpointing.ac == "full"  # --alst's recipe, set before the estimate reads it
        defaults.cpu_memory(cfg, smol, cpu, ram)  # fits: ~4 GiB of activations, not ~42
    with pytest.raises(UserError, match=r"pass --seq-len \d+ .*--truncation truncate\), or train on a GPU$"):
        defaults.cpu_memory(_at(lora + ["--alst"], cuda=False, seq_len=131072), smol, cpu, ram)
    unpacked = _at(lora + ["--no-packing"], cuda=False, seq_len=16384)
    defaults.cpu_memory(unpacked, smol, cpu, ram, row_tokens=1888)  # the longest sample, not --seq-len
    with pytest.raises(UserError, match="--seq-len 16384"):
        defaults.cpu_memory(unpacked, smol, cpu, ram, row_tokens=16000)


@pytest.mark.parametrize("name, method, micro_batch, measured_gib", [
    ("llama3-8b", "--lora", 2, 49.4), ("llama3-8b", "--qlora", 2, 39.8),
    ("llama3.2-1b", "--qlora", 2, 10.9), ("llama3.2-1b", "--qlora", 4, 20.4),
])
def test_the_memory_estimate_is_near_the_measured_peaks(name, method, micro_batch, measured_gib):
    """Peaks measured on an H200 (benchmarks/results/2026-12-02-lean-defaults-h200.md): the estimate
    may read low by up to 15%, which GPU_SHARE's 40% absorbs, and never high by more than 10%."""
    cfg = _at(["--model", name, method])
    estimate = defaults.estimate_bytes(cfg, _preset_config(name), micro_batch) / 2**30
    assert 0.85 * measured_gib <= estimate <= 1.1 * measured_gib


SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)


@pytest.mark.parametrize("argv, changes, world, want, why", [
    (["--lora"], SMOLLM2_135M, 1, "reduce-overhead", "LoRA, 134M parameters: the host bounds the step"),
    (["--qlora"], SMOLLM2_135M, 1, "reduce-overhead", "LoRA, 134M parameters"),
    (["--lora"], {}, 1, "default", "1.2B parameters; CUDA graphs pay under 0.75B"),  # the llama3.2-1b shape
    ([], SMOLLM2_135M, 1, "default", "full fine-tune"),
    (["--lora"], SMOLLM2_135M, 2, "default", "2 processes"),
    (["--lora", "--no-packing"], SMOLLM2_135M, 1, "default", "padded rows of many lengths"),
    (["--lora", "--no-packing", "--dataset-format", "pretrain"], SMOLLM2_135M, 1, "reduce-overhead", "134M"),
    (["--lora"], {**SMOLLM2_135M, "num_local_experts": 8}, 1, "default", "cannot size"),
    (["--lora", "--ac", "full"], SMOLLM2_135M, 1, "default", "--ac full with --compile-mode reduce-overhead"),
    (["--lora", "--micro-batch-size", "64"], SMOLLM2_135M, 1, "default", "the step would take ~"),  # tight: L4
    (["--lora", "--fp8-base"], SMOLLM2_135M, 1, "reduce-overhead", "134M"),
    (["--lora", "--max-steps", "50"], SMOLLM2_135M, 1, "default", "50 steps: recording CUDA graphs pays back from"),
    (["--lora", "--max-steps", "50"], {}, 1, "default", "1.2B parameters"),  # the size is the first reason
    (["--lora-8bit"], SMOLLM2_135M, 1, "default", "CUDA graphs are not measured with --lora-8bit"),
    (["--lora", "--tiled-mlp"], SMOLLM2_135M, 1, "default", "CUDA graphs are not measured with --tiled-mlp"),
    (["--lora", "--dora"], SMOLLM2_135M, 1, "default", "CUDA graphs are not measured with --dora"),
])
def test_cuda_graphs_auto_for_small_adapter_models(argv, changes, world, want, why):
    cfg = _at(["--model", "llama3.2-1b", *argv])
    steps = 50 if "--max-steps" in argv else 1000
    defaults.compile_mode(cfg, torch.device("cuda"), _preset_config("llama3.2-1b", **changes), world, steps,
                          L4 if "64" in argv else H200)
    assert cfg.compile.compile_mode == want
    line = next(a for a in cfg.auto if a.startswith("--compile-mode"))
    assert line.startswith(f"--compile-mode {want} (auto: ") and why in line, line


@pytest.mark.parametrize("argv", [["--compile-mode", "default"], ["--no-compile"], ["--compile-backend", "aot_eager"]])
def test_cuda_graphs_stay_off_when_asked_or_not_compiled(argv):
    cfg = _at(["--model", "llama3.2-1b", "--lora", *argv])
    defaults.compile_mode(cfg, torch.device("cuda"), _preset_config("llama3.2-1b", **SMOLLM2_135M), 1, 1000, H200)
    assert cfg.compile.compile_mode == "default"
    assert not any(a.startswith("--compile-mode") for a in cfg.auto)


def test_cuda_graphs_stay_off_on_a_cpu():
    cfg = _at(["--model", "llama3.2-1b", "--lora"], cuda=False)
    defaults.compile_mode(cfg, torch.device("cpu"), _preset_config("llama3.2-1b", **SMOLLM2_135M), 1, 1000)
    assert cfg.compile.compile_mode == "default" and not any(a.startswith("--compile-mode") for a in cfg.auto)


def test_the_features_cuda_graphs_were_measured_with_are_matrix_rows():
    from core import compat
    assert defaults.GRAPHS_MEASURED <= {f.flag for f in compat.FEATURES}


@pytest.mark.parametrize("argv, total, epoch, has_val, want", [
    (["--model", "llama3-8b", "--lora"], 300, 100, True, 100),  # 3 epochs: a validation pass each
    (["--model", "llama3-8b", "--lora"], 80, 100, True, 0),  # less than one epoch: before and at the end
    (["--model", "llama3-8b", "--lora"], 300, 100, False, 0),  # nothing to evaluate
    ([], 1000, 625, True, 0),  # the demo: its published figures
    (["--model", "llama3-8b", "--lora", "--eval-every", "7"], 300, 100, True, 7),  # set by hand
])
def test_eval_every_is_once_an_epoch_for_a_real_model(argv, total, epoch, has_val, want):
    cfg = _at(argv)
    defaults.eval_every(cfg, total, epoch, object() if has_val else None)
    assert cfg.train.eval_every == want
    assert ("--eval-every 100 (auto: once an epoch)" in cfg.auto) == (want == 100)
