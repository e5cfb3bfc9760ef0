"""LoRA on a GPTQ-quantized checkpoint (4-bit weights, GPTQ format), and a way to make one.

    python -m features.gptq --model runs/x/final --out ckpt/gptq --group-size 32      # quantize (GPTQ)
    python train.py --model ckpt/gptq --gptq --lora --lora-rank 16                     # LoRA on it

A GPTQ checkpoint stores each decoder linear as int4 codes packed 8 per int32 (`qweight`, input
rows), per-group zero points (`qzeros`, stored minus one) and fp16 `scales`, with `g_idx` mapping
input channels to groups: the format of AutoGPTQ / GPTQModel (`checkpoint_format: gptq`) that
transformers, vLLM and TGI load. --gptq loads it through transformers' GPTQ integration when
gptqmodel and optimum are installed and a GPU is used (their Marlin / ExLlama kernels); otherwise
through `GPTQLinear` here: plain PyTorch that dequantizes a layer's weight for its matmul and again
in backward (nothing weight-sized is kept for backward), on any device. The base stays frozen;
peft's GPTQ LoRA layer adds the adapter. The final adapter is saved in peft's format; merging it
needs the unquantized base (export.py --base).

`make_checkpoint` (the command above) quantizes a model with the GPTQ algorithm (Frantar et al.):
each weight column is rounded in turn and its error spread over the columns not yet rounded,
weighted by the inverse Hessian of the layer's inputs. The inputs come from one pass of the
unquantized model over calibration samples of the training data (the reference recomputes them
layer by layer through the already-quantized layers); symmetric 4-bit, act-order off.

Reference: GPTQ (Frantar et al., 2022, arXiv:2210.17323); AutoGPTQ / GPTQModel packing; peft's
GPTQLoraLinear. Checked on CPU (torch 2.13, transformers 5.24, peft 0.21) with GPTQLinear; the
gptqmodel kernels need a CUDA machine with gptqmodel installed.
Works with: --lora (--lora-rank/alpha/dropout/targets, --rslora), --precision bf16 / fp32 / bf16-mixed,
--packing, --ac. Refused with: no --lora, --dora, --lora-kernels, --qlora / --lora-8bit, --fp8, --qat.
"""

import dataclasses
import json
from pathlib import Path

import torch

from core import UserError

BITS = 4
PACK = 32 // BITS  # int4 codes per int32


@dataclasses.dataclass
class GptqConfig:
    gptq: bool = False
    """--model is a GPTQ checkpoint (4-bit, GPTQ format): train a LoRA adapter (--lora) on its frozen base."""


# ---------------------------------------------------------------------------- the format


def pack(codes: torch.Tensor) -> torch.Tensor:
    """int codes in [0, 15], packed 8 per int32 along dim 0 (GPTQ's qweight layout for (in, out) codes)."""
    c = codes.to(torch.int64).reshape(codes.shape[0] // PACK, PACK, *codes.shape[1:])
    shifts = (torch.arange(PACK) * BITS).view(1, PACK, *[1] * (codes.dim() - 1))
    return (c << shifts).sum(1).to(torch.int64).bitwise_and(0xFFFFFFFF).to(torch.uint32).view(torch.int32)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack`: int32 rows -> 8x as many rows of int codes in [0, 15]."""
    shifts = (torch.arange(PACK, device=packed.device) * BITS).view(1, PACK, *[1] * (packed.dim() - 1))
    codes = (packed.unsqueeze(1) >> shifts) & 0xF  # arithmetic shift: the mask drops the sign bits
    return codes.reshape(packed.shape[0] * PACK, *packed.shape[1:])


def dequantize(qweight, qzeros, scales, g_idx, dtype) -> torch.Tensor:
    """(out, in) weight: scale * (code - zero), GPTQ v1 zeros stored minus one."""
    codes = unpack(qweight)  # (in, out)
    zeros = unpack(qzeros.t().contiguous()).t() + 1  # (groups, out)
    w = (codes - zeros[g_idx]).float() * scales.float()[g_idx]  # fp32: fp16 products would round
    return w.t().to(dtype)


class _DequantMatmul(torch.autograd.Function):
    """y = x W^T with W rebuilt from its int4 codes in forward and again in backward."""

    @staticmethod
    def forward(ctx, x, qweight, qzeros, scales, g_idx):
        ctx.save_for_backward(qweight, qzeros, scales, g_idx)
        return x @ dequantize(qweight, qzeros, scales, g_idx, x.dtype).t()

    @staticmethod
    def backward(ctx, grad):
        w = dequantize(*ctx.saved_tensors, grad.dtype)
        return grad @ w, None, None, None, None


class GPTQLinear(torch.nn.Module):
    """A frozen 4-bit GPTQ linear layer (the checkpoint's buffers), computed in the input's dtype."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool, device=None):
        super().__init__()
        if in_features % PACK or out_features % PACK:
            raise UserError(f"GPTQ packing needs layer sizes divisible by {PACK} (got {out_features}x{in_features})")
        self.in_features = self.infeatures = in_features  # peft reads infeatures/outfeatures
        self.out_features = self.outfeatures = out_features
        self.group_size = group_size if group_size > 0 else in_features
        groups = -(-in_features // self.group_size)
        kw = dict(device=device)
        self.register_buffer("qweight", torch.zeros(in_features // PACK, out_features, dtype=torch.int32, **kw))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // PACK, dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, **kw))
        self.register_buffer("g_idx", torch.arange(in_features, **kw, dtype=torch.int32) // self.group_size)
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, **kw) if bias else None)

    def forward(self, x):
        y = _DequantMatmul.apply(x, self.qweight, self.qzeros, self.scales, self.g_idx.long())
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def weight_dequantized(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.qweight, self.qzeros, self.scales, self.g_idx.long(), dtype)


# ---------------------------------------------------------------------------- loading + LoRA


def _quant_config(config) -> dict:
    qc = getattr(config, "quantization_config", None)
    qc = qc.to_dict() if hasattr(qc, "to_dict") else qc
    if not qc or qc.get("quant_method") != "gptq":
        raise UserError("--gptq: --model has no GPTQ quantization_config in its config.json; pass a GPTQ "
                        "checkpoint (python -m features.gptq makes one) or drop --gptq")
    if qc.get("bits") != BITS or qc.get("checkpoint_format", "gptq") != "gptq":
        raise UserError(f"--gptq: only 4-bit checkpoints in GPTQ format load here (got bits={qc.get('bits')}, "
                        f"format={qc.get('checkpoint_format')}); with gptqmodel installed on a GPU others load too")
    return qc


def _gptqmodel_usable(device: torch.device) -> bool:
    try:
        import gptqmodel  # noqa: F401
        import optimum  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda"


def load_model(model_cfg, config, device: torch.device, attn_implementation: str = "sdpa"):
    """The GPTQ checkpoint at --model, its decoder linears 4-bit and frozen, in train mode."""
    from core import model as base_loader

    qc = _quant_config(config)
    if _gptqmodel_usable(device):  # transformers' GPTQ integration with gptqmodel's kernels
        return base_loader.load_model(model_cfg, config, device, attn_implementation)
    import transformers

    plain = config.__class__.from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    plain._name_or_path = str(model_cfg.path)  # peft records it as the adapter's base
    dtype = torch.bfloat16 if base_loader.resolve_precision(model_cfg, device) == "bf16" else torch.float32
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(plain, dtype=dtype,
                                                              attn_implementation=attn_implementation)
    state = _read_weights(Path(model_cfg.path))
    swap_linears(model, qc["group_size"], lambda name: f"{name}.qweight" in state, device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (plain.tie_word_embeddings and k.startswith("lm_head."))]
    if missing or unexpected:
        raise UserError(f"--model {model_cfg.path}: the weights do not match the config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    model.tie_weights()
    model.requires_grad_(False)
    model.config.use_cache = False
    return model.train()


def _read_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    state = {}
    for f in files:
        state.update(load_file(path / f))
    return state


def swap_linears(model, group_size: int, chosen, device=None) -> list[str]:
    """Replace the decoder nn.Linear layers whose name `chosen(name)` accepts with empty GPTQLinear ones."""
    head, names = model.get_output_embeddings(), []
    for name, m in list(model.named_modules()):
        if type(m) is torch.nn.Linear and m is not head and chosen(name):
            model.set_submodule(name, GPTQLinear(m.in_features, m.out_features, group_size, m.bias is not None,
                                                 device=device or m.weight.device))
            names.append(name)
    return names


def apply(model, cfg, run):
    """--gptq --lora: the adapters on the GPTQ linears (loaded by `load_model`)."""
    return apply_lora(model, cfg.lora)


def apply_lora(model, lora_cfg):
    """peft's LoRA on every quantized linear named by --lora-targets (all-linear: all of them)."""
    import peft
    from peft.tuners.lora.gptq import GPTQLoraLinear

    from features.lora import peft_model, target_modules

    quantized = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if isinstance(m, GPTQLinear) or hasattr(m, "qweight")})
    targets = target_modules(lora_cfg)
    targets = quantized if targets == "all-linear" else targets
    config = peft.LoraConfig(r=lora_cfg.lora_rank, lora_alpha=lora_cfg.lora_alpha, lora_dropout=lora_cfg.lora_dropout,
                             target_modules=targets, use_rslora=lora_cfg.rslora, bias="none", task_type="CAUSAL_LM")
    config._register_custom_module({GPTQLinear: GPTQLoraLinear})  # peft 0.21's hook for custom layer types
    try:
        return peft_model(model, config)
    except ValueError as e:
        raise UserError(f"--lora-targets {lora_cfg.lora_targets}: {str(e).splitlines()[0]}; the quantized "
                        f"layers are {','.join(quantized)}") from e


# ---------------------------------------------------------------------------- making a checkpoint


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, group_size: int, damp: float = 0.01):
    """GPTQ on one (out, in) weight: (codes (out, in), scales (groups, out), zeros (groups, out)).

    Columns are rounded left to right; each one's rounding error, divided by the inverse Hessian's
    diagonal, is subtracted from the columns to its right along that Hessian row (Frantar et al.,
    Alg. 1 without the lazy batching). Symmetric: zero point 8, scale from the group's max |w|,
    taken when the group's first column is reached (after the earlier updates), rounded to fp16.
    """
    w, h = w.detach().clone().float(), hessian.detach().clone().double()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    codes, scales = torch.zeros_like(w, dtype=torch.int32), []
    maxq, zero = 2 ** BITS - 1, 2 ** (BITS - 1)
    for i in range(w.shape[1]):
        if i % group_size == 0:
            scale = (2 * w[:, i:i + group_size].abs().amax(1) / maxq).clamp(min=1e-8).half().float()
            scales.append(scale)
        q = torch.clamp(torch.round(w[:, i] / scale) + zero, 0, maxq)
        codes[:, i] = q.to(torch.int32)
        err = (w[:, i] - scale * (q - zero)) / hinv[i, i]
        w[:, i + 1:] -= err[:, None] * hinv[i, i + 1:][None, :]
    scales = torch.stack(scales)
    return codes, scales, torch.full_like(scales, zero, dtype=torch.int32)


def _packed(codes, scales, zeros, group_size: int, bias) -> dict:
    out = {"qweight": pack(codes.t().contiguous()), "qzeros": pack((zeros - 1).t().contiguous()).t().contiguous(),
           "scales": scales.half(), "g_idx": torch.arange(codes.shape[1], dtype=torch.int32) // group_size}
    if bias is not None:
        out["bias"] = bias.detach().half()
    return out


@torch.no_grad()
def _input_hessians(model, names: list[str], calib: torch.Tensor, batch: int = 8) -> dict:
    """2/n X^T X of each named layer's inputs over the calibration rows (one pass, unquantized model)."""
    hessians, counts, hooks = {}, {}, []
    for name in names:
        layer = model.get_submodule(name)
        hessians[name], counts[name] = torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64), 0

        def collect(mod, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).double().cpu()
            n = counts[name] + x.shape[0]
            hessians[name] = hessians[name] * (counts[name] / n) + (x.t() @ x) * (2 / n)
            counts[name] = n
        hooks.append(layer.register_forward_pre_hook(collect))
    try:
        for i in range(0, len(calib), batch):
            model(input_ids=calib[i:i + batch])
    finally:
        for h in hooks:
            h.remove()
    return hessians


def make_checkpoint(model, tokenizer, out_dir, calib: torch.Tensor, group_size: int = 128) -> Path:
    """Quantize `model`'s decoder linears with GPTQ on `calib` (rows of token ids) and write a GPTQ-format
    checkpoint (config.json with quantization_config, model.safetensors, tokenizer); `model` is left as is."""
    from safetensors.torch import save_file

    from core.checkpoint import atomic_dir

    model.eval()
    head = model.get_output_embeddings()
    names = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and m is not head]
    bad = [n for n in names if model.get_submodule(n).in_features % group_size]
    if bad:
        raise UserError(f"--group-size {group_size} does not divide the input size of {bad[0]}")
    hessians = _input_hessians(model, names, calib)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # safetensors refuses shared tensors; the config re-ties it
    for name in names:
        layer = model.get_submodule(name)
        codes, scales, zeros = gptq_quantize(layer.weight, hessians[name], group_size)
        del state[f"{name}.weight"]
        state.pop(f"{name}.bias", None)
        state.update({f"{name}.{k}": v for k, v in _packed(codes, scales, zeros, group_size, layer.bias).items()})
    config = model.config.to_dict() | {"quantization_config": {
        "quant_method": "gptq", "bits": BITS, "group_size": group_size, "desc_act": False, "sym": True,
        "checkpoint_format": "gptq", "damp_percent": 0.01}}
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
    return out


def main(argv=None) -> int:
    import argparse

    from core.data import DataConfig, load_splits
    from core.model import ModelConfig, load_config, load_model as load_plain, load_tokenizer

    ap = argparse.ArgumentParser(description="Make a 4-bit GPTQ checkpoint of a model (CPU is fine for small ones).")
    ap.add_argument("--model", default="tiny-llama", help="preset, HF directory (e.g. runs/x/final) or hub id")
    ap.add_argument("--out", required=True)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--dataset", default=DataConfig.dataset, help="calibration text (any train.py --dataset)")
    ap.add_argument("--calib-rows", type=int, default=64, help="rows of --seq-len tokens")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        torch.manual_seed(args.seed)
        mcfg = ModelConfig(args.model, precision="fp32")
        tok = load_tokenizer(mcfg)
        model = load_plain(mcfg, load_config(mcfg, tok), torch.device("cpu"))
        train, _ = load_splits(DataConfig(dataset=args.dataset, val_dataset="none"), tok)
        ids = torch.tensor([t for s in train.samples for t in s.input_ids][:args.calib_rows * args.seq_len])
        calib = ids[:len(ids) // args.seq_len * args.seq_len].view(-1, args.seq_len)
        print(f"saved {make_checkpoint(model, tok, args.out, calib, args.group_size)} "
              f"({len(calib)} calibration rows of {args.seq_len} tokens)")
        return 0
    except UserError as e:
        print(f"error: {e}")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
