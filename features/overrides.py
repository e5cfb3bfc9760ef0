"""Model-config overrides: RoPE scaling for longer contexts, and any other Hugging Face config field.

    python train.py --model llama3-8b --rope-scaling yarn --rope-factor 4 --seq-len 32768
    python train.py --model meta-llama/Llama-3.1-8B --rope-scaling llama3 --rope-factor 8 --rope-original-context 8192
    python train.py --config-overrides '{"attention_dropout": 0.1, "rms_norm_eps": 1e-6}'

Applied to the transformers config before the weights are built or loaded (presets and hub
models alike), in transformers 5's `rope_parameters` form: the rope type, the factor, and the
original context; `max_position_embeddings` becomes original context x factor (dynamic: the
original context, past which transformers rescales with the input length). The base theta
stays the model's own. Types: linear (position interpolation), dynamic (NTK-aware, grows with
the input), yarn (Peng et al., 2023, arXiv:2309.00071), llama3 (Llama 3.1's frequency-banded
scaling, low/high frequency factors 1 and 4).
"""

import dataclasses
import json
import math
from typing import Literal

from core import UserError


@dataclasses.dataclass
class OverridesConfig:
    rope_scaling: Literal["none", "linear", "dynamic", "yarn", "llama3"] = "none"
    """RoPE scaling type, to train beyond the model's original context."""
    rope_factor: float = 1.0
    """RoPE scaling factor (> 1 with --rope-scaling): the context grows by this much."""
    rope_original_context: int = 0
    """The context the model was trained on (0: its max_position_embeddings)."""
    config_overrides: str = ""
    """A JSON object of Hugging Face config fields to set, e.g. '{"attention_dropout": 0.1}'."""


def validate(cfg) -> None:
    o = cfg.overrides
    if o.rope_scaling != "none" and o.rope_factor <= 1:
        raise UserError(f"--rope-scaling {o.rope_scaling} needs --rope-factor > 1 (got {o.rope_factor})")
    if o.rope_scaling == "none" and (o.rope_factor != 1.0 or o.rope_original_context):
        raise UserError("--rope-factor / --rope-original-context set without --rope-scaling; add --rope-scaling TYPE")
    if o.rope_original_context < 0:
        raise UserError(f"--rope-original-context must be >= 0 (got {o.rope_original_context})")
    _parse_overrides(o.config_overrides)


def _parse_overrides(text: str) -> dict:
    if not text.strip():
        return {}
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--config-overrides: not valid JSON ({e.msg} at column {e.colno}); "
                        f"pass an object like '{{\"attention_dropout\": 0.1}}'") from e
    if not isinstance(fields, dict):
        raise UserError("--config-overrides must be a JSON object of config fields, e.g. '{\"rms_norm_eps\": 1e-6}'")
    return fields


def _rope_parameters(config, cfg: OverridesConfig) -> dict:
    original = cfg.rope_original_context or config.max_position_embeddings
    theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", 10000.0))
    params = {"rope_type": cfg.rope_scaling, "rope_theta": theta, "factor": float(cfg.rope_factor)}
    if cfg.rope_scaling in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = original
    if cfg.rope_scaling == "llama3":
        params.update(low_freq_factor=1.0, high_freq_factor=4.0)
    return params


def apply_overrides(config, cfg: OverridesConfig):
    """The config with RoPE scaling and the JSON overrides set (unknown fields are refused)."""
    if cfg.rope_scaling != "none":
        original = cfg.rope_original_context or config.max_position_embeddings
        config.rope_parameters = _rope_parameters(config, cfg)
        # dynamic NTK scales only past max_position_embeddings, which is therefore the original context
        config.max_position_embeddings = original if cfg.rope_scaling == "dynamic" else int(original * cfg.rope_factor)
    for key, value in _parse_overrides(cfg.config_overrides).items():
        if not hasattr(config, key):
            raise UserError(f"--config-overrides: {type(config).__name__} has no field {key!r}")
        setattr(config, key, value)
    if hasattr(config, "validate_rope"):
        try:
            config.validate_rope()
        except (ValueError, KeyError) as e:
            raise UserError(f"--rope-scaling {cfg.rope_scaling}: transformers refused it ({e})") from e
    return config


def context_notice(cfg, config) -> str | None:
    """The log's line on the context (cfg: train.py's Config): what --rope-scaling made of it, and a
    --seq-len past it, whose positions the model never saw in pretraining (trained all the same)."""
    o, seq, context = cfg.overrides, cfg.data.seq_len, getattr(config, "max_position_embeddings", None)
    if not context:
        return None
    if o.rope_scaling == "dynamic":
        return f"context: --rope-scaling dynamic rescales RoPE past {context:,} tokens, with each sequence's length"
    scaled = f"--rope-scaling {o.rope_scaling} x{o.rope_factor:g} makes the context {context:,} tokens"
    if seq <= context:
        return f"context: {scaled}" if o.rope_scaling != "none" else None
    factor = 2 ** math.ceil(math.log2(seq * (o.rope_factor if o.rope_scaling != "none" else 1) / context))
    past = (f"--seq-len {seq:,} is past the model's context of {context:,} tokens (max_position_embeddings): "
            f"positions past it were never pretrained; --rope-scaling yarn --rope-factor {factor:g} stretches it")
    return f"context: {scaled}, and {past}" if o.rope_scaling != "none" else f"context: {past}"
