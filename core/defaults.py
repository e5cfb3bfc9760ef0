"""Defaults that fit the model, the method and the machine, for every value the user did not set.

    python train.py                                          # the embedded demo: its own settings
    python train.py --model meta-llama/Llama-3.1-8B --lora --dataset chats.jsonl   # peers' LoRA recipe
    python train.py ... --lr 1e-4 --no-compile               # anything set by hand wins

Hyperparameters (the values Axolotl's and Unsloth's Llama-3 8B examples use; warm-up as TRL's
recipes do):

| value | embedded demo (tiny-* presets) | LoRA / QLoRA / 8-bit | full fine-tune |
|---|---|---|---|
| --lr | 2e-3 | 2e-4 | 2e-5 |
| --micro-batch-size x --grad-accum | 32 x 1 | 2 x 4; on a GPU up to 8 x 1 (below) | same |
| --epochs (without --max-steps) | 1.6 (minutes on a CPU) | 3 | 3 |
| --seq-len | 512 | the longest sample, capped at the model's context (4096 at least when packing) | same |
| --warmup-steps | 50 | 3% of the steps | same |
| --eval-exact-match | 128 samples where the held-out answers' median is at most 32 tokens, else 0 (off) | same | same |
| --eval-every | 0 (before training and at the end) | once an epoch, when there are more | same |

Speed on a CUDA GPU: the fastest path that keeps the math (each has an off switch):
  --precision   a frozen base (LoRA/QLoRA) in bf16 where the GPU has bf16, adapters in fp32 as
                always; a full fine-tune keeps fp32 masters (bf16-mixed)      [--precision bf16-mixed]
  --lora-kernels  the fused LoRA kernels, wherever they apply (exact w.r.t. peft)  [--no-lora-kernels]
  --compile     per-block torch.compile and the compiled loss                       [--no-compile]
  --packing     no padding: samples packed into --seq-len rows, documents kept apart [--no-packing]
  --attn        the best installed kernel (core/attention.py)                   [--attn sdpa]
  --loss        the compiled full-logits cross entropy; for LoRA/QLoRA whose step would pass
                LEAN_ABOVE of the GPU's memory with the logits, chunked instead: the frozen head's
                loss 256 tokens at a time, never the tokens x vocabulary logits (exact, slower)
                                                                        [--loss ce / --loss chunked]
  --offload-embeddings  with the chunked loss above, also a frozen, untied input-embedding table
                (LoRA/QLoRA, one process) in CPU memory; each micro-batch copies its rows
                                                        [--no-offload-embeddings / --offload-embeddings]
  --compile-mode  reduce-overhead (CUDA graphs) for LoRA/QLoRA on a model under GRAPHS_BELOW
                parameters, GRAPHS_MIN_STEPS steps or more, one process: the host bounds such steps
                                                                        [--compile-mode default]
  --micro-batch-size  8 rows a step as peers use, but in micro-batches of 4 or 8 where the estimated
                memory stays under 40% of the GPU's: at 2 rows a small model's step waits on kernel
                launches (only when both --micro-batch-size and --grad-accum are unset; never below 2)
A speedup that the compatibility matrix refuses beside the run's own flags stays off, with the
reason in the log. `resolve_flags` runs right after parsing, `precision` once the device is set,
`loss`, `embedding_offload` and `compile_mode` once the model's config is read, `seq_len`, `step_rows`,
`eval_exact_match`, `eval_every` and `warmup_steps` once the data is tokenized. Every choice is printed on the run's
`defaults:` line (`--lr 2e-4 (auto: LoRA)`) and kept in config.json under "auto".
"""

import math
import os

import torch

from core import UserError, compat, count
from core.config import adapters_on

DEMO_PREFIX = "tiny-"  # the embedded demo's presets: ~1M parameters, sized for a CPU
# the demo's epochs: about 1,000 steps, enough for exact match to climb well above zero within minutes on a CPU
DEMO = dict(lr=2e-3, micro_batch_size=32, grad_accum=1, epochs=1.6, seq_len=512, warmup_steps=50)
REAL = dict(lr_adapter=2e-4, lr_full=2e-5, micro_batch_size=2, grad_accum=4, epochs=3.0, warmup_ratio=0.03,
            packed_row=4096)


def is_demo(cfg) -> bool:
    return cfg.model.path.startswith(DEMO_PREFIX)


def resolve_flags(cfg, cuda: bool) -> None:
    """Fill in, in place, the flags the user left unset (None) or automatic; each choice is noted in cfg.auto."""

    def choose(obj, field: str, value, flag: str, why: str) -> None:
        setattr(obj, field, value)
        cfg.auto.append(f"{flag} {_shown(value)} (auto: {why})")

    t, o, adapters = cfg.train, cfg.optim, adapters_on(cfg.lora)
    method = "LoRA" if adapters else "full fine-tune"
    if o.lr is None:
        lr = DEMO["lr"] if is_demo(cfg) else REAL["lr_adapter"] if adapters else REAL["lr_full"]
        choose(o, "lr", lr, "--lr", "the demo" if is_demo(cfg) else method)
    if t.micro_batch_size is None:
        choose(t, "micro_batch_size", _pick("micro_batch_size", cfg), "--micro-batch-size", _who(cfg))
    if t.grad_accum is None:
        choose(t, "grad_accum", _pick("grad_accum", cfg), "--grad-accum", _who(cfg))
    if t.epochs is None and t.max_steps == -1:
        choose(t, "epochs", _pick("epochs", cfg), "--epochs", _who(cfg))
    if cuda:
        _speedups(cfg, choose)


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.0e}".replace("e-0", "e-") if value < 1e-2 else f"{value:g}"  # 2e-4, 1.6
    return str(value)


def _pick(name: str, cfg):
    return DEMO[name] if is_demo(cfg) else REAL[name]


def _who(cfg) -> str:
    return "the demo" if is_demo(cfg) else "a real model"


def resolve_run(cfg, total_steps: int, epoch_steps: int, d, model_config, val) -> None:
    """What is chosen once the data, the steps, the processes and the model's config are known: exact
    match, evaluation steps, warm-up, precision, loss, embedding offload, compile mode."""
    eval_exact_match(cfg, val)
    eval_every(cfg, total_steps, epoch_steps, val)
    warmup_steps(cfg, total_steps)
    precision(cfg, d.device)
    loss(cfg, d.device, model_config)
    embedding_offload(cfg, d.device, model_config, d.world_size)
    compile_mode(cfg, d.device, model_config, d.world_size, total_steps)


# The lean paths cost speed (the chunked loss about 4% of an 8B LoRA step, the CPU embedding table
# about 2%: benchmarks/results/2026-12-02-lean-defaults-h200.md), so they are the default only where
# the fast path's estimated peak would pass this share of the GPU's memory. The estimate reads up to
# 15% low: the fast path then still ends under 90%.
LEAN_ABOVE = 0.75


def needs_lean(cfg, model_config, device: torch.device, gpu_bytes: int | None = None) -> str | None:
    """Why a LoRA run on a CUDA GPU should take the lean paths (the reason, for the log), or None when
    the full logits fit. A model the estimate cannot size (a mixture of experts) is taken as tight."""
    if not _estimable(model_config):
        return "a model whose memory the estimate cannot size"
    gpu_bytes = gpu_bytes or torch.cuda.get_device_properties(device).total_memory
    fast = estimate_bytes(cfg, model_config, cfg.train.micro_batch_size, logits=True)
    if fast <= LEAN_ABOVE * gpu_bytes:
        return None
    return f"with the full logits the step would take ~{fast / 2**30:.0f} of {gpu_bytes / 2**30:.0f} GiB"


GPU_SHARE = 0.4  # of the GPU's memory an automatic micro-batch may fill, by the estimate below


def _auto_batch(cfg) -> list[int] | None:
    """Where cfg.auto notes --micro-batch-size and --grad-accum, when both were chosen for the user."""
    auto = [i for i, a in enumerate(cfg.auto) if a.startswith(("--micro-batch-size ", "--grad-accum "))]
    return auto if len(auto) == 2 else None


def step_rows(cfg, samples: list, model_config, device: torch.device) -> None:
    """The rows a step and a micro-batch when the user set neither: packed_rows, then micro_batch; on a
    CPU, cpu_memory."""
    packed_rows(cfg, samples)
    micro_batch(cfg, model_config, device)
    unpacked = samples and not cfg.packing.packing  # padded to a batch's longest sample, not to --seq-len
    cpu_memory(cfg, model_config, device, row_tokens=max(len(s.input_ids) for s in samples) if unpacked else None)


def packed_rows(cfg, samples: list) -> None:
    """With packing and --micro-batch-size / --grad-accum both automatic: a step of about as many samples
    as unpacked (2 x 4 = 8), not of 8 rows of --seq-len tokens each; 8 packed 4096-token rows hold about
    160 chats of 200 tokens, and 1,000 such chats would train in 27 steps over 3 epochs. Rows a step: a
    power of two from 1 to 8 (8 where each sample fills a row, as in the speed benchmarks)."""
    auto = _auto_batch(cfg)
    if not cfg.packing.packing or is_demo(cfg) or auto is None or not samples:
        return
    per_row = cfg.data.seq_len / (sum(len(s.input_ids) for s in samples) / len(samples))  # samples a row holds
    unpacked = REAL["micro_batch_size"] * REAL["grad_accum"]  # samples a step without packing
    rows = 2 ** min(3, max(0, round(math.log2(max(1.0, unpacked / per_row)))))
    t = cfg.train
    t.micro_batch_size, t.grad_accum = min(REAL["micro_batch_size"], rows), rows // min(REAL["micro_batch_size"], rows)
    why = f"packed rows of about {per_row:.0f} samples; {rows} a step, about {rows * per_row:.0f} samples"
    cfg.auto[auto[0]] = f"--micro-batch-size {t.micro_batch_size} (auto: {why})"
    cfg.auto[auto[1]] = f"--grad-accum {t.grad_accum} (auto: {why})"


def micro_batch(cfg, model_config, device: torch.device, gpu_bytes: int | None = None) -> None:
    """On a CUDA GPU, with --micro-batch-size and --grad-accum both automatic (2 x 4): the largest
    micro-batch of 4 or 8 rows (the step keeps its 8) whose estimated memory fits in GPU_SHARE of the
    GPU. At 2 rows a 1B model's compiled step is bound by the host, not the GPU."""
    auto = _auto_batch(cfg)
    if device.type != "cuda" or is_demo(cfg) or auto is None or not _estimable(model_config):
        return
    gpu_bytes = gpu_bytes or torch.cuda.get_device_properties(device).total_memory
    rows = cfg.train.micro_batch_size * cfg.train.grad_accum
    fits = [m for m in (4, 8) if rows % m == 0 and estimate_bytes(cfg, model_config, m) <= GPU_SHARE * gpu_bytes]
    if not fits:
        return
    t, why = cfg.train, f"a real model; {max(fits)} rows fit in {100 * GPU_SHARE:.0f}% of the GPU's memory"
    t.micro_batch_size, t.grad_accum = max(fits), rows // max(fits)
    cfg.auto[auto[0]] = f"--micro-batch-size {t.micro_batch_size} (auto: {why})"
    cfg.auto[auto[1]] = f"--grad-accum {t.grad_accum} (auto: {t.micro_batch_size} x {t.grad_accum}, {rows} rows a step)"


# On a CPU a step's activations took a multiple of estimate_bytes' bf16 count (fp32; eager attention and
# loss; peft's dropout copies of each adapter's input): SmolLM2-135M on one 5,664-token conversation
# peaked at 16.1 GB resident with LoRA (estimated 3.9 GB), 13.1 GB in a full fine-tune (estimated 6.7 GB).
CPU_ACTIVATIONS = {"adapters": 4, "full": 2}
RAM_SHARE = 0.8  # past the machine's memory the kernel kills the process, with no message


def cpu_memory(cfg, model_config, device: torch.device, ram_bytes: int | None = None,
               row_tokens: int | None = None) -> None:
    """On a CPU: micro-batches of 1 row (the step keeps its rows) where the automatic ones would pass
    RAM_SHARE of the machine's memory by the estimate; a micro-batch that passes it even so is refused at
    start-up, naming the --seq-len that fits, instead of a kill midway. Ranks on one machine share it.
    row_tokens: the longest row when rows are padded to their samples (unpacked), not --seq-len long;
    --ac full (or --alst) and a loss that never holds the logits count as the memory they save."""
    if device.type != "cpu" or is_demo(cfg) or not _estimable(model_config):
        return
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's processes on this machine share it
    ram = (ram_bytes or os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) / ranks_here
    counted = estimate_bytes(cfg, model_config, 0)  # the weights, bf16 unless a full fine-tune's fp32 + Adam
    adapters = adapters_on(cfg.lora)
    weights, times = (2 * counted, CPU_ACTIVATIONS["adapters"]) if adapters else (counted, CPU_ACTIVATIONS["full"])
    tokens = min(cfg.data.seq_len, row_tokens or cfg.data.seq_len)
    per_token = times * activation_bytes(cfg, model_config, logits=True, memory_flags=True)

    def need(rows: int) -> float:
        return weights + rows * tokens * per_token

    t, auto = cfg.train, _auto_batch(cfg)
    if auto and t.micro_batch_size > 1 and need(t.micro_batch_size) > RAM_SHARE * ram:
        rows, why = t.micro_batch_size * t.grad_accum, f"~{need(t.micro_batch_size) / 2**30:.0f} GiB"
        t.micro_batch_size, t.grad_accum = 1, rows
        cfg.auto[auto[0]] = f"--micro-batch-size 1 (auto: CPU; more rows at once would take {why} of the " \
                            f"{ram / 2**30:.0f} GiB memory)"
        cfg.auto[auto[1]] = f"--grad-accum {rows} (auto: 1 x {rows}, {rows} rows a step)"
    if need(t.micro_batch_size) > RAM_SHARE * ram:
        fits = max(0, int((RAM_SHARE * ram - weights) / (per_token * t.micro_batch_size)) // 64 * 64)
        raise UserError(f"--seq-len {cfg.data.seq_len} x --micro-batch-size {t.micro_batch_size}: a step on this CPU "
                        f"would take ~{need(t.micro_batch_size) / 2**30:.0f} of its {ram / 2**30:.0f} GiB memory; "
                        f"pass --seq-len {fits} (longer samples are dropped, or cut with --truncation truncate)"
                        + (", --micro-batch-size 1" if t.micro_batch_size > 1 else "")
                        + (", --alst (recomputes activations)" if cfg.checkpointing.ac != "full" else "")
                        + ", or train on a GPU")


def _estimable(c) -> bool:
    """A dense decoder whose config names the sizes estimate_bytes reads (not a mixture of experts:
    its expert count and routing are not in the formula)."""
    sizes = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "num_attention_heads")
    experts = ("num_local_experts", "num_experts", "n_routed_experts")
    return all(hasattr(c, f) for f in sizes) and not any(getattr(c, f, None) for f in experts)


def estimate_bytes(cfg, c, micro_batch_size: int, logits: bool = False) -> float:
    """Peak GPU bytes of a step, roughly: the weights (QLoRA 4-bit, 8-bit, bf16; a full fine-tune 16
    bytes a parameter with its gradients and Adam moments) and each decoder layer's stored bf16
    activations, 12 h + 6 intermediate bytes a token (norms, projections' inputs and outputs, the
    MLP's three intermediates; FlashAttention stores no scores); a full fine-tune adds fp32 logits and
    their gradient. It reads a few percent under the LoRA and QLoRA peaks measured on the 8B and 1B
    shapes (benchmarks/results/2026-12-02-lean-defaults-h200.md); GPU_SHARE leaves the room. The fused
    LoRA MLP keeps two intermediates since those were measured, not three: for it the estimate errs high.
    logits: a frozen head's full-logits loss keeps bf16 logits and their gradient, 4 bytes a token and
    vocabulary entry (measured: 3.4, full logits against --loss-chunk 256 on the 8B shape)."""
    linear, tables = _weights(c)
    full = not adapters_on(cfg.lora)
    per_weight = 16 if full else 0.53 if cfg.lora.qlora else 1 if cfg.lora.lora_8bit else 2
    per_token = activation_bytes(cfg, c, logits)
    return linear * per_weight + tables * (16 if full else 2) + micro_batch_size * cfg.data.seq_len * per_token


def activation_bytes(cfg, c, logits: bool, memory_flags: bool = False) -> float:
    """A step's stored bytes a token (estimate_bytes says what). memory_flags (the CPU's estimate, not
    measured on a GPU): --ac full (--alst sets it) keeps each layer's input and one layer's activations
    at a time; --loss chunked, cce and liger keep no logits."""
    h, layers, inter, vocab = c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size
    layer, full = 12 * h + 6 * inter, not adapters_on(cfg.lora)
    decoder, head = layers * layer, 8 * vocab if full else 4 * vocab if logits else 0
    if memory_flags and cfg.checkpointing.ac == "full":
        decoder = layers * 2 * h + layer
    if memory_flags and cfg.loss.loss in ("chunked", "cce", "liger"):
        head = 0
    return decoder + head


def _weights(c) -> tuple[int, int]:
    """(the decoder's linear weights, the embedding tables' weights: the head counted once if tied)."""
    h = c.hidden_size
    head_dim = getattr(c, "head_dim", None) or h // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, getattr(c, "num_key_value_heads", c.num_attention_heads) * head_dim
    linear = c.num_hidden_layers * (2 * h * q + 2 * h * kv + 3 * h * c.intermediate_size)
    return linear, c.vocab_size * h * (1 if getattr(c, "tie_word_embeddings", False) else 2)


# CUDA graphs (--compile-mode reduce-overhead) replace a block's kernel launches with one replay. With
# LoRA they paid on the small models measured and not from the 1B shape up, where the GPU, not the
# host, bounds the step; the limit lies between the two sizes measured on either side
# (benchmarks/results/2026-12-04-cuda-graphs-sizes-h200.md).
GRAPHS_BELOW = 0.75e9  # parameters
# Recording the graphs costs seconds at start, paid back by the faster steps only in a long enough run
# (the break-even, from the same runs' logged windows, is in the results file above).
GRAPHS_MIN_STEPS = 200


def compile_mode(cfg, device: torch.device, model_config, world_size: int, total_steps: int,
                 gpu_bytes: int | None = None) -> None:
    """--compile-mode auto, once the device, the processes, the steps and the model's config are known:
    reduce-overhead for LoRA/QLoRA on a model under GRAPHS_BELOW parameters, for GRAPHS_MIN_STEPS steps
    or more, in one process, on rows
    of one length (packed, or pretrain blocks), where the step is not tight (needs_lean: graphs keep
    1-2 GiB of their own), the matrix accepts it (not under --ac or --offload) and every feature on is
    one graphs were measured with (GRAPHS_MEASURED); default otherwise."""
    c = cfg.compile
    if c.compile_mode != "auto":
        return
    c.compile_mode = "default"
    if device.type != "cuda" or not c.compile or c.compile_backend != "inductor":
        return
    why = _no_graphs(cfg, device, model_config, world_size, total_steps, gpu_bytes)
    if why is None:
        c.compile_mode = "reduce-overhead"
        why = _matrix_problem(cfg) or _unmeasured(cfg)
        if why is not None:
            c.compile_mode = "default"
        else:
            n = sum(_weights(model_config))
            why = f"LoRA, {n / 1e6:.0f}M parameters: the host bounds the step; --compile-mode default turns it off"
    cfg.auto.append(f"--compile-mode {c.compile_mode} (auto: {why})")


# The features automatic CUDA graphs were measured with, and those that run outside the graphed blocks
# (data, the loss, the embedding table, the optimizer, logging). Under any other the default stays
# plain until measured; --compile-mode reduce-overhead still asks for graphs by hand.
GRAPHS_MEASURED = {
    "--packing", "--skip-bad-samples", "--attn sdpa", "--attn flash", "--rope-scaling", "--fp8-base", "--lora",
    "--qlora", "--rslora", "--lora-kernels", "--offload-embeddings", "--compile", "--compile-mode reduce-overhead",
    "--loss ce", "--loss chunked", "--loss cce", "--loss liger", "--optimizer adamw-8bit", "--wandb",
}


def _unmeasured(cfg) -> str | None:
    other = next((f.flag for f in compat.active(cfg) if f.flag not in GRAPHS_MEASURED), None)
    return None if other is None else f"CUDA graphs are not measured with {other}"


def _no_graphs(cfg, device: torch.device, model_config, world_size: int, total_steps: int,
               gpu_bytes: int | None) -> str | None:
    """Why CUDA graphs stay off for this run, or None."""
    if not adapters_on(cfg.lora):
        return "full fine-tune: graphs measured no faster"
    if not _estimable(model_config):
        return "a model the estimate cannot size"
    if (n := sum(_weights(model_config))) >= GRAPHS_BELOW:
        return f"{n / 1e9:.1f}B parameters; CUDA graphs pay under {GRAPHS_BELOW / 1e9:g}B"
    if total_steps < GRAPHS_MIN_STEPS:
        return f"{total_steps} steps: recording CUDA graphs pays back from about {GRAPHS_MIN_STEPS}"
    if world_size > 1:
        return f"{world_size} processes: graphs run in one"
    if not (cfg.packing.packing or cfg.data.dataset_format == "pretrain"):
        return "padded rows of many lengths: a graph recorded for each"
    return needs_lean(cfg, model_config, device, gpu_bytes)


def precision(cfg, device: torch.device) -> None:
    """--precision auto, once the device is known."""
    if cfg.model.precision != "auto":
        return
    if cfg.optim.optimizer == "adamw-sr":
        value, why = "bf16", "--optimizer adamw-sr trains bf16 weights"
    elif device.type != "cuda":
        value, why = "fp32", "CPU"
    elif not torch.cuda.is_bf16_supported():
        value, why = "fp32", "this GPU has no bf16"
    elif adapters_on(cfg.lora):  # a frozen base never updates: bf16 storage loses nothing bf16-mixed keeps
        value, why = "bf16", "frozen base in bf16, adapters in fp32"
    else:
        value, why = "bf16-mixed", "full fine-tune: fp32 masters, bf16 matmuls"
    cfg.model.precision = value
    cfg.auto.append(f"--precision {value} (auto: {why})")


# --loss-chunk: a frozen head's chunks only hold logits (small is cheap); a trained head's fp32 weight
# gradient is read and written once a chunk, so fewer, larger chunks
LOSS_CHUNK_FROZEN, LOSS_CHUNK_TRAINED = 256, 4096


def loss(cfg, device: torch.device, model_config, gpu_bytes: int | None = None) -> None:
    """--loss auto and --loss-chunk, once the device, the micro-batch and the model's config are known:
    chunked where the full logits would crowd the GPU (needs_lean) and chunking is exact and lean
    (adapters: the head is frozen, so each chunk needs only its hidden-state gradient), else ce."""
    if cfg.loss.loss == "auto":
        cfg.loss.loss, why = "ce", "full logits"
        softcapped = getattr(model_config, "final_logit_softcapping", None)
        if device.type == "cuda" and adapters_on(cfg.lora) and not softcapped:
            why = "the full logits fit; --loss chunked saves their memory"
            if (tight := needs_lean(cfg, model_config, device, gpu_bytes)) is not None:
                cfg.loss.loss, why = "chunked", f"{tight}; never the full logits; --loss ce turns it off"
                # the matrix reads the value under test; ZeRO-3 holds only a partition of the head chunks read
                if (reason := _matrix_problem(cfg) or _head_partitioned(cfg)) is not None:
                    cfg.loss.loss, why = "ce", reason
        if device.type == "cuda":
            cfg.auto.append(f"--loss {cfg.loss.loss} (auto: {why})")
    if cfg.loss.loss_chunk is None:
        frozen = adapters_on(cfg.lora)
        cfg.loss.loss_chunk = LOSS_CHUNK_FROZEN if frozen else LOSS_CHUNK_TRAINED
        if cfg.loss.loss == "chunked":
            cfg.auto.append(f"--loss-chunk {cfg.loss.loss_chunk} (auto: "
                            + ("a frozen head: the smallest buffer" if frozen else "the head trains") + ")")


TIED_TABLE = ("--offload-embeddings: this model ties its input embeddings to the output head, which computes "
              "with the same table where the model runs; drop --offload-embeddings")


def embedding_offload(cfg, device: torch.device, model_config, world_size: int, gpu_bytes: int | None = None) -> None:
    """--offload-embeddings, once the model's config and the process count are known: on for LoRA in
    one process on a CUDA GPU where the step is tight (needs_lean), the input embeddings are frozen and
    not tied to the output head (features/embedding_offload.py: about 1 GiB less GPU memory at 128K
    vocabulary)."""
    e = cfg.embedding_offload
    if e.offload_embeddings and getattr(model_config, "tie_word_embeddings", False):  # before the model loads
        raise UserError(TIED_TABLE)
    if e.offload_embeddings or e.no_offload_embeddings or device.type != "cuda" or not adapters_on(cfg.lora):
        return
    if world_size > 1 or getattr(model_config, "tie_word_embeddings", False) or "embed" in cfg.lora.lora_targets:
        return
    if needs_lean(cfg, model_config, device, gpu_bytes) is None:
        return
    e.offload_embeddings = True
    if (reason := _matrix_problem(cfg)) is not None:
        e.offload_embeddings = False
        cfg.auto.append(f"--offload-embeddings off (auto: {reason})")
        return
    cfg.auto.append("--offload-embeddings on (auto: a frozen, untied table in one process; "
                    "--no-offload-embeddings turns it off)")


# (config path, off switch path, flag, applies to this run?) in the order they are tried
_SPEEDUPS = [
    ("packing.packing", "packing.no_packing", "--packing",
     lambda cfg: cfg.data.dataset_format != "pretrain"),  # pretrain blocks are already full rows
    ("lora_kernels.lora_kernels", "lora_kernels.no_lora_kernels", "--lora-kernels",
     lambda cfg: (cfg.lora.lora or cfg.lora.qlora) and not cfg.lora.dora and cfg.lora.lora_dropout == 0
     and not cfg.gptq.gptq),
    ("compile.compile", "compile.no_compile", "--compile",
     lambda cfg: not (cfg.mesh.tp > 1 and cfg.checkpointing.ac != "none")),  # tensor_parallel refuses the three
]


_ON_OFF = [(path, off_path, flag) for path, off_path, flag, _ in _SPEEDUPS] + [
    ("embedding_offload.offload_embeddings", "embedding_offload.no_offload_embeddings", "--offload-embeddings")]


def validate(cfg) -> None:
    """Refuse a default that is both asked for and switched off."""
    for path, off_path, flag in _ON_OFF:
        if _get(cfg, path.split(".")) and _get(cfg, off_path.split(".")):
            raise UserError(f"{flag} and {flag.replace('--', '--no-')} contradict each other; pass one")


def _speedups(cfg, choose) -> None:
    """Turn on each speedup the user did not switch off, where it applies and the matrix accepts it."""
    for path, off_path, flag, applies in _SPEEDUPS:
        *parents, field = path.split(".")
        owner = _get(cfg, parents)
        if getattr(owner, field) or _get(cfg, off_path.split(".")) or not applies(cfg):
            continue
        before = _matrix_problem(cfg)
        setattr(owner, field, True)
        if before is None and (reason := _matrix_problem(cfg)) is not None:
            setattr(owner, field, False)
            choose(owner, field, False, flag, reason)
            continue
        choose(owner, field, True, flag, f"CUDA; {flag.replace('--', '--no-')} turns it off")


def _matrix_problem(cfg) -> str | None:
    return compat.problem(compat.active(cfg), True, compat.rows(cfg))


def _head_partitioned(cfg) -> str | None:
    """ZeRO-3 holds a partition of the output head, which the chunked loss reads after the forward
    (features/deepspeed_zero.check_head_loss refuses it); a json config is taken as stage 3 here."""
    if cfg.deepspeed.deepspeed not in (None, "zero1", "zero2"):
        return f"--deepspeed {cfg.deepspeed.deepspeed} may partition the output head, which the chunked loss reads"
    return None


def _get(obj, names: list[str]):
    for name in names:
        obj = getattr(obj, name)
    return obj


def seq_len(cfg, longest: int | None, context: int | None) -> int:
    """--seq-len when unset: the longest tokenized sample (a multiple of 64), capped at the model's
    context; packed rows and pretrain blocks are at least 4096 tokens (or the context), so that a
    micro-batch of 2 rows is not a sliver of the GPU."""
    if is_demo(cfg):
        want, why = DEMO["seq_len"], "the demo"
    elif longest is None:  # pretrain: a block size, not a sample's length
        want, why = REAL["packed_row"], "pretrain blocks"
    else:
        want, why = 64 * math.ceil(longest / 64), f"longest sample {longest} tokens"
    if longest is not None and not is_demo(cfg) and cfg.packing.packing and want < REAL["packed_row"]:
        want, why = REAL["packed_row"], f"packed rows; longest sample {longest} tokens"
    if context and want > context:
        want, why = context, f"{why}, capped at the model's context {context}; --rope-scaling stretches it"
    cfg.auto.append(f"--seq-len {want} (auto: {why})")
    return want


# Exact match suits answers with one right form (a number, a label, a name). On open-ended answers it
# reads about 0 at every evaluation, a figure that says nothing and looks like a fault.
SHORT_ANSWER = 32  # tokens: held-out answers whose median is at most this get exact match
EXACT_MATCH_SAMPLES = 128


def eval_exact_match(cfg, val) -> None:
    """--eval-exact-match when unset, once the validation set is tokenized: 128 samples where its
    answers (the trained span of each sample's last response) have a median of at most SHORT_ANSWER
    tokens, else 0 (off)."""
    if cfg.train.eval_exact_match is not None or val is None:
        return
    answers = sorted(len(s.answer) for s in val.samples if s.prompted)
    if not answers:  # no prompted sample (pretrain text): nothing to answer
        cfg.train.eval_exact_match = 0
        return
    median = answers[len(answers) // 2]
    short = median <= SHORT_ANSWER
    cfg.train.eval_exact_match = EXACT_MATCH_SAMPLES if short else 0
    why = f"held-out answers: median {median} tokens" + ("" if short else ", open-ended")
    cfg.auto.append(f"--eval-exact-match {cfg.train.eval_exact_match} (auto: {why})")


def eval_every(cfg, total_steps: int, epoch_steps: int, val) -> None:
    """--eval-every when unset: once an epoch for a real model trained for more than one, so that a
    validation curve shows overfitting (3 epochs by default) at the cost of one validation pass an
    epoch; else 0, before training and at the end (the demo's figures)."""
    if cfg.train.eval_every is not None:
        return
    many = val is not None and not is_demo(cfg) and 0 < epoch_steps < total_steps
    cfg.train.eval_every = epoch_steps if many else 0
    if many:
        cfg.auto.append(f"--eval-every {epoch_steps} (auto: once an epoch)")


def warmup_steps(cfg, total_steps: int) -> None:
    """--warmup-steps when unset, once the number of steps is known."""
    if cfg.optim.warmup_steps is not None:
        return
    if is_demo(cfg):  # its 50 steps, or a tenth of a shorter run's (--max-steps 30 would never leave warm-up)
        value = min(DEMO["warmup_steps"], max(1, total_steps // 10))
        why = "the demo" if value == DEMO["warmup_steps"] else f"the demo: a tenth of {total_steps} steps"
    else:
        ratio = REAL["warmup_ratio"]
        value, why = max(1, round(ratio * total_steps)), f"{100 * ratio:g}% of {count(total_steps, 'step')}"
    cfg.optim.warmup_steps = value
    cfg.auto.append(f"--warmup-steps {value} (auto: {why})")
