"""A frozen input-embedding table kept in CPU memory: about 1 GiB less GPU memory at 128K vocabulary.

    python train.py --model meta-llama/Llama-3.1-8B --qlora --offload-embeddings --ac full --offload cpu

The table (vocabulary x hidden: 128,256 x 4,096 in bf16 = 1.0 GiB for Llama-3.1-8B) is the
largest frozen piece of a QLoRA model that stays in 16 bits, and a lookup needs only the rows of
the batch. The weight moves to the CPU; each forward gathers its rows there (the model's own
embedding forward, so scaled embeddings such as Gemma's stay right) and copies the (tokens,
hidden) result to the GPU: 32 MiB per 4,096 tokens, one small synchronous copy per micro-batch.
The Parameter keeps its name, so state dicts and adapters are unchanged.

Works with LoRA / QLoRA on models whose output head has its own weight (Llama-3.1-8B, Mistral,
Qwen2.5-7B), checkpointing and activation offload. Refused when the input embeddings train (full
fine-tuning, or an embedding in --lora-targets), when they are tied to the output head
(Llama-3.2-1B/3B, Gemma: the head needs the table on the GPU for every token), and with several
processes (the wrappers there expect every parameter on the rank's GPU).
"""

import dataclasses
import types

import torch

from core import UserError
from core.defaults import TIED_TABLE
from core.distributed import launched_world_size


@dataclasses.dataclass
class EmbeddingOffloadConfig:
    offload_embeddings: bool = False
    """Keep a frozen, untied input-embedding table in CPU memory (LoRA/QLoRA; about 1 GiB less GPU memory at 128K vocabulary); on by default for LoRA in one process on a CUDA GPU where the step is tight in memory."""  # noqa: E501
    no_offload_embeddings: bool = False
    """Keep the input-embedding table on the GPU, also where --offload-embeddings is on by default."""


ONE_PROCESS = "--offload-embeddings runs in one process; drop it with torchrun / several ranks"


def validate(cfg) -> None:
    if cfg.embedding_offload.offload_embeddings and launched_world_size() > 1:  # refused before anything loads
        raise UserError(ONE_PROCESS)


def apply_embedding_offload(model, world_size: int = 1):
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if emb.weight.requires_grad:
        raise UserError("--offload-embeddings keeps a frozen table on the CPU, but the input embeddings train "
                        "here (full fine-tuning or an embedding LoRA target); add --lora/--qlora or drop the flag")
    if head is not None and getattr(head, "weight", None) is not None and \
            head.weight.data_ptr() == emb.weight.data_ptr():
        raise UserError(TIED_TABLE)
    if world_size > 1:
        raise UserError(ONE_PROCESS)
    if emb.weight.device.type == "cuda":
        emb.weight.data = emb.weight.data.cpu()
    emb.forward = types.MethodType(_lookup_on_cpu, emb)
    return model


def _lookup_on_cpu(self, input_ids: torch.Tensor) -> torch.Tensor:
    # The class's own forward on the CPU table (Gemma scales by sqrt(hidden) there), then the rows only.
    rows = type(self).forward(self, input_ids.to(self.weight.device))
    return rows.to(input_ids.device)


def apply(model, cfg, run):
    """--offload-embeddings: the frozen input-embedding table in CPU memory."""
    return apply_embedding_offload(model, run.d.world_size)
