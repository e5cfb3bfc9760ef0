"""Load the model and tokenizer: a Hugging Face id, a local path, or a named preset.

    python train.py --model tiny-llama                 # random weights, embedded tokenizer (CPU)
    python train.py --model llama3-8b --precision bf16  # Llama-3.1-8B shape, random weights
    python train.py --model meta-llama/Llama-3.1-8B     # real weights from the hub or a local dir

Presets are architecture shapes with random weights, for tests and benchmarks; they use the
tokenizer kept in `data/tokenizer` (their vocabulary is never smaller than its). Precision:
`fp32`; `bf16` stores weights in bf16 (pure bf16 training, the memory-frugal choice; a full
fine-tune's small updates round away, which `--optimizer adamw-sr` keeps on average);
`bf16-mixed` keeps fp32 weights and runs matmuls under bf16 autocast (what HF Trainer's
`bf16=True` does); `auto` is chosen by core/defaults.py (a frozen base in bf16 on a GPU).
"""

import contextlib
import dataclasses
import functools
import logging
import math
import os
import sys
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro

from core import UserError

EMBEDDED_TOKENIZER = Path(__file__).resolve().parent.parent / "data" / "tokenizer"

# tiny-*: ~1M parameters, sized so that the embedded demo learns on a 2-core CPU within minutes
_TINY = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
_LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=8192)

# name -> (transformers config class name, config fields). Shapes follow the published configs.
PRESETS: dict[str, tuple[str, dict]] = {
    "tiny-llama": ("LlamaConfig", dict(_TINY, num_key_value_heads=4)),
    "tiny-qwen2": ("Qwen2Config", dict(_TINY, tie_word_embeddings=True)),
    "tiny-mistral": ("MistralConfig", dict(_TINY, sliding_window=16)),
    "tiny-gemma": ("GemmaConfig", dict(_TINY, head_dim=32)),
    "llama3.2-1b": ("LlamaConfig", dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
        tie_word_embeddings=True, rope_parameters=dict(_LLAMA3_ROPE, factor=32.0), rms_norm_eps=1e-5)),
    "llama3.2-3b": ("LlamaConfig", dict(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
        tie_word_embeddings=True, rope_parameters=dict(_LLAMA3_ROPE, factor=32.0), rms_norm_eps=1e-5)),
    "llama3-8b": ("LlamaConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
        rope_parameters=_LLAMA3_ROPE, rms_norm_eps=1e-5)),
    "qwen2.5-7b": ("Qwen2Config", dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0), rms_norm_eps=1e-6)),
    "mistral-7b": ("MistralConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32768, max_position_embeddings=32768,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0), rms_norm_eps=1e-5)),
}
PRESETS["llama3.1-8b"] = PRESETS["llama3-8b"]


@dataclasses.dataclass
class ModelConfig:
    path: Annotated[str, tyro.conf.arg(name="model")] = "tiny-llama"
    """Hugging Face id (org/name), local directory, a GGUF file (converted once: core/gguf.py), or a random-weight preset: tiny-llama, tiny-qwen2, tiny-mistral, tiny-gemma, llama3.2-1b, llama3.2-3b, llama3-8b (= llama3.1-8b), qwen2.5-7b, mistral-7b."""  # noqa: E501
    tokenizer: str | None = None
    """Tokenizer id or path; default: the model's own (presets: data/tokenizer)."""
    precision: Literal["auto", "fp32", "bf16", "bf16-mixed"] = "auto"
    """Weights and compute dtype (see the module docstring); auto: on a bf16 GPU, bf16 for a frozen base (LoRA/QLoRA) and bf16-mixed for a full fine-tune; fp32 on CPU."""  # noqa: E501
    trust_remote_code: bool = False
    """Allow model code shipped with a hub checkpoint (only for repos you trust)."""


def resolve_precision(cfg: ModelConfig, device: torch.device) -> str:
    if cfg.precision == "auto":
        return "bf16-mixed" if device.type == "cuda" else "fp32"
    return cfg.precision


def autocast(precision: str, device: torch.device):
    """The forward-pass context for a precision: bf16 autocast for bf16-mixed, else nothing."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _is_preset(path: str) -> bool:
    return path in PRESETS


def _check_source(path: str, flag: str) -> None:
    if _is_preset(path) or os.path.isdir(path) or "/" in path and not path.startswith((".", "/")):
        return
    raise UserError(f"{flag} {path!r}: not a preset ({', '.join(PRESETS)}), not a local directory, "
                    f"and not a hub id of the form org/name")


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    flag = "--tokenizer" if cfg.tokenizer else "--model"
    source = cfg.tokenizer or (str(EMBEDDED_TOKENIZER) if _is_preset(cfg.path) else cfg.path)
    _check_source(source, flag)
    _quiet_hub_retries()
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        if "couldn't connect" in str(e):  # the first file a hub id needs: fail here, not again for the config
            raise UserError(f"{flag} {source!r} is not a local directory, and the Hugging Face hub cannot be "
                            f"reached to fetch it; pass a local directory (or run where the hub is reachable; "
                            f"a model in the hub's local cache loads with HF_HUB_OFFLINE=1)") from e
        raise UserError(f"could not load the tokenizer from {source!r} ({_first_line(e)}); "
                        f"check the path/id, or pass --tokenizer") from e
    if tok.eos_token_id is None:
        raise UserError(f"tokenizer {source!r} has no eos token; pass a --tokenizer that defines one")
    if tok.pad_token_id is None:  # padded positions are masked out, so any id works as padding
        tok.pad_token = tok.eos_token
    return tok


def load_config(cfg: ModelConfig, tokenizer):
    """The model's transformers config: the preset's shape, or the checkpoint's config.json."""
    import transformers

    _check_source(cfg.path, "--model")
    if _is_preset(cfg.path):
        cls_name, fields = PRESETS[cfg.path]
        config = getattr(transformers, cls_name)(**fields)
        config.vocab_size = max(fields.get("vocab_size", 0), len(tokenizer))  # tiny: the tokenizer's
        config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        config.bos_token_id = tokenizer.bos_token_id
        return config
    try:
        return transformers.AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load --model {cfg.path!r} ({_first_line(e)})") from e


def load_model(cfg: ModelConfig, config, device: torch.device, attn_implementation: str = "sdpa",
               quantization_config=None):
    """The model on `device`, in the storage dtype of the resolved precision, in train mode; its
    decoder linears in 4/8-bit when given a bitsandbytes `quantization_config` (--qlora, --lora-8bit)."""
    import transformers

    dtype = torch.bfloat16 if resolve_precision(cfg, device) == "bf16" else torch.float32
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation)
    if _is_preset(cfg.path):
        with torch.device(device):  # initialise on the target device: 8B on CPU takes minutes
            model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
        if quantization_config is not None:  # from_config takes no quantization config (transformers 5)
            from core.quantize import quantize_base

            model = quantize_base(model, quantization_config)
    else:
        transformers.utils.logging.disable_progress_bar()  # a "Loading weights" bar in a run's log is noise
        try:  # a quantized model cannot be moved after loading: place it while loading
            model = transformers.AutoModelForCausalLM.from_pretrained(
                cfg.path, config=config, trust_remote_code=cfg.trust_remote_code, device_map={"": device},
                quantization_config=quantization_config, **kwargs)
        except (OSError, ValueError) as e:
            raise UserError(f"could not load --model {cfg.path!r} ({_first_line(e)})") from e
    model.config.use_cache = False  # training never reuses the KV cache (the saved model's config has it on)
    return model.train()


def decoder_blocks(model) -> list[torch.nn.Module]:
    """The decoder layers, in order, found by transformers' layer class (what activation checkpointing,
    --fp8-base and compile walk). Sharding finds its blocks by layout instead (core/distributed.py
    attention_blocks: a ModuleList of layers with self_attn), which also serves remote-code models."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def check_vocab(config, tokenizer, path: str) -> None:
    if len(tokenizer) > config.vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but --model {path!r} embeds "
                        f"{config.vocab_size}; pass a matching --tokenizer")


@functools.cache
def _quiet_hub_retries() -> None:
    """huggingface_hub logs two lines per retry of an unanswered request (five retries over 23 s, and
    a tokenizer asks twice): one line of ours instead, at the first."""
    said = []

    def keep(record) -> bool:
        message = record.getMessage()
        if "thrown while requesting" not in message and not message.startswith("Retrying in "):
            return True
        if not said:
            print("hub: the Hugging Face hub does not answer; retrying for up to a minute", file=sys.stderr,
                  flush=True)
            said.append(True)
        return False
    logging.getLogger("huggingface_hub.utils._http").addFilter(keep)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _numel(p: torch.Tensor) -> int:
    quant_state = getattr(p, "quant_state", None)  # a bitsandbytes 4-bit weight packs 2 per byte
    if quant_state is not None:
        return math.prod(quant_state.shape)
    # a ZeRO-3 parameter is empty (numel 0) outside a gather; DeepSpeed keeps its full size in ds_numel
    return getattr(p, "ds_numel", None) or p.numel()


def count_params(model) -> tuple[int, int]:
    """(total, trainable) parameter counts, quantized weights counted as the matrices they stand for,
    also a frozen weight kept as buffers (a module's `buffered_weight_numel`, as --fp8-base's copies)."""
    total = sum(_numel(p) for p in model.parameters())
    total += sum(getattr(m, "buffered_weight_numel", 0) for m in model.modules())
    return total, sum(_numel(p) for p in model.parameters() if p.requires_grad)


def train_flops(model) -> tuple[float, float]:
    """Model FLOPs of a training step, as (per token, per squared document length): a batch costs
    per_token * tokens + per_sq * sum(len(doc)^2 for its documents). Recompute is not counted.

    Matmuls: 6 N per token when all weights train (forward 2N, backward 4N), 4 N when the base is
    frozen (its weight gradients are skipped), N = non-embedding parameters + the output
    projection. Attention scores and values: 12 * layers * heads * head_dim per token per token of
    context, forward + backward (PaLM's MFU definition, causal masking not discounted), summed over
    documents, so padding and packed neighbours are not counted as work.
    """
    cfg = model.config
    emb = _numel(model.get_input_embeddings().weight)
    total, trainable = count_params(model)
    n = total - emb + (emb if getattr(cfg, "tie_word_embeddings", False) else 0)
    per_param = 6 if trainable >= 0.5 * total else 4  # adapters train a few %, a full fine-tune all but buffers
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return per_param * n, 12 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim
