"""The compatibility matrix: which features work together and on which hardware, as data.

    python docs/compatibility.py        # rewrite docs/compatibility.md's table from this one (a test checks it)
    python train.py --qlora --qat           # error: --qat with --qlora: the base is already quantized ...

One `Feature` row per feature: the flag, the config field (and value) that turns it on, what it
needs (a CUDA GPU, one of some other flags), and the features it refuses, each with a reason that
says the fix. `check` runs first in train.validate, before any model or data loads, so a
combination that cannot work ends the run at once with one line. A pair that no row refuses works
together: tests/test_compat.py builds every pair of rows and checks that train.validate accepts
exactly the pairs this table accepts and refuses the others with this table's reason. This is
the only place two feature flags are refused together; a module's `validate(cfg)` checks its own
values and their settings (adamw-sr with --precision fp32, --compile-mode with --no-compile).
Refusals that depend on the model or the number of processes (heads that --tp must divide, --tp
with data parallelism but without --fsdp) stay in the module that knows them, and are listed in
`NOTES`.

Adding a feature: one `Feature(...)` line below; the pair test follows, and `python docs/compatibility.py`
rewrites the docs table. While a new row is on, --compile-mode auto keeps CUDA graphs off until the
row is measured with them and named in core/defaults.py `GRAPHS_MEASURED`.
"""

import dataclasses
from pathlib import Path
from typing import Callable

from core import UserError


@dataclasses.dataclass(frozen=True)
class Feature:
    flag: str
    """The flag as shown to users: "--qlora", "--attn flex", "--tp N"."""
    field: str
    """The Config field that turns it on, as a path: "lora.qlora"."""
    on: object = True
    """The field's value when on, or a test of the value (e.g. `lambda v: v > 1`)."""
    example: str = ""
    """Flags that turn it on, for tests and docs (default: `flag`)."""
    cuda: str = ""
    """Why it needs a CUDA GPU ("" = it runs on CPU too); the refusal reads "<flag> needs a CUDA GPU: <this>",
    or this alone when it starts with the flag (a module's own wording, which its tests expect)."""
    needs: tuple[str, ...] = ()
    """Flags of which at least one must be on too."""
    refuses: tuple[tuple[str, str], ...] = ()
    """(other flag, reason with the fix) for each feature it cannot be combined with."""
    ranks: str = ""
    """What it needs of the process layout, for the table (e.g. "N ranks (torchrun)")."""

    def cuda_refusal(self) -> str:
        return self.cuda if self.cuda.startswith(self.flag) else f"{self.flag} needs a CUDA GPU: {self.cuda}"

    def argv(self) -> list[str]:
        return (self.example or self.flag).split()

    def is_on(self, value) -> bool:
        return self.on(value) if callable(self.on) else value == self.on


_ADAPTERS = ("--lora", "--qlora", "--lora-8bit")
_ALT = "they are alternatives (bf16/fp32, 4-bit or 8-bit base); pass one"
_QUANTIZED = ("the base is already quantized, there is no float weight to fake-quantize; drop --qat, or train "
              "with --lora on a bf16 base")
_TP_QUANT = "--tp shards float nn.Linear weights, not a quantized base; use --lora on a bf16 base, or --fsdp"
_TP_LORA_ONLY = "--tp shards plain LoRA (lora_A / lora_B beside the sharded weight); drop one of them"
_NO_GPU_TRITON = "it runs Triton kernels; on CPU use --loss chunked (exact, pure PyTorch)"
_FP8_ADAPTER = "--fp8 trains every weight in FP8 (full fine-tuning); for LoRA use --fp8-base (the frozen base in FP8)"
_FP8_BASE = "--fp8-base runs a bf16/fp32 or NF4 base's matmuls in FP8; this base is int8, GPTQ or sharded, drop one"
_SP_TP = "sequence parallel over tensor-parallel heads is not supported yet; use --cp alone (or --tp alone)"
_GPTQ_QUANTIZED = "the GPTQ checkpoint is already quantized; use --gptq --lora"
_ONE_PROCESS = "--offload-embeddings runs in one process (the wrappers expect every parameter on the GPU); drop one"
_DS = "DeepSpeed's engine owns data parallelism and wraps the model; drop one of them (FSDP2 covers the others)"
_GRAPHS_ONE_PROCESS = ("CUDA graphs (--compile-mode reduce-overhead) run in one process only (FSDP2 would "
                       "gather the weights into new memory every step); drop one")
_GRAPHS_SAVED = ("CUDA graphs (--compile-mode reduce-overhead) are not supported under recompute or "
                 "saved-tensor hooks; drop one")
_gt1: Callable = lambda v: v > 1  # noqa: E731  (mesh dims: on when larger than one)

FEATURES = [
    # data, and a recipe of flags (--alst turns on --tiled-mlp, --loss chunked, --offload cpu, --ac full)
    Feature("--packing", "packing.packing"),
    Feature("--alst", "alst.alst"),
    Feature("--skip-bad-samples", "data.skip_bad_samples"),
    # model loading: attention backends (auto: flash on a CUDA GPU when installed, else sdpa)
    Feature("--attn sdpa", "attention.attn", "sdpa"),
    Feature("--attn eager", "attention.attn", "eager"),
    Feature("--attn flex", "attention.attn", "flex",
            cuda="--attn flex: FlexAttention has no backward pass on CPU (torch 2.13); use --attn sdpa here (the "
                 "same masks), flex on a CUDA GPU"),
    Feature("--attn flash", "attention.attn", "flash",
            cuda="FlashAttention kernels run on CUDA GPUs; use --attn sdpa on CPU"),
    Feature("--attn xformers", "attention.attn", "xformers",
            cuda="xformers kernels run on CUDA GPUs; use --attn sdpa on CPU"),
    Feature("--rope-scaling", "overrides.rope_scaling", lambda v: v != "none",
            example="--rope-scaling linear --rope-factor 2"),
    # module swaps
    Feature("--tiled-mlp", "tiled_mlp.tiled_mlp"),
    Feature("--qat", "qat.qat", refuses=(("--qlora", _QUANTIZED), ("--lora-8bit", _QUANTIZED), ("--gptq", _QUANTIZED))),
    Feature("--liger", "liger.liger", cuda="Liger's Triton kernels need a CUDA GPU; drop --liger on CPU"),
    Feature("--fp8", "fp8.fp8", lambda v: v != "none", example="--fp8 tensorwise",
            cuda="FP8 matmuls need a CUDA GPU of compute capability 8.9+ (Ada, Hopper, Blackwell); "
                 "use --precision bf16",
            refuses=(("--lora", _FP8_ADAPTER), ("--qlora", _FP8_ADAPTER), ("--lora-8bit", _FP8_ADAPTER),
                     ("--gptq", _FP8_ADAPTER),
                     ("--qat", "QAT fakes int4/int8 numerics, FP8 computes in FP8; drop one of them"))),
    Feature("--fp8-all-linears", "fp8.fp8_all_linears", needs=("--fp8",)),
    Feature("--fp8-base", "fp8_base.fp8_base", needs=("--lora", "--qlora"), refuses=(
        ("--lora-8bit", _FP8_BASE), ("--gptq", _FP8_BASE), ("--fp8", _FP8_ADAPTER),
        ("--qat", "QAT fakes int4/int8 numerics, --fp8-base computes in FP8; drop one of them"),
        ("--dora", "DoRA reads the whole base weight every step; --fp8-base keeps it in FP8 only; drop one"),
        ("--fsdp", _FP8_BASE), ("--tp N", _FP8_BASE), ("--deepspeed", _FP8_BASE))),
    # adapters
    Feature("--lora", "lora.lora", refuses=(("--qlora", _ALT), ("--lora-8bit", _ALT))),
    Feature("--qlora", "lora.qlora", refuses=(("--lora-8bit", _ALT),)),
    Feature("--lora-8bit", "lora.lora_8bit", refuses=(
        ("--fsdp", "FSDP2 cannot shard an LLM.int8 base (bitsandbytes keeps its int8 state beside the weight); "
                   "use --ddp, or --qlora with --fsdp"),)),
    Feature("--dora", "lora.dora", needs=_ADAPTERS),
    Feature("--rslora", "lora.rslora", needs=_ADAPTERS),
    Feature("--lora-kernels", "lora_kernels.lora_kernels", needs=("--lora", "--qlora"), refuses=(
        ("--lora-8bit", "--lora-kernels fuses a bf16/fp32 or 4-bit base, not LLM.int8; use --lora or --qlora"),
        ("--dora", "--lora-kernels computes plain LoRA, not DoRA; drop --lora-kernels or --dora"))),
    # activation memory
    Feature("--ac full", "checkpointing.ac", "full"),
    Feature("--ac selective", "checkpointing.ac", "selective"),
    Feature("--offload cpu", "offload.offload", "cpu"),
    Feature("--offload disk", "offload.offload", "disk"),
    Feature("--offload-embeddings", "embedding_offload.offload_embeddings", needs=_ADAPTERS, refuses=tuple(
        (other, _ONE_PROCESS) for other in ("--ddp", "--fsdp", "--dp-replicate N", "--tp N", "--cp N", "--deepspeed"))),
    # compile
    Feature("--compile", "compile.compile"),
    Feature("--compile-mode default", "compile.compile_mode", "default"),  # no CUDA graphs: auto's off switch
    Feature("--compile-mode max-autotune-no-cudagraphs", "compile.compile_mode", "max-autotune-no-cudagraphs"),
    Feature("--compile-mode reduce-overhead", "compile.compile_mode", "reduce-overhead",
            cuda="CUDA graphs replay recorded CUDA kernels; drop it on CPU", refuses=(
                *((other, _GRAPHS_SAVED)
                  for other in ("--ac full", "--ac selective", "--offload cpu", "--offload disk")),
                *((other, _GRAPHS_ONE_PROCESS)
                  for other in ("--ddp", "--fsdp", "--dp-replicate N", "--tp N", "--cp N", "--deepspeed")))),
    # parallelism and sharding
    Feature("--ddp", "sharding.ddp"),
    Feature("--fsdp", "sharding.fsdp", refuses=(("--ddp", "--fsdp and --ddp are two ways to do data parallelism; "
                                                         "pass one of them"),)),
    Feature("--fsdp-keep-gathered", "sharding.fsdp_keep_gathered", needs=("--fsdp",)),
    Feature("--fsdp-cpu-offload", "sharding.fsdp_cpu_offload", needs=("--fsdp",),
            cuda="FSDP2's CPU offload pins host memory for copies to a GPU; drop it on CPU"),
    Feature("--dp-replicate N", "mesh.dp_replicate", _gt1, example="--dp-replicate 2", ranks="a multiple of N ranks"),
    Feature("--tp N", "mesh.tp", _gt1, example="--tp 2", ranks="a multiple of N ranks", refuses=(
        ("--ddp", "--ddp replicates whole modules and cannot hold --tp/--cp shards; use --fsdp instead"),
        ("--qlora", _TP_QUANT), ("--lora-8bit", _TP_QUANT), ("--dora", _TP_LORA_ONLY),
        ("--lora-kernels", _TP_LORA_ONLY),
        ("--qat", "QAT's fake-quantized linears have no sharded form under --tp (they fail at the first "
                  "forward); drop --tp (use --fsdp)"))),
    Feature("--cp N", "mesh.cp", _gt1, example="--cp 2", ranks="a multiple of N ranks",
            needs=("--sp-mode ulysses", "--sp-mode ring"), refuses=(
                ("--ddp", "--ddp replicates whole modules and cannot hold --tp/--cp shards; use --fsdp instead"),
                ("--tp N", _SP_TP))),
    Feature("--sp-mode ulysses", "sequence_parallel.sp_mode", "ulysses", needs=("--cp N",),
            refuses=(("--tp N", _SP_TP),)),
    Feature("--sp-mode ring", "sequence_parallel.sp_mode", "ring", needs=("--cp N",), refuses=(("--tp N", _SP_TP),)),
    Feature("--deepspeed", "deepspeed.deepspeed", lambda v: v is not None, example="--deepspeed zero2", refuses=(
                ("--fsdp", _DS), ("--ddp", _DS), ("--tp N", _DS), ("--cp N", _DS), ("--compile", _DS),
                ("--qlora", "DeepSpeed cannot shard a 4-bit base here; use --fsdp for QLoRA"),
                ("--qat", "DeepSpeed's engine would wrap QAT's fake-quantized model; use --fsdp with --qat"))),
    Feature("--ds-offload", "deepspeed.ds_offload", needs=("--deepspeed",)),
    Feature("--ds-overlap-comm", "deepspeed.ds_overlap_comm", needs=("--deepspeed",)),
    # loss
    Feature("--loss ce", "loss.loss", "ce"),  # the full logits (auto picks chunked for LoRA on a GPU)
    Feature("--loss chunked", "loss.loss", "chunked"),
    Feature("--loss cce", "loss.loss", "cce", cuda=_NO_GPU_TRITON),
    Feature("--loss liger", "loss.loss", "liger", cuda=_NO_GPU_TRITON),
    # quantized bases: a GPTQ checkpoint (GPTQLinear in plain PyTorch on CPU; gptqmodel's kernels on CUDA)
    Feature("--gptq", "gptq.gptq", needs=("--lora",), refuses=(
        ("--qlora", _GPTQ_QUANTIZED), ("--lora-8bit", _GPTQ_QUANTIZED),
        ("--dora", "peft's GPTQ LoRA layer has no DoRA; drop --dora"),
        ("--lora-kernels", "not for a GPTQ base (its int4 layers are not nn.Linear); drop --lora-kernels"),
        ("--qat", "not for a GPTQ base (its int4 layers are not nn.Linear); drop --qat"))),
    # optimizer, run
    Feature("--optimizer adamw-8bit", "optim.optimizer", "adamw-8bit", refuses=tuple(
        (other, "bitsandbytes' 8-bit AdamW updates plain tensors, not the sharded DTensors of --fsdp / --tp; "
                "use --optimizer adamw, or --ddp") for other in ("--fsdp", "--tp N"))),
    Feature("--optimizer adamw-sr", "optim.optimizer", "adamw-sr", refuses=(
        *((a, "adapters train in fp32, which stochastic rounding would not touch; use --optimizer adamw")
          for a in _ADAPTERS),
        ("--deepspeed", "DeepSpeed keeps its own fp32 master weights under bf16; drop --optimizer adamw-sr"))),
    Feature("--wandb", "tracking.wandb"),
]

# Choice and on/off flags that are settings of the run or of a feature, not features: any value
# combines with every feature (a feature's own options are checked by its module).
SETTINGS = {
    "model.precision", "model.trust_remote_code", "data.dataset_format", "data.train_on_inputs", "data.truncation",
    "optim.lr_schedule", "train.device", "train.skip_export", "qat.qat_scheme",
    "compile.compile_backend", "sharding.fsdp_reduce_dtype",
    "compile.no_compile", "packing.no_packing", "lora_kernels.no_lora_kernels",
    "embedding_offload.no_offload_embeddings",  # off switches of GPU defaults
    "fp8_base.fp8_base_transposed_copy",  # --fp8-base's storage layout; its module refuses it alone
}

# Refusals that depend on the model or the process layout; their modules raise them when known.
NOTES = [
    "--tp N and Ulysses --cp N must divide the model's attention and key/value heads (checked when the model loads).",
    "--tp N with several data-parallel ranks needs --fsdp (checked when the process mesh is built).",
    "--dp-replicate x --dp-shard x --cp x --tp must equal the number of processes.",
    "--loss chunked / cce / liger refuse ZeRO-3 (--deepspeed zero3, or a json config of stage 3): the loss reads the "
    "output head's weight where ZeRO-3 holds only a partition of it.",
    "--attn flash / sdpa / --loss chunked refuse models that soft-cap logits (Gemma 2); --attn flash refuses "
    "sliding-window models where torch's varlen kernel has no window.",
    "--offload-embeddings refuses models that tie the input embeddings to the output head (Llama-3.2-1B/3B, "
    "Gemma), an embedding in --lora-targets, and several processes.",
    "--ac, --compile, --tiled-mlp and --lora-kernels need the usual decoder layout (a ModuleList of blocks, "
    "gated MLPs); a model without it is refused when it loads.",
]


def field_value(cfg, path: str):
    """(value, present): a feature whose config section is not in this Config (its module removed from a
    fork) is absent, not an error; a section without the field is a mistyped path, and raises."""
    section, *names = path.split(".")
    if not hasattr(cfg, section):
        return None, False
    value = getattr(cfg, section)
    for name in names:
        if not hasattr(value, name):
            raise AttributeError(f"core/compat.py: {path!r} names no field of {type(value).__name__}")
        value = getattr(value, name)
    return value, True


def rows(cfg) -> list[Feature]:
    """The rows whose config field exists in this Config (cfg: a train.Config or its class' instance)."""
    return [f for f in FEATURES if field_value(cfg, f.field)[1]]


def active(cfg) -> list[Feature]:
    return [f for f in rows(cfg) if f.is_on(field_value(cfg, f.field)[0])]


def refusal(a: Feature, b: Feature) -> str | None:
    """The reason a and b cannot run together (looked up both ways), or None."""
    return dict(a.refuses).get(b.flag) or dict(b.refuses).get(a.flag)


def problem(on: list[Feature], cuda: bool, present: list[Feature], needs: bool = True) -> str | None:
    """Why these features cannot run together (hardware, then refused pairs, then unmet needs), or None."""
    for f in on:
        if f.cuda and not cuda:
            return f.cuda_refusal()
    for i, a in enumerate(on):
        for b in on[i + 1:]:
            if (reason := refusal(a, b)) is not None:
                return f"{a.flag} with {b.flag}: {reason}"
    flags, names = {f.flag for f in on}, {f.flag for f in present}
    for f in on if needs else []:
        wanted = [n for n in f.needs if n in names]
        if wanted and not flags & set(wanted):
            return f"{f.flag} needs {' or '.join(wanted)}; add {'it' if len(wanted) == 1 else 'one'}"
    return None


def check(cfg, cuda: bool) -> None:
    """Refuse a combination the matrix refuses, with one line naming the flags, the reason and the fix."""
    on = active(cfg)
    if (reason := problem(on, cuda, rows(cfg))) is not None:
        for f in on:  # "--tp N" with its parsed value: "--tp 4"
            if f.flag.endswith(" N"):
                reason = reason.replace(f.flag, f"{f.flag[:-1]}{field_value(cfg, f.field)[0]}")
        raise UserError(reason)


def _completions(on: list[Feature], present: list[Feature]):
    """`on` plus one choice for every unmet need, every way (a need's own needs too)."""
    names, flags = {f.flag: f for f in present}, {f.flag for f in on}
    for f in on:
        wanted = [names[n] for n in f.needs if n in names]
        if wanted and not flags & {w.flag for w in wanted}:
            for choice in wanted:
                yield from _completions(sorted(on + [choice], key=FEATURES.index), present)
            return
    yield on


def complete(on: list[Feature], cuda: bool, present: list[Feature]) -> tuple[list[Feature], str | None]:
    """Whether these features can run together once each one's needs are added: (a working set, None),
    or (the set tried, the reason). A feature that needs another inherits its hardware and refusals."""
    on = sorted(on, key=FEATURES.index)
    if (reason := problem(on, cuda, present, needs=False)) is not None:
        return on, reason
    tried = None
    for full in _completions(on, present):
        if (reason := problem(full, cuda, present)) is None:
            return full, None
        tried = tried or (full, reason)
    return tried


# ---- the table in docs/compatibility.md


def _cell(flags) -> str:
    return " or ".join(f"`{f}`" for f in flags)


def refused_pairs(cfg) -> list[tuple[Feature, Feature, str]]:
    present = rows(cfg)
    return [(a, b, r) for i, a in enumerate(present) for b in present[i + 1:] if (r := refusal(a, b)) is not None]


def markdown(cfg) -> str:
    """The matrix in Markdown: each feature's hardware and needs, then every refused pair with its reason."""
    present = rows(cfg)
    names = {f.flag for f in present}
    lines = ["| feature | runs on | needs |", "|---|---|---|"]
    for f in present:
        via = complete([f], cuda=False, present=present)[0]
        cuda_only = f.cuda.removeprefix(f.flag + ": ") or next((f"as `{g.flag}`" for g in via if g.cuda), "")
        hardware = f"CUDA only: {cuda_only}" if cuda_only else "CPU and CUDA"
        lines.append(f"| `{f.flag}` | {hardware}{'; ' + f.ranks if f.ranks else ''} | "
                     f"{_cell([n for n in f.needs if n in names])} |")
    lines += ["", "Refused pairs (any other pair works together; a feature that needs another is refused "
              "where that one is, e.g. `--ds-offload` with `--fsdp`):", "",
              "| flags | reason |", "|---|---|"]
    lines += [f"| `{a.flag}` + `{b.flag}` | {r} |" for a, b, r in refused_pairs(cfg)]
    lines += ["", "Checked once the model or the process group exists:", ""]
    lines += [f"- {n}" for n in NOTES]
    return "\n".join(lines) + "\n"


DOC = Path(__file__).resolve().parent.parent / "docs" / "compatibility.md"
DOC_BEGIN = "<!-- compat:begin (python docs/compatibility.py) -->\n"
DOC_END = "<!-- compat:end -->"


def update_doc(path: Path, table: str) -> None:
    """Replace the table between the compat markers of docs/compatibility.md."""
    text = path.read_text()
    head, rest = text.split(DOC_BEGIN)
    path.write_text(head + DOC_BEGIN + table + DOC_END + rest.split(DOC_END, 1)[1])
