"""LoRA adapters through peft, on a bf16/fp32 base, a 4-bit NF4 base (QLoRA) or an 8-bit base.

    python train.py --lora --lora-rank 16 --lora-alpha 32            # bf16/fp32 frozen base
    python train.py --qlora --precision bf16 --lora-rank 64          # NF4 base, bf16 embeddings/norms
    python train.py --lora-8bit --lora-targets q_proj,v_proj         # LLM.int8 base, two targets
    python train.py --lora --rslora --dora                           # alpha/sqrt(r) scaling, DoRA
    python export.py --adapter runs/x/final --out merged/            # merge into the base (HF format)

The base is frozen; only lora_A / lora_B (and DoRA's magnitude vector) train, kept in fp32 even on
a bf16 base (peft's autocast_adapter_dtype): mixed-precision adapters are standard and more
accurate. --lora-targets all-linear adapts every linear layer of the decoder (attention and MLP
projections), never lm_head. --qlora stores every decoder linear weight in NF4 with double
quantization and computes in bf16; --lora-8bit stores them in LLM.int8 (embeddings, norms and
lm_head keep the --precision dtype). The quantization config goes to from_pretrained; presets
(from_config takes none, transformers 5.24) are quantized in place by core/quantize.py, bit for
bit the same. Checkpoints hold the trainable parameters only: the adapter and its optimizer state.
The final model is the adapter in peft's format (PeftModel.from_pretrained, vLLM); a preset's
random base is saved beside it in base/, since no model id can reproduce it. `merge_and_save`
(export.py) merges into the base loaded unquantized: merged into a 4-bit base the sum would be
rounded back to 4 bits.

References: LoRA (Hu et al., 2021, arXiv:2106.09685); QLoRA (Dettmers et al., 2023,
arXiv:2305.14314); LLM.int8() (Dettmers et al., 2022, arXiv:2208.07339); rsLoRA (Kalajdzievski,
2023, arXiv:2312.03732); DoRA (Liu et al., 2024, arXiv:2402.09353); huggingface/peft, bitsandbytes.
Works with: --packing, --attn sdpa / eager / flash (checked; peft passes attention kwargs through),
--precision fp32 / bf16 / bf16-mixed, DDP, checkpoints and --resume; --qlora / --lora-8bit on CUDA
and on CPU (bitsandbytes 0.50.2).
Does not work with: two of --lora / --qlora / --lora-8bit at once.
"""

import contextlib
import copy
import dataclasses
import json
import logging
import warnings
from pathlib import Path

import torch

from core import UserError, optional
from core.config import adapters_on

# bitsandbytes 0.50.2 on an AVX512-BF16 CPU fetches a hub kernel for 4-bit inference at import and logs
# when it cannot; training never runs that kernel (_work_around_bitsandbytes switches that path off)
optional.drop_records("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward")


@dataclasses.dataclass
class LoraConfig:
    lora: bool = False
    """Train a LoRA adapter on a frozen bf16/fp32 base (the --precision dtype)."""
    qlora: bool = False
    """Train a LoRA adapter on a 4-bit NF4 base (double quantization, bf16 compute; needs bitsandbytes)."""
    lora_8bit: bool = False
    """Train a LoRA adapter on an LLM.int8 8-bit base (needs bitsandbytes)."""
    lora_rank: int = 16
    """Rank r of the adapter matrices."""
    lora_alpha: float = 32.0
    """Scale numerator: the update is scaled by alpha/r (alpha/sqrt(r) with --rslora)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input."""
    lora_targets: str = "all-linear"
    """Comma-separated module names to adapt (e.g. q_proj,v_proj), or all-linear: every decoder linear, not lm_head."""
    rslora: bool = False
    """Rank-stabilized LoRA: scale by alpha/sqrt(r) instead of alpha/r."""
    dora: bool = False
    """DoRA: learn a per-output magnitude on top of the low-rank direction update."""


def quantized_base(cfg: LoraConfig) -> str:
    """For the run's model line: the frozen base's storage, when it is quantized."""
    return ", base in 4-bit NF4" if cfg.qlora else ", base in 8-bit" if cfg.lora_8bit else ""


def validate(cfg) -> None:
    """Refuse meaningless settings, naming the flags and the fix (two adapter modes: core/compat.py)."""
    c = cfg.lora
    changed = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(c)
               if f.name not in ("lora", "qlora", "lora_8bit") and getattr(c, f.name) != f.default]
    if changed and not adapters_on(c):
        raise UserError(f"{', '.join(changed)} set but no adapter is on; add --lora, --qlora or --lora-8bit")
    checks = [(c.lora_rank >= 1, f"--lora-rank must be at least 1 (got {c.lora_rank})"),
              (c.lora_alpha > 0, f"--lora-alpha must be positive (got {c.lora_alpha})"),
              (0 <= c.lora_dropout < 1, f"--lora-dropout must be in [0, 1) (got {c.lora_dropout})"),
              (bool(target_modules(c)), "--lora-targets is empty; pass module names like q_proj,v_proj or all-linear")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def target_modules(cfg: LoraConfig) -> str | list[str]:
    """--lora-targets as peft takes it: "all-linear", or the list of module names."""
    if cfg.lora_targets.strip() == "all-linear":
        return "all-linear"  # peft's shorthand: every nn.Linear (bnb ones too) except the output layer
    return [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]


def apply_lora(model, cfg: LoraConfig):
    """The peft model: adapters on the targets, base frozen, adapter weights in fp32."""
    import peft

    config = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                             target_modules=target_modules(cfg), use_rslora=cfg.rslora, use_dora=cfg.dora,
                             bias="none", task_type="CAUSAL_LM")
    # No prepare_model_for_kbit_training: its fp32 upcast of every bf16 weight (embeddings included)
    # is for fp16 training, which we never do; freezing is get_peft_model's; checkpointing is not ours.
    try:
        model = peft_model(model, config)
    except ValueError as e:
        if "not found in the base model" not in str(e):
            raise
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserError(f"--lora-targets {cfg.lora_targets}: no such module in this model; its linear layers "
                        f"are {','.join(names)} (or pass all-linear)") from e
    _work_around_bitsandbytes(model)
    return model


def peft_model(model, config):
    """peft.get_peft_model, adapter weights in fp32."""
    import peft

    with _peft_wrapping():
        return peft.get_peft_model(model, config, autocast_adapter_dtype=True)


@contextlib.contextmanager
def _peft_wrapping():
    """peft 0.21 reads transformers 5.24's deprecated `is_gradient_checkpointing` as it wraps a model; the
    FutureWarning is addressed to peft."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        yield


def _work_around_bitsandbytes(model) -> None:
    """Two behaviours of bitsandbytes 0.50.2 that a training loop cannot live with."""
    for module in model.modules():
        # On AVX512-BF16 CPUs the first no-grad eval forward repacks a 4-bit weight for inference
        # for good, and training then runs a kernel without a backward: the gradient flowing into
        # every 4-bit layer's input is silently lost (tests/test_lora.py checks this).
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    # LLM.int8 casts bf16/fp32 inputs to fp16 by design, and logs a warning saying so on every matmul.
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_not_the_cast_notice)


def _not_the_cast_notice(record: logging.LogRecord) -> bool:
    return "inputs will be cast" not in record.getMessage()


def export(model, tokenizer, out_dir) -> Path:
    """Write the adapter in peft's format + the tokenizer (atomically); a preset's base goes in base/."""
    from transformers.utils import logging as hf_logging

    from core.checkpoint import final_dir, kv_cache_on, stop_at_end_of_turn

    hf_logging.disable_progress_bar()  # a bar per shard drowns the log of a non-interactive run
    out = Path(out_dir)
    generation = copy.deepcopy(getattr(model.get_base_model(), "generation_config", None))
    stop_at_end_of_turn(generation, tokenizer)  # the base's own stops at its eos, maybe not the template's turn end
    with final_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if generation is not None:  # GenerationConfig.from_pretrained(final); merge_and_save gives it the merged model
            generation.save_pretrained(tmp)
        if not model.peft_config["default"].base_model_name_or_path:  # built by from_config: random weights
            base = model.get_base_model()
            with kv_cache_on(base.config):
                base.save_pretrained(tmp / "base", state_dict=_plain_base_weights(base))
    return out


def _plain_base_weights(base) -> dict:
    """The base's weights under their original names: adapters left out, quantized weights dequantized."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    weights = {}
    for name, module in base.named_modules():
        if isinstance(module, BaseTunerLayer) or ".lora_" in f".{name}":
            continue  # the wrapper itself holds no base weights; its base_layer child does
        buffers = [(n, b) for n, b in module.named_buffers(recurse=False)  # as state_dict: not RoPE's inv_freq
                   if n not in module._non_persistent_buffers_set]
        for pname, p in list(module.named_parameters(recurse=False)) + buffers:
            key = f"{name}.{pname}".replace(".base_layer.", ".").lstrip(".")
            quantized = pname == "weight" and p.dtype in (torch.uint8, torch.int8)
            weights[key] = (_dequantized(module).to(base.dtype) if quantized else p).detach().contiguous()
    return weights


def _dequantized(module) -> torch.Tensor:
    # Not peft's dequantize_module_weight: on CPU it replaces an 8-bit weight by a copy without its
    # scales, and the layer's next forward fails (peft 0.21, bitsandbytes 0.50.2).
    import bitsandbytes.functional as F

    w = module.weight
    if hasattr(w, "quant_state"):  # 4-bit
        return F.dequantize_4bit(w.data, w.quant_state)
    scales = w.SCB if w.SCB is not None else module.state.SCB  # after a forward the state holds them
    return F.int8_vectorwise_dequant(w.data, scales)


def merge_and_save(base: str, adapter_dir, out_dir, dtype: str = "auto") -> Path:
    """Load the base unquantized, merge the adapter into its weights, save a plain HF model + tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    from core.checkpoint import atomic_dir
    from core.model import PRESETS

    hf_logging.disable_progress_bar()  # loading and writing bars: noise in a log
    adapter, out = Path(adapter_dir), Path(out_dir)
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"--adapter {adapter}: no adapter_config.json there; pass the final/ directory of a "
                        f"--lora, --qlora or --lora-8bit run")
    if base in PRESETS:
        if not (adapter / "base").is_dir():
            raise UserError(f"--base {base} is a random-weight preset, reproducible only from the run's saved "
                            f"base/; pass --base with the directory of the weights the adapter was trained on")
        base = str(adapter / "base")
    torch_dtype = {"auto": "auto", "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    try:  # no quantization_config: a QLoRA adapter is merged into the full-precision weights
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the base model {base!r} ({str(e).strip().splitlines()[0]}); "
                        f"pass --base with a hub id or directory") from e
    if getattr(model, "hf_quantizer", None) is not None:  # a base saved already quantized
        model = model.dequantize()
    with _peft_wrapping():
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    if (adapter / "generation_config.json").is_file():  # the run's, which stops at the chat template's turn end
        merged.generation_config = GenerationConfig.from_pretrained(adapter)
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer_dir = adapter if (adapter / "tokenizer_config.json").is_file() else base
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
    return out


def base_of(adapter_dir) -> str | None:
    """The base an adapter was trained on: its saved base/, adapter_config.json's, or the run's --model."""
    adapter = Path(adapter_dir)
    if (adapter / "base").is_dir():
        return str(adapter / "base")
    try:
        return json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] or \
            json.loads((adapter.parent / "config.json").read_text())["model"]["path"]
    except (OSError, KeyError, TypeError, ValueError):
        return None


def apply(model, cfg, run):
    """--lora / --qlora / --lora-8bit: peft adapters on the frozen base."""
    return apply_lora(model, cfg.lora)
