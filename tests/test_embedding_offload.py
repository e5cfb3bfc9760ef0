"""--offload-embeddings: the frozen input table moves to the CPU, logits and gradients stay the same,
and what cannot work (trainable or tied embeddings, several processes) is refused."""

import copy

import pytest
import torch

from core import UserError
from features.embedding_offload import apply_embedding_offload
from features.lora import LoraConfig, apply_lora
from core.model import ModelConfig, load_config, load_model


def _lora_model(tok, preset="tiny-llama"):
    torch.manual_seed(0)
    cfg = ModelConfig(path=preset)
    return apply_lora(load_model(cfg, load_config(cfg, tok), torch.device("cpu")), LoraConfig(lora=True, lora_rank=4))


def _logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    logits.float().logsumexp(-1).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-mistral"])
def test_same_logits_and_grads(tok, preset):
    ref = _lora_model(tok, preset)
    off = apply_embedding_offload(copy.deepcopy(ref))
    assert off.get_input_embeddings().forward.__name__ == "_lookup_on_cpu"
    assert [n for n, _ in off.named_parameters()] == [n for n, _ in ref.named_parameters()]
    ids = torch.randint(0, ref.config.vocab_size, (2, 16))
    (la, ga), (lb, gb) = _logits_and_grads(ref, ids), _logits_and_grads(off, ids)
    assert torch.equal(la, lb) and ga.keys() == gb.keys() and ga
    assert all(torch.equal(ga[k], gb[k]) for k in ga)


def test_refuses_trainable_tied_and_distributed(tok):
    cfg = ModelConfig()
    full = load_model(cfg, load_config(cfg, tok), torch.device("cpu"))
    with pytest.raises(UserError, match="input embeddings train"):
        apply_embedding_offload(full)
    with pytest.raises(UserError, match="ties its input embeddings"):
        apply_embedding_offload(_lora_model(tok, "tiny-qwen2"))  # tie_word_embeddings
    with pytest.raises(UserError, match="one process"):
        apply_embedding_offload(_lora_model(tok), world_size=2)


def test_a_tied_table_is_refused_before_the_model_loads(tok):
    from conftest import config
    from core import defaults

    qwen2 = load_config(ModelConfig("tiny-qwen2"), tok)  # tie_word_embeddings: only the config is read
    cfg = config(**{"embedding_offload.offload_embeddings": True, "lora.lora": True})
    with pytest.raises(UserError, match="^--offload-embeddings: this model ties its input embeddings"):
        defaults.embedding_offload(cfg, torch.device("cpu"), qwen2, 1)
    defaults.embedding_offload(cfg, torch.device("cpu"), load_config(ModelConfig("tiny-llama"), tok), 1)  # untied


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_table_leaves_the_gpu(tok):
    cfg = ModelConfig(precision="bf16")
    model = apply_lora(load_model(cfg, load_config(cfg, tok), torch.device("cuda")), LoraConfig(lora=True))
    ids = torch.randint(0, model.config.vocab_size, (2, 16), device="cuda")
    ref = model(input_ids=ids).logits
    apply_embedding_offload(model)
    assert model.get_input_embeddings().weight.device.type == "cpu"
    assert torch.equal(model(input_ids=ids).logits, ref)


def test_train_py_same_losses(tmp_path, small_data):
    from conftest import read_metrics, run_train

    common = ["--dataset", str(small_data), "--lora", "--max-steps", "3", "--log-every", "1",
              "--micro-batch-size", "8", "--skip-export"]
    assert run_train(tmp_path / "plain", *common) == 0
    assert run_train(tmp_path / "off", *common, "--offload-embeddings") == 0
    a, b = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "off")
    assert [m.get("loss") for m in a] == [m.get("loss") for m in b] and len(a) >= 3
