"""LoRA / QLoRA / 8-bit LoRA: only the adapter trains, the base stays bitwise unchanged, the adapter
reloads through peft, merges into its base, resumes exactly from a checkpoint; bad flags are refused."""

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, config, read_metrics, run_train
from core import UserError, quantize
from features import lora
from core.batches import StepBatches
from core.checkpoint import check_resume, load_checkpoint, save_checkpoint
from core.data import DataConfig, load_splits
from core.distributed import Dist
from core.loss import count_targets, forward_loss_sum
from core.model import ModelConfig, load_config, load_model
from core.optim import OptimConfig, build_optimizer, build_scheduler

DECODER_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
CPU = torch.device("cpu")


def _bnb_problem(device: torch.device = CPU) -> str | None:
    """Why bitsandbytes cannot quantize on `device` here (None when it can)."""
    try:
        quantize.quantization_config(lora.LoraConfig(qlora=True), device)
        quantize.quantization_config(lora.LoraConfig(lora_8bit=True), device)
    except UserError as e:
        return str(e)
    return None


needs_bnb_cpu = pytest.mark.skipif(_bnb_problem() is not None, reason=f"bitsandbytes on CPU: {_bnb_problem()}")


# ---------------------------------------------------------------------------- helpers


def build_base(tok, preset="tiny-llama", precision="fp32", quant=None, device=CPU, seed=0):
    """A preset with seeded random weights, quantized in place for --qlora / --lora-8bit."""
    torch.manual_seed(seed)
    mcfg = ModelConfig(preset, precision=precision)
    model = load_model(mcfg, load_config(mcfg, tok), device)
    return quantize.quantize_base(model, quant) if quant is not None else model


def build(tok, preset="tiny-llama", precision="fp32", device=CPU, seed=0, **flags):
    """build_base + apply_lora, as train.py does with `--lora ...` flags (default: --lora)."""
    cfg = lora.LoraConfig(**({"lora": True} if not {"qlora", "lora_8bit"} & set(flags) else {}), **flags)
    lora.validate(config(lora=cfg))
    model = build_base(tok, preset, precision, quantize.quantization_config(cfg, device), device, seed)
    return lora.apply_lora(model, cfg)


def batches(tok, data, seed=0) -> StepBatches:
    train, _ = load_splits(DataConfig(dataset=str(data), seq_len=128), tok)
    return StepBatches(train.samples, micro_batch_size=8, grad_accum=1, seed=seed, pad_id=tok.pad_token_id)


def fixed_batch(tok, data, device=CPU) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in next(iter(batches(tok, data)))[0].items()}


def step(model, optimizer, batch, scheduler=None) -> float:
    """One optimizer step on the token-mean loss; returns the loss."""
    loss = forward_loss_sum(model, batch) / count_targets(batch["labels"])
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def train_steps(model, batch, n=10, lr=3e-3) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    return [step(model, optimizer, batch) for _ in range(n)]


def frozen(model) -> dict:
    """Copies of every frozen parameter and buffer (quantized ones as stored: packed 4-bit, int8)."""
    state = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    return state | {n: b.detach().clone() for n, b in model.named_buffers()}


def trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def adapted(model) -> set[str]:
    """Names of the modules that carry an adapter."""
    return {n.split(".lora_A.")[0] for n in trainable(model) if ".lora_A." in n}


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def assert_trains_only_the_adapter(model, batch, allowed=("lora_A", "lora_B")):
    before = frozen(model)
    losses = train_steps(model, batch)
    assert losses[-1] < 0.85 * losses[0], losses
    after = frozen(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    names = trainable(model)
    assert names and all(any(f".{a}." in n or n.endswith(f".{a}") for a in allowed) for n in names), names
    assert all(p.dtype == torch.float32 for p in names.values())  # fp32 adapters, whatever the base


# ---------------------------------------------------------------------------- LoRA on a bf16/fp32 base


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])
def test_lora_trains_only_the_adapter(tok, small_data, preset):
    assert_trains_only_the_adapter(build(tok, preset), fixed_batch(tok, small_data))


def test_bf16_base_gets_fp32_adapters(tok, small_data):
    model = build(tok, precision="bf16")
    assert model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert_trains_only_the_adapter(model, fixed_batch(tok, small_data))


def test_default_targets_are_every_decoder_linear_but_not_lm_head(tok):
    model = build(tok)
    names = adapted(model)
    assert {n.rsplit(".", 1)[-1] for n in names} == DECODER_LINEARS
    assert len(names) == len(DECODER_LINEARS) * model.config.num_hidden_layers
    assert not any("lm_head" in n for n in names) and not any("lm_head" in n for n in trainable(model))


def test_targets_flag_restricts_the_adapted_modules(tok):
    model = build(tok, lora_targets="q_proj, v_proj")
    assert {n.rsplit(".", 1)[-1] for n in adapted(model)} == {"q_proj", "v_proj"}


def test_unknown_target_names_the_flag_and_the_choices(tok):
    with pytest.raises(UserError, match=r"--lora-targets qproj: .*q_proj"):
        build(tok, lora_targets="qproj")


def test_rslora_scales_by_alpha_over_sqrt_rank(tok):
    plain, rs = build(tok, lora_rank=16, lora_alpha=32), build(tok, lora_rank=16, lora_alpha=32, rslora=True)
    q = lambda m: m.get_base_model().model.layers[0].self_attn.q_proj  # noqa: E731
    assert rs.peft_config["default"].use_rslora and not plain.peft_config["default"].use_rslora
    assert q(plain).scaling["default"] == pytest.approx(32 / 16)
    assert q(rs).scaling["default"] == pytest.approx(32 / 16 ** 0.5)


def test_dora_trains_a_magnitude_vector(tok, small_data):
    model = build(tok, dora=True)
    assert model.peft_config["default"].use_dora
    magnitudes = [n for n in trainable(model) if "lora_magnitude_vector" in n]
    assert len(magnitudes) == len(DECODER_LINEARS) * model.config.num_hidden_layers
    assert_trains_only_the_adapter(model, fixed_batch(tok, small_data),
                                   allowed=("lora_A", "lora_B", "lora_magnitude_vector"))


# ---------------------------------------------------------------------------- export, reload, merge


def trained_adapter(tok, small_data, out, **flags):
    """A model trained a few steps, exported with lora.export; returns (model, batch)."""
    model, batch = build(tok, **flags), fixed_batch(tok, small_data)
    train_steps(model, batch, n=4)
    lora.export(model, tok, out)
    return model, batch


@pytest.mark.parametrize("flags", [{}, {"dora": True, "rslora": True}])
def test_adapter_reloads_with_peft_and_merges(tok, small_data, tmp_path, flags):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, batch = trained_adapter(tok, small_data, tmp_path / "final", **flags)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "final").iterdir()}
    expected = logits(model, batch)
    fresh_base = AutoModelForCausalLM.from_pretrained(tmp_path / "final" / "base")  # the preset's saved base
    reloaded = PeftModel.from_pretrained(fresh_base, tmp_path / "final")
    assert torch.equal(logits(reloaded, batch), expected)
    lora.merge_and_save("tiny-llama", tmp_path / "final", tmp_path / "merged", dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    # fp32: W + s*B@A computed once instead of per token; differences are float rounding
    torch.testing.assert_close(logits(merged, batch), expected, rtol=0, atol=1e-4)


def test_export_cli_merges_a_run(tok, small_data, tmp_path):
    """python export.py in a subprocess; the base is found from the run directory."""
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    model, batch = trained_adapter(tok, small_data, run / "final")
    (run / "config.json").write_text(json.dumps({"model": {"path": "tiny-llama"}}))
    proc = subprocess.run([sys.executable, "export.py", "--adapter", str(run / "final"), "--out",
                           str(tmp_path / "merged")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = (proc.stdout + proc.stderr).strip().splitlines()  # nanotune's line only, no load report of the base
    assert len(said) == 1 and said[0].startswith("merged "), said
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(merged, batch), logits(model, batch), rtol=0, atol=1e-4)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_export_of_a_loaded_base_records_it_and_saves_no_copy(tok, tmp_path):
    """A base loaded from a directory (or the hub) is named in adapter_config.json, not copied."""
    from transformers import AutoModelForCausalLM

    build_base(tok).save_pretrained(tmp_path / "base-model")
    model = lora.apply_lora(AutoModelForCausalLM.from_pretrained(tmp_path / "base-model"), lora.LoraConfig(lora=True))
    lora.export(model, tok, tmp_path / "final")
    assert not (tmp_path / "final" / "base").exists()
    assert lora.base_of(tmp_path / "final") == str(tmp_path / "base-model")


def test_export_cli_bad_input_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "export.py", "--adapter", str(tmp_path), "--out", str(tmp_path / "m"),
                           "--base", "tiny-llama"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --adapter"), proc.stderr


def test_preset_base_without_its_saved_weights_is_refused(tok, small_data, tmp_path):
    trained_adapter(tok, small_data, tmp_path / "final")
    shutil.rmtree(tmp_path / "final" / "base")
    with pytest.raises(UserError, match="--base tiny-llama is a random-weight preset"):
        lora.merge_and_save("tiny-llama", tmp_path / "final", tmp_path / "merged")


# ---------------------------------------------------------------------------- checkpoints


def run_with_checkpoint(tok, data, out, save_at, steps, resume_from=None, **flags):
    """Drive train.py's step sequence (optimizer, schedule, data order, dropout RNG) directly."""
    model = build(tok, seed=0, **flags)
    if resume_from is not None:  # a fresh process: the adapter starts elsewhere until the checkpoint loads
        torch.manual_seed(123)
        for p in trainable(model).values():
            torch.nn.init.normal_(p)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=2), CPU)
    scheduler = build_scheduler(optimizer, OptimConfig(lr=1e-2, warmup_steps=2), steps)
    data, start = batches(tok, data), 0
    if resume_from is not None:
        state = check_resume(resume_from, scheduler.plan, data, Dist(), deepspeed=False)
        load_checkpoint(resume_from, state, model, optimizer, scheduler, Dist())
        start = state["step"]
    losses, stream = {}, iter(data)
    for i in range(start + 1, steps + 1):
        model.train()
        losses[i] = step(model, optimizer, next(stream)[0], scheduler)
        if i == save_at:
            save_checkpoint(out, i, model, optimizer, scheduler, data, Dist(), keep=0)
    return losses, model


def checkpoint_keys(path) -> set[str]:
    import torch.distributed.checkpoint as dcp

    return set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def assert_resumes_exactly(tok, small_data, tmp_path, **flags):
    full, model = run_with_checkpoint(tok, small_data, tmp_path / "run", save_at=2, steps=4, **flags)
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    weights = {k for k in checkpoint_keys(ckpt) if k.startswith("model.")}
    assert weights == {"model." + n for n in trainable(model)}  # the adapter alone, no base weights
    resumed, _ = run_with_checkpoint(tok, small_data, tmp_path / "other", save_at=-1, steps=4, resume_from=ckpt,
                                     **flags)
    assert resumed == {3: full[3], 4: full[4]}  # bit-exact on CPU


def test_lora_checkpoint_holds_only_the_adapter_and_resumes_exactly(tok, small_data, tmp_path):
    assert_resumes_exactly(tok, small_data, tmp_path, lora_dropout=0.1)  # dropout: the RNG state matters too


# ---------------------------------------------------------------------------- QLoRA / 8-bit base


QUANT = [pytest.param({"qlora": True}, id="qlora"), pytest.param({"lora_8bit": True}, id="lora-8bit")]


@needs_bnb_cpu
@pytest.mark.parametrize("flags", QUANT)
def test_quantized_base_trains_only_the_adapter(tok, small_data, flags):
    model = build(tok, **flags)
    q = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(q).__name__ == ("Linear4bit" if "qlora" in flags else "Linear8bitLt")
    assert q.weight.dtype == (torch.uint8 if "qlora" in flags else torch.int8)
    assert type(model.get_base_model().lm_head) is torch.nn.Linear
    assert adapted(model) and {n.rsplit(".", 1)[-1] for n in adapted(model)} == DECODER_LINEARS
    assert_trains_only_the_adapter(model, fixed_batch(tok, small_data))


@needs_bnb_cpu
@pytest.mark.parametrize("flags", QUANT)
def test_preset_quantization_equals_from_pretrained(tok, tmp_path, flags):
    """quantize_base (presets) stores the same bits as from_pretrained(quantization_config=...)."""
    from transformers import AutoModelForCausalLM

    build_base(tok).save_pretrained(tmp_path / "base")
    qc = quantize.quantization_config(lora.LoraConfig(**flags))
    ours = build_base(tok, quant=qc).state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=qc,
                                                  device_map={"": "cpu"}).state_dict()  # CUDA when it can
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@needs_bnb_cpu
def test_qlora_gradients_survive_an_evaluation_pass(tok, small_data):
    """bitsandbytes 0.50.2 repacks 4-bit weights for CPU inference on the first no-grad eval forward and
    then loses the input gradient of every 4-bit layer (apply_lora turns that repacking off)."""
    batch = fixed_batch(tok, small_data)

    def adapter_grads(evaluate_first: bool) -> dict:
        model = build(tok, qlora=True)
        if evaluate_first:
            logits(model, batch)  # what train.py's validation before step 1 does
        model.train()
        forward_loss_sum(model, batch).backward()
        return {n: p.grad for n, p in trainable(model).items()}

    plain, after_eval = adapter_grads(False), adapter_grads(True)
    assert all(torch.equal(plain[n], after_eval[n]) for n in plain)


# Until core/checkpoint.py saves trainable parameters instead of get_state_dict's filtered
# model.state_dict(): 4-bit checkpoints also hold bitsandbytes' quantization state (absmax, ...),
# and 8-bit ones fail (AttributeError: 'Linear8bitLt' has no attribute 'SCB'). Remove this marker
# with that edit (see the LoRA report); the tests then pass.


@needs_bnb_cpu
@pytest.mark.parametrize("flags", QUANT)
def test_quantized_checkpoint_holds_only_the_adapter_and_resumes_exactly(tok, small_data, tmp_path, flags):
    assert_resumes_exactly(tok, small_data, tmp_path, **flags)


@needs_bnb_cpu
@pytest.mark.parametrize("flags", QUANT)
def test_quantized_export_merges_into_the_dequantized_base(tok, small_data, tmp_path, flags):
    from transformers import AutoModelForCausalLM

    model, batch = trained_adapter(tok, small_data, tmp_path / "final", **flags)
    lora.merge_and_save(lora.base_of(tmp_path / "final"), tmp_path / "final", tmp_path / "merged", dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    # the quantized model computes in bf16 (4-bit) or on fp16 int8 inputs (8-bit), the merged one in fp32
    torch.testing.assert_close(logits(merged, batch), logits(model, batch), rtol=0, atol=0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("flags", QUANT)
def test_quantized_base_trains_on_cuda(tok, small_data, flags):
    cuda = torch.device("cuda")
    if problem := _bnb_problem(cuda):
        pytest.skip(problem)
    assert_trains_only_the_adapter(build(tok, device=cuda, **flags), fixed_batch(tok, small_data, cuda))


# ---------------------------------------------------------------------------- refusals


BAD = {  # two adapter modes: core/compat.py's matrix; the rest: lora.validate (train.validate runs both)
    "two modes": (dict(lora=True, qlora=True), "--lora with --qlora: they are alternatives"),
    "three modes": (dict(lora=True, qlora=True, lora_8bit=True), "--lora with --qlora: they are alternatives"),
    "rank 0": (dict(lora=True, lora_rank=0), "--lora-rank must be at least 1"),
    "alpha 0": (dict(lora=True, lora_alpha=0), "--lora-alpha must be positive"),
    "dropout 1": (dict(lora=True, lora_dropout=1.0), r"--lora-dropout must be in \[0, 1\)"),
    "no targets": (dict(lora=True, lora_targets=" , "), "--lora-targets is empty"),
    "options without a mode": (dict(lora_rank=8, dora=True), "--lora-rank, --dora set but no adapter is on"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_combinations_name_the_flags(name):
    import train

    fields, message = BAD[name]
    cfg = config(lora=lora.LoraConfig(**fields))
    with pytest.raises(UserError, match=message):
        (train.validate if "modes" in name else lora.validate)(cfg)


def test_missing_bitsandbytes_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(UserError, match="--qlora needs bitsandbytes.*pip install"):
        quantize.quantization_config(lora.LoraConfig(qlora=True))
    assert quantize.quantization_config(lora.LoraConfig(lora=True)) is None


# ---------------------------------------------------------------------------- through train.py, once wired


def _train_has_lora_flags() -> bool:
    import train

    return any(f.name == "lora" for f in dataclasses.fields(train.Config))


wired = pytest.mark.skipif(not _train_has_lora_flags(), reason="train.py does not have the --lora flags yet")
RUN = ["--max-steps", "12", "--micro-batch-size", "8", "--log-every", "4", "--lr", "3e-3", "--warmup-steps", "2"]


@wired
@pytest.mark.parametrize("mode", ["--lora", "--qlora", "--lora-8bit"])
def test_train_py_writes_an_adapter(tmp_path, small_data, mode, capsys):
    if mode != "--lora" and _bnb_problem():
        pytest.skip(_bnb_problem())
    out = tmp_path / "run"
    assert run_train(out, "--dataset", str(small_data), *RUN, mode) == 0
    model_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("model: "))
    base = {"--lora": None, "--qlora": ", base in 4-bit NF4 on ", "--lora-8bit": ", base in 8-bit on "}[mode]
    assert base in model_line if base else "base in" not in model_line, model_line
    steps = [m for m in read_metrics(out) if "loss" in m]
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert (out / "final" / "adapter_config.json").is_file() and (out / "final" / "base").is_dir()
    assert json.loads((out / "config.json").read_text())["lora"][mode[2:].replace("-", "_")] is True


@wired
def test_train_py_lora_run_resumes_exactly(tmp_path, small_data):
    args = ["--dataset", str(small_data), *RUN, "--max-steps", "8", "--log-every", "1", "--save-every", "4",
            "--lora", "--lora-dropout", "0.1"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_train(full, *args, "--keep-checkpoints", "0") == 0
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_00000004", cut / "checkpoints" / "step_00000004")
    assert run_train(cut, *args, "--resume", "auto") == 0
    a = {m["step"]: m for m in read_metrics(full)}
    b = {m["step"]: m for m in read_metrics(cut)}
    assert sorted(b) == [5, 6, 7, 8] and all(b[s]["loss"] == a[s]["loss"] for s in b)
    from safetensors.torch import load_file

    fa, fb = (load_file(r / "final" / "adapter_model.safetensors") for r in (full, cut))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


def test_export_never_replaces_a_directory_of_other_files(tmp_path):
    """--out is replaced whole: a directory with files in it is refused (its files kept) unless
    --overwrite, and one that holds the adapter always is."""
    import export

    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    adapter = str(tmp_path / "run" / "final")
    assert export.main(["--adapter", adapter, "--out", str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="holds the adapter"):
        export.check_out(export.ExportConfig(adapter, str(tmp_path / "run"), overwrite=True))
    export.check_out(export.ExportConfig(adapter, str(tmp_path / "mine"), overwrite=True))  # asked for
    export.check_out(export.ExportConfig(adapter, str(tmp_path / "new")))
