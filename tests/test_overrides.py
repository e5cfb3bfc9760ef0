"""RoPE scaling and config overrides change the model config as asked, and a long input runs."""

import pytest
import torch

from conftest import config as train_config
from core import UserError
from core.model import ModelConfig, load_config, load_model
from features.overrides import OverridesConfig, apply_overrides, validate


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn", "llama3"])
def test_rope_scaling_sets_the_config_and_a_long_input_runs(tok, kind):
    cfg = OverridesConfig(rope_scaling=kind, rope_factor=4.0, rope_original_context=64)
    validate(train_config(overrides=cfg))
    config = apply_overrides(load_config(ModelConfig("tiny-llama"), tok), cfg)
    assert config.rope_parameters["rope_type"] == kind and config.rope_parameters["factor"] == 4.0
    assert config.max_position_embeddings == (64 if kind == "dynamic" else 256)
    if kind in ("yarn", "llama3"):
        assert config.rope_parameters["original_max_position_embeddings"] == 64
    torch.manual_seed(0)
    scaled = load_model(ModelConfig("tiny-llama"), config, torch.device("cpu"))
    torch.manual_seed(0)
    plain = load_model(ModelConfig("tiny-llama"), load_config(ModelConfig("tiny-llama"), tok), torch.device("cpu"))
    ids = torch.randint(4, 400, (1, 250))  # past the original 64-token context
    with torch.no_grad():
        a, b = scaled(ids).logits, plain(ids).logits
    assert torch.isfinite(a).all()
    assert not torch.allclose(a, b)  # the scaling reaches the rotary embedding


def test_config_overrides_set_fields_and_refuse_unknown_ones(tok):
    config = apply_overrides(load_config(ModelConfig("tiny-qwen2"), tok),
                             OverridesConfig(config_overrides='{"rms_norm_eps": 0.001, "attention_dropout": 0.1}'))
    assert config.rms_norm_eps == 0.001 and config.attention_dropout == 0.1
    with pytest.raises(UserError, match="has no field 'not_a_field'"):
        apply_overrides(load_config(ModelConfig("tiny-qwen2"), tok),
                        OverridesConfig(config_overrides='{"not_a_field": 1}'))


@pytest.mark.parametrize("cfg, message", [
    (OverridesConfig(rope_scaling="yarn"), "needs --rope-factor > 1"),
    (OverridesConfig(rope_factor=2.0), "without --rope-scaling"),
    (OverridesConfig(config_overrides="{bad json"), "--config-overrides: not valid JSON"),
    (OverridesConfig(config_overrides="[1, 2]"), "must be a JSON object"),
])
def test_bad_override_flags_are_refused(cfg, message):
    with pytest.raises(UserError, match=message):
        validate(train_config(overrides=cfg))


def test_train_py_with_rope_scaling(tmp_path, small_data):
    import json

    from conftest import run_train

    out = tmp_path / "run"
    assert run_train(out, "--dataset", str(small_data), "--max-steps", "2", "--micro-batch-size", "4",
                     "--rope-scaling", "linear", "--rope-factor", "2") == 0
    saved = json.loads((out / "final" / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == "linear" and saved["max_position_embeddings"] == 8192


@pytest.mark.parametrize("rope, seq_len, want", [
    ({}, 4096, None),  # inside tiny-llama's 4,096-token context: nothing to say
    ({}, 10240, ["context: --seq-len 10,240 is past the model's context of 4,096 tokens (max_position_embeddings): "
                 "positions past it were never pretrained; --rope-scaling yarn --rope-factor 4 stretches it"]),
    ({"rope_scaling": "yarn", "rope_factor": 2.0}, 8192, ["context: --rope-scaling yarn x2 makes the context 8,192 "
                                                          "tokens"]),
    ({"rope_scaling": "yarn", "rope_factor": 2.0}, 10000, ["--rope-scaling yarn x2 makes the context 8,192 tokens, and "
                                                           "--seq-len 10,000 is past", "--rope-factor 4 stretches it"]),
    ({"rope_scaling": "dynamic", "rope_factor": 2.0}, 10000, ["context: --rope-scaling dynamic rescales RoPE past "
                                                              "4,096 tokens"]),
])
def test_the_log_says_what_the_context_is_and_when_seq_len_passes_it(tok, rope, seq_len, want):
    from features.overrides import context_notice

    cfg = train_config(overrides=OverridesConfig(**rope), **{"data.seq_len": seq_len})
    config = apply_overrides(load_config(ModelConfig("tiny-llama"), tok), cfg.overrides)
    notice = context_notice(cfg, config)
    assert notice is None if want is None else all(part in notice for part in want), notice
