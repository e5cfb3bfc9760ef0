"""Quantization-aware training (QAT) through torchao: train with fake-quantized linears, export int4.

    python train.py --qat --qat-scheme int8-int4 --qat-group-size 32          # full fine-tune
    python train.py --lora --qat --qat-scheme int4 --qat-start-step 200       # LoRA, QAT from step 200

Prepare swaps every decoder nn.Linear (never lm_head or the embeddings) for torchao's
FakeQuantizedLinear: the forward rounds the weights (and with int8-int4 the activations) to the
integer grid and back, the backward passes gradients straight through, so training learns weights
that survive the rounding. --qat-start-step N leaves the fake quantizers off until optimizer step N
(an optimizer post-step hook switches them on, not a branch in the loop): a plain warm-up first
is common practice. At the end, convert quantizes the linears for real with the same scheme; the
run writes the plain model to final/ as usual and the quantized one to final-quantized/
(`load_quantized` reads it back). Schemes (symmetric int4 weights in groups of --qat-group-size
input channels; int3 / int2 likewise with 3 / 2 bits):
  int8-int4  int8 per-token asymmetric dynamic activations + int4 weights (torchao's 8da4w, the
             ExecuTorch / mobile recipe; Int8DynamicActivationIntxWeightConfig)
  int4       int4 weight-only (IntxWeightOnlyConfig; the unpacked int8 storage runs on any device)
  int3, int2 3- / 2-bit weight-only, same config: where post-training quantization loses more and
             QAT has more to recover (benchmarks/qat.py measures it on the embedded task)
With LoRA the fake quantizers act on the frozen base weights (torchtune's QAT + LoRA recipe); the
quantized export merges the adapter into the base first, so it quantizes base + update, which the
training did not see exactly.

Reference: torchao QAT (QATConfig prepare / convert, torchao 0.18; checked on CPU with torch 2.13);
"Quantization-Aware Training for Large Language Models with PyTorch" (PyTorch blog, 2024); LLM-QAT
(Liu et al., 2023, arXiv:2305.17888).
Works with: full fine-tuning, --lora, --precision fp32 / bf16 / bf16-mixed, DDP, --packing, --ac.
Refused with: --qlora / --lora-8bit / --gptq (the base is already quantized), --fp8 (two fake
numerics on one matmul).
"""

import dataclasses
import json
from pathlib import Path
from typing import Literal

import torch

from core import UserError, optional

optional.quiet_torchao()  # torchao prints at import: filtered before --qat or --fp8 imports it


@dataclasses.dataclass
class QatConfig:
    qat: bool = False
    """Quantization-aware training: fake-quantize the decoder linears while training (needs torchao)."""
    qat_scheme: Literal["int8-int4", "int4", "int3", "int2"] = "int8-int4"
    """int8-int4: int8 dynamic activations + int4 weights; int4 / int3 / int2: 4- / 3- / 2-bit weights only."""
    qat_group_size: int = 32
    """Input channels sharing one weight scale; must divide every decoder linear's input size."""
    qat_start_step: int = 1
    """Optimizer step from which the fake quantizers are on (earlier steps train in full precision)."""


def validate(cfg) -> None:
    """Refuse bad values (QAT on an already-quantized base: core/compat.py)."""
    q = cfg.qat
    changed = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(q)
               if f.name != "qat" and getattr(q, f.name) != f.default]
    if changed and not q.qat:
        raise UserError(f"{', '.join(changed)} set but --qat is off; add --qat")
    if q.qat_group_size < 1 or q.qat_group_size & (q.qat_group_size - 1):
        raise UserError(f"--qat-group-size must be a power of two like 32 or 128 (got {q.qat_group_size})")
    if q.qat_start_step < 1:
        raise UserError(f"--qat-start-step must be at least 1 (got {q.qat_start_step})")


def _torchao():
    try:
        import torchao.quantization as tq
        from torchao.quantization import qat
    except ImportError as e:
        raise UserError(f"--qat needs torchao (pip install 'torchao>=0.18'): {e}") from e
    return tq, qat


def base_config(cfg: QatConfig):
    """torchao's post-training quantization config of the scheme (QAT infers its fake quantizers from it)."""
    tq, _ = _torchao()
    from torchao.quantization.granularity import PerGroup

    if cfg.qat_scheme == "int8-int4":
        return tq.Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                        weight_granularity=PerGroup(cfg.qat_group_size))
    bits = {"int4": torch.int4, "int3": torch.int3, "int2": torch.int2}[cfg.qat_scheme]
    return tq.IntxWeightOnlyConfig(weight_dtype=bits, granularity=PerGroup(cfg.qat_group_size))


def _decoder_linears(model) -> dict[str, torch.nn.Linear]:
    head = model.get_output_embeddings()
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head and ".lora_" not in f".{name}"}


def apply_qat(model, cfg: QatConfig):
    """Swap the decoder linears for fake-quantized ones (prepare), in place; returns the model."""
    tq, qat = _torchao()
    linears = _decoder_linears(model)
    odd = sorted({m.in_features for m in linears.values() if m.in_features % cfg.qat_group_size})
    if odd:
        raise UserError(f"--qat-group-size {cfg.qat_group_size} does not divide the input size {odd[0]} of "
                        f"some linear layers; pick a group size that divides {', '.join(map(str, odd))}")
    chosen = set(linears.values())
    tq.quantize_(model, qat.QATConfig(base_config(cfg), step="prepare"), filter_fn=lambda m, _: m in chosen)
    set_fake_quant(model, cfg.qat_start_step <= 1)
    return model


def set_fake_quant(model, enabled: bool) -> int:
    """Switch every fake quantizer of the model on or off; returns how many there are."""
    _, qat = _torchao()
    quantizers = [m for m in model.modules() if isinstance(m, qat.FakeQuantizerBase)]
    for q in quantizers:
        q.enabled = enabled
    return len(quantizers)


def schedule(model, optimizer, cfg: QatConfig, steps_done: int = 0):
    """Turn the fake quantizers on from optimizer step --qat-start-step: now if that step is
    reached (also on resume), else through an optimizer post-step hook. Returns the hook handle or None."""
    if steps_done + 1 >= cfg.qat_start_step:
        set_fake_quant(model, True)
        return None
    set_fake_quant(model, False)
    done = [steps_done]

    def on_step(opt, args, kwargs):
        done[0] += 1
        if done[0] + 1 >= cfg.qat_start_step:  # the next forward belongs to step qat_start_step
            set_fake_quant(model, True)
            handle.remove()

    handle = optimizer.register_step_post_hook(on_step)
    return handle


def convert(model, cfg: QatConfig):
    """Quantize for real what prepare faked (in place): a LoRA adapter is merged into its base first."""
    tq, qat = _torchao()
    if hasattr(model, "merge_and_unload"):  # peft: quantize base + adapter update, as it will be served
        model = model.merge_and_unload()
    tq.quantize_(model, qat.QATConfig(base_config(cfg), step="convert"),
                 filter_fn=lambda m, _: isinstance(m, qat.FakeQuantizedLinear))
    return model


def export(model, tokenizer, out_dir, cfg: QatConfig, plain_dir=None, say=print) -> Path | None:
    """Convert (consumes `model`) and write config, tokenizer, weights (torchao tensors) and the scheme.

    A sharded model (FSDP2 / TP: DTensor weights) is not converted in place: the full fine-tune's
    gathered final model in `plain_dir` is loaded on this rank and quantized with the same config
    (what convert does after swapping the fake-quantized layers back); a sharded adapter is skipped.
    """
    import torchao

    from core.checkpoint import final_dir, kv_cache_on

    if _sharded(model):
        if plain_dir is None or hasattr(model, "peft_config"):
            say("qat: final-quantized/ skipped: convert a sharded LoRA run from its merged final model "
                "(python export.py, then features.qat.quantize_dir)")
            return None
        model = quantize_dir(plain_dir, cfg)
    else:
        model = convert(model, cfg)
    out = Path(out_dir)
    with final_dir(out) as tmp:
        tmp.mkdir(parents=True)
        with kv_cache_on(model.config):  # for generation, as the other saved models
            model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # torch.save, not safetensors: save_pretrained cannot write torchao tensor subclasses
        # without a TorchAoConfig load path (transformers 5.24)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp / "model.pt")
        (tmp / "quantization.json").write_text(json.dumps(
            {"qat_scheme": cfg.qat_scheme, "qat_group_size": cfg.qat_group_size,
             "torchao": torchao.__version__}, indent=2))
    say(f"saved the quantized model to {out}")
    return out


def _sharded(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def quantize_dir(path, cfg: QatConfig):
    """A plain HF model directory quantized with the scheme's config (CPU): QAT's convert, or PTQ."""
    import transformers

    tq, _ = _torchao()
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    chosen = set(_decoder_linears(model).values())
    tq.quantize_(model, base_config(cfg), filter_fn=lambda m, _: m in chosen)
    return model


def load_quantized(path, device="cpu"):
    """The model written by `export`, with its quantized linears (torchao tensors), in eval mode."""
    import transformers

    _torchao()  # registers torchao's tensor types as safe to load
    path = Path(path)
    config = transformers.AutoConfig.from_pretrained(path)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config)
    state = torch.load(path / "model.pt", map_location=device, weights_only=True)
    missing, unexpected = model.load_state_dict(state, assign=True, strict=False)
    head = [n for n in missing if config.tie_word_embeddings and n.startswith("lm_head.")]
    if unexpected or set(missing) - set(head):
        raise UserError(f"{path / 'model.pt'} does not match its config.json (missing {missing}, "
                        f"unexpected {unexpected})")
    if head:
        model.tie_weights()  # a tied head is saved once
    return model.to(device).eval()


def apply(model, cfg, run):
    """--qat: fake-quantized decoder linears (switched on at --qat-start-step by `schedule`)."""
    return apply_qat(model, cfg.qat)
