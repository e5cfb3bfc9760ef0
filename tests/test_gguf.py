"""--model FILE.gguf (core/gguf.py): converted once to a Hugging Face directory that holds the file's
weights as transformers reads them, reused by later runs; train.py trains from it as from that directory.
The real-checkpoint tier's GGUF file (SmolLM2-135M-Instruct, Q4_1); the refusals need no file."""

import sys

import pytest
import torch

from conftest import read_metrics, run_train, write_jsonl
from core import UserError, gguf

CHATS = [{"messages": [{"role": "user", "content": f"Add {a} and {b}."},
                       {"role": "assistant", "content": f"{a + b}"}]} for a in range(6) for b in range(4)]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


def test_a_missing_file_and_a_missing_gguf_package_are_one_line_errors(tmp_path, cache, monkeypatch):
    with pytest.raises(UserError, match=r"--model .*nope\.gguf: no such GGUF file"):
        gguf.hf_dir(str(tmp_path / "nope.gguf"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # not importable
    with pytest.raises(UserError, match="needs the gguf package; pip install gguf"):
        gguf.hf_dir(str(tmp_path / "m.gguf"))
    assert not cache.exists() or not any(cache.iterdir())


def test_an_unreadable_file_is_a_one_line_error_and_leaves_no_directory(tmp_path, cache):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(UserError, match=r"transformers cannot read this GGUF file .*; convert it to a Hugging Face"):
        gguf.hf_dir(str(bad), say=lambda line: None)
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == []


def test_an_unwritable_cache_is_a_one_line_error(tmp_path, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("NANOTUNE_CACHE", str(tmp_path / "file"))  # a file where the folder would go
    with pytest.raises(UserError, match="cannot write its converted directory .*; set NANOTUNE_CACHE"):
        gguf.hf_dir(str(tmp_path / "m.gguf"))


@pytest.fixture(scope="module")
def converted(smollm2_gguf, tmp_path_factory):
    """The tier's GGUF file converted once into a fresh cache: (cache root, directory, lines said)."""
    root, lines = tmp_path_factory.mktemp("nanotune-cache"), []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOTUNE_CACHE", str(root))
        path = gguf.hf_dir(str(smollm2_gguf), say=lines.append)
    return root, path, lines


@pytest.mark.slow
def test_the_directory_holds_the_files_weights_and_is_made_once(smollm2_gguf, converted, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, path, lines = converted
    assert len(lines) == 1 and "converting SmolLM2-135M-Instruct.Q4_1.gguf" in lines[0] and path in lines[0]
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>assistant" in tok.chat_template
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    ours = AutoModelForCausalLM.from_pretrained(path).eval()
    direct = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                  dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, direct(ids).logits)

    def fail(*args):
        raise AssertionError("converted again")

    monkeypatch.setenv("NANOTUNE_CACHE", str(root))
    monkeypatch.setattr(gguf, "convert", fail)
    assert gguf.hf_dir(str(smollm2_gguf), say=lines.append) == path and len(lines) == 1


@pytest.mark.slow
def test_train_takes_a_gguf_file_as_its_model(smollm2_gguf, smollm2, converted, tmp_path, monkeypatch):
    root, path, _ = converted
    monkeypatch.setenv("NANOTUNE_CACHE", str(root))  # converted once already: the run finds it
    data = tmp_path / "chats.jsonl"
    write_jsonl(data, CHATS)
    common = ["--dataset", str(data), "--val-dataset", "none", "--lora", "--lora-rank", "4", "--seq-len", "64",
              "--micro-batch-size", "4", "--grad-accum", "1", "--max-steps", "2", "--precision", "fp32",
              "--device", "cpu", "--seed", "0", "--skip-export"]
    assert run_train(tmp_path / "gguf", "--model", str(smollm2_gguf), *common) == 0
    assert run_train(tmp_path / "dir", "--model", str(smollm2), *common) == 0
    from_file, from_dir = ([m["loss"] for m in read_metrics(tmp_path / run) if "loss" in m] for run in ("gguf", "dir"))
    assert len(from_file) == 2 and from_file == from_dir  # the tier's directory is the same conversion
    assert path in (tmp_path / "gguf" / "config.json").read_text()


def test_export_finds_a_gguf_runs_base_also_once_its_conversion_left_the_cache(smollm2_gguf, converted, tmp_path,
                                                                               monkeypatch):
    """export.py: the run's GGUF --model (run.json's command line) stands in for a converted directory
    that is gone (a cleaned cache, another machine); --base FILE.gguf is taken too."""
    import json

    import export

    root, path, _ = converted
    monkeypatch.setenv("NANOTUNE_CACHE", str(root))
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final" / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(root / "gguf" / "gone-0123456789ab")}))
    (tmp_path / "run" / "run.json").write_text(json.dumps({"argv": ["train.py", "--model", str(smollm2_gguf)]}))
    adapter, out = str(tmp_path / "run" / "final"), str(tmp_path / "merged")
    assert export.find_base(export.ExportConfig(adapter, out)) == path
    assert export.find_base(export.ExportConfig(adapter, out, base=str(smollm2_gguf))) == path
