"""A run prints nanotune's own lines only, and imports the heavy optional packages only for the flags that use them."""

import inspect
import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT

# not `kernels` (Hugging Face's kernel hub): transformers 5.25 requires it and imports it with any model (quietly)
OPTIONAL = ["torchao", "deepspeed", "bitsandbytes", "liger_kernel", "cut_cross_entropy", "flash_attn", "xformers",
            "peft"]

# third-party text: warnings (file:line: XWarning, warnings.warn( lines), deprecations, failed kernel loads,
# tracebacks, glog-style torch log lines (W1202 ...), DeepSpeed's ([2026-...] [WARNING]), progress bars,
# transformers' logger ([transformers] ...)
THIRD_PARTY = re.compile(r"Warning|warn\(|deprecat|Failed to load|Traceback|terminate called|site-packages|"
                         r"^[WEI]\d{4} |^\[\d{4}-\d\d-\d\d|it/s\]|Token indices|Setting accelerator|^\[transformers\]")


@pytest.fixture
def data_with_a_long_sample(small_data):
    """small_data plus one sample longer than the tokenizer's model_max_length (512)."""
    letters = " ".join("abcdefghij"[i % 10] for i in range(700))
    with small_data.open("a") as f:
        f.write(json.dumps({"instruction": "Copy the letters.", "input": letters, "output": letters}) + "\n")
    return small_data


def test_a_default_run_imports_no_optional_package(tmp_path, small_data):
    """Parse, model build, checkpoint save, resume and export of a default-flag run, in a fresh process."""
    out = tmp_path / "run"
    common = ["--dataset", str(small_data), "--val-dataset", "none", "--eval-exact-match", "0", "--micro-batch-size",
              "4", "--output-dir", str(out)]
    flags = common + ["--max-steps", "2", "--save-every", "1"]
    crash = f"import shutil; [shutil.rmtree({str(out)!r} + d) for d in ('/final', '/checkpoints/step_00000002')]"
    script = (f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); import train\n"
              f"assert train.main({flags!r}) == 0\n{crash}\n"  # as if the run died after step 1's checkpoint
              f"assert train.main({flags + ['--resume', 'auto']!r}) == 0\n"
              f"print(json.dumps([m for m in {OPTIONAL!r} if sys.modules.get(m) is not None]))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--lora"], ["--qlora"]], ids=["default", "lora", "qlora"])
def test_the_first_steps_print_only_nanotune_lines(tmp_path, data_with_a_long_sample, flags):
    cmd = [sys.executable, "train.py", "--dataset", str(data_with_a_long_sample), "--val-size", "16",
           "--eval-exact-match", "4", "--max-steps", "2", "--save-every", "2", "--output-dir", str(tmp_path / "run"),
           *flags]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    assert [line for line in lines if THIRD_PARTY.search(line)] == []
    assert any(line.startswith("step 2/2") for line in lines) and "saved the final model" in proc.stdout


def test_a_local_checkpoint_loads_and_merges_quietly(tmp_path, small_data):
    """from_pretrained on a model directory (the path a real checkpoint takes) prints no loading bar, and
    export.py merges the adapter into it printing its one line."""
    import transformers

    from core.model import PRESETS, ModelConfig, load_tokenizer

    tok = load_tokenizer(ModelConfig())
    cls_name, fields = PRESETS["tiny-llama"]
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**fields,
                                                                                          vocab_size=len(tok)))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    cmd = [sys.executable, "train.py", "--model", str(tmp_path / "model"), "--lora", "--dataset", str(small_data),
           "--val-dataset", "none", "--eval-exact-match", "0", "--max-steps", "1",
           "--output-dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    assert [line for line in lines if THIRD_PARTY.search(line)] == []
    assert any(line.startswith("step 1/1") for line in lines)
    cmd = [sys.executable, "export.py", "--adapter", str(tmp_path / "run" / "final"), "--out", str(tmp_path / "m")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == "" and proc.stdout.splitlines() == [f"merged {tmp_path / 'run' / 'final'} into "
                                                               f"{tmp_path / 'model'}: {tmp_path / 'm'}"], proc


def test_flash_attention_notices_about_fp32_masters_are_dropped():
    """A full fine-tune on a GPU keeps fp32 masters under bf16 autocast: transformers' FlashAttention notices about
    fp32 weights are dropped from the log, other records of the same loggers are kept, and the dropped text is the
    installed transformers' own (so a reworded notice fails here, not in a user's log)."""
    import importlib
    import logging

    from core import attention

    attention.quiet_fp32_masters()
    for name, starts in attention.FP32_NOTICES.items():
        logger, source = logging.getLogger(name), inspect.getsource(importlib.import_module(name))
        for start in starts:
            assert not logger.filter(logging.makeLogRecord({"msg": start + " (the rest)"}))
            assert re.sub(r"^Flash Attention \d", "Flash Attention {flash_attn_version}", start) in source
        assert logger.filter(logging.makeLogRecord({"msg": "Flash Attention does not support `output_attentions`"}))
