"""Activation offload: tensors saved for backward leave the GPU in forward and come back in backward.

    python train.py --offload cpu --ac full          # checkpointed block inputs go to pinned host memory
    python train.py --offload disk --offload-dir /scratch --ac full   # ... or to memory-mapped files

Through torch's saved-tensor hooks (torch.autograd.graph.saved_tensors_hooks), entered around the
model's forward by a pre-hook and left by an always-called post-hook. Each saved activation of at
least --offload-min-kib is copied out when autograd saves it and copied back when backward needs
it; parameters (and views of them), tensor subclasses (DTensor, NF4, FP8) and small tensors stay.
A tensor saved twice (one input to q, k and v) is copied once. On CUDA the copies out run on a
side stream into pinned buffers, overlapping the next layers' compute, and each copy back also
starts the copy of the activation backward needs next. With --ac full the only tensors autograd
saves outside the checkpointed blocks are the blocks' inputs (torch's non-reentrant checkpoint
saves them through the outer hooks), so the GPU keeps one block's activations at a time: the
biggest win for long context. --offload disk writes each activation to a file under a temporary
directory (reserved with posix_fallocate, so a full disk is a clear error, not a SIGBUS), maps it,
and unlinks it at once: nothing is left behind, even after a crash. --offload-keep-gib N keeps the first N GiB
saved in each forward on the device (the first blocks' inputs) and offloads only the rest: for
machines whose host RAM is smaller than one step's activations (a 512K-token row of an 8B model
saves 4 GiB per block), or a GPU with room to spare. On CPU the copies are plain
copies (no saving; the path is exercised by the tests). Same loss and gradients as without
(tests/test_offload.py).
Reference: torchtune's OffloadActivations (torchtune/training/_activation_offloading.py); PyTorch
saved-tensor hooks tutorial. Works with: --ac full|selective, LoRA / QLoRA / --lora-kernels, packing,
DDP, --tiled-mlp (its saved tile inputs are offloaded too). --compile: the hooks see the compiled
blocks' saved tensors (checked on CPU with the aot_eager backend, torch 2.13; not yet on GPU).
"""

import dataclasses
import errno
import os
import tempfile
import weakref
from typing import Literal

import torch

from core import UserError


@dataclasses.dataclass
class OffloadConfig:
    offload: Literal["none", "cpu", "disk"] = "none"
    """Activation offload: saved activations go to pinned CPU memory (cpu) or memory-mapped files (disk)."""
    offload_min_kib: int = 1024
    """Saved tensors smaller than this (KiB) stay on the device: copying them costs more than it saves."""
    offload_dir: str | None = None
    """Directory for --offload disk files (default: the system temp dir); needs room for one step's activations."""
    offload_keep_gib: float = 0.0
    """GiB of saved activations kept on the device, the first saved in each forward; only the rest leave (host RAM limits)."""  # noqa: E501


def validate(cfg) -> None:
    o = cfg.offload
    if o.offload_min_kib < 0:
        raise UserError(f"--offload-min-kib must be >= 0 (got {o.offload_min_kib})")
    if o.offload_keep_gib < 0:
        raise UserError(f"--offload-keep-gib must be >= 0 (got {o.offload_keep_gib})")
    if o.offload_keep_gib and o.offload == "none":
        raise UserError("--offload-keep-gib is set but --offload is none; add --offload cpu or drop it")
    if o.offload != "disk" and o.offload_dir is not None:
        raise UserError("--offload-dir is for --offload disk; add --offload disk or drop --offload-dir")
    if o.offload_dir is not None and not os.path.isdir(o.offload_dir):
        raise UserError(f"--offload-dir {o.offload_dir}: not a directory; create it or pick another")


class _Store:
    """Where copies go: pinned host memory or memory-mapped files. Both return CPU tensors."""

    def __init__(self, kind: str, directory: str | None):
        self.kind, self.pin = kind, torch.cuda.is_available()
        self.tmp = tempfile.TemporaryDirectory(prefix="nanotune-offload-", dir=directory) if kind == "disk" else None

    def empty_like(self, t: torch.Tensor) -> torch.Tensor:
        """An uninitialized contiguous CPU tensor of t's shape and dtype."""
        if self.kind == "cpu":
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin and t.is_cuda)
        return self._mapped(t)

    def _mapped(self, t: torch.Tensor) -> torch.Tensor:
        nbytes = t.numel() * t.element_size()
        fd, path = tempfile.mkstemp(dir=self.tmp.name)
        try:
            _reserve(fd, nbytes)
            flat = torch.from_file(path, shared=True, size=t.numel(), dtype=t.dtype)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise UserError(f"--offload disk: no space left in {self.tmp.name} for a "
                                f"{nbytes / 2**20:.1f} MiB activation; free space, point --offload-dir at a "
                                f"larger disk, or use --offload cpu") from e
            raise
        finally:
            os.close(fd)
            os.unlink(path)  # the mapping keeps the pages; the name is gone, so nothing leaks
        return flat.view(t.shape)


def _reserve(fd: int, nbytes: int) -> None:
    """Allocate the file's blocks now: a full disk raises ENOSPC here instead of a SIGBUS on write."""
    if nbytes:
        os.posix_fallocate(fd, 0, nbytes)


class _Packed:
    """One offloaded activation: its host copy, the event that says the copy out is done, and
    (after a prefetch) the device copy on its way back with the event that says it arrived."""

    __slots__ = ("host", "device", "event", "back", "prev", "__weakref__")

    def __init__(self, host, device, event):
        self.host, self.device, self.event, self.back, self.prev = host, device, event, None, None


class Offloader:
    """Saved-tensor pack/unpack hooks that copy activations out and back; one per model."""

    def __init__(self, cfg: OffloadConfig, device: torch.device):
        self.min_bytes, self.device = cfg.offload_min_kib * 1024, device
        self.keep_budget, self.kept_bytes = int(cfg.offload_keep_gib * 2**30), 0
        self.store = _Store(cfg.offload, cfg.offload_dir)
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.seen: dict[int, tuple] = {}  # id(tensor) -> (weakref to it, its _Packed): one copy per tensor
        self.last = None  # weak ref to the latest _Packed, chained for prefetching in backward
        self.params: set[int] = set()  # storages of the parameters
        self.weight_shapes: set[tuple] = set()
        self.copied_bytes = 0

    def keep(self, t: torch.Tensor) -> bool:
        return (type(t) is not torch.Tensor or t.device.type != self.device.type or t.numel() == 0
                or t.numel() * t.element_size() < self.min_bytes or self._is_weight(t))

    def _is_weight(self, t: torch.Tensor) -> bool:
        """A parameter, a view of one, or (likely) a cast copy of a frozen weight (autocast's bf16
        copy of an fp32 base weight): outside the graph, 2-D, a weight's shape. Keeping an activation
        that merely looks like one is safe, only less saving."""
        if isinstance(t, torch.nn.Parameter) or t.untyped_storage().data_ptr() in self.params:
            return True
        return not t.requires_grad and t.dim() == 2 and tuple(t.shape) in self.weight_shapes

    def pack(self, t: torch.Tensor):
        if self.keep(t):
            return t
        hit = self.seen.get(id(t))
        if hit is not None and hit[0]() is t:
            return hit[1]
        if self._within_budget(t):
            return t
        packed = self._copy_out(t)
        self.seen[id(t)] = (weakref.ref(t), packed)
        packed.prev, self.last = self.last, weakref.ref(packed)
        self.copied_bytes += t.numel() * t.element_size()
        return packed

    def _within_budget(self, t: torch.Tensor) -> bool:
        """--offload-keep-gib: the first activations of a forward stay while they fit the budget. Backward
        needs them last, so the copies back of the later ones still overlap the compute before them."""
        nbytes = t.numel() * t.element_size()
        if self.kept_bytes + nbytes > self.keep_budget:
            return False
        self.kept_bytes += nbytes
        return True

    def _copy_out(self, t: torch.Tensor) -> _Packed:
        src = t.contiguous()  # a strided view comes back as a contiguous tensor of the same values
        host = self.store.empty_like(src)
        if not self.cuda:
            host.copy_(src)
            return _Packed(host, t.device, None)
        if self.store.kind == "disk":  # pageable destination: a synchronous copy
            host.copy_(src)
            return _Packed(host, t.device, None)
        self.stream.wait_stream(torch.cuda.current_stream(t.device))  # t is fully computed
        with torch.cuda.stream(self.stream):
            host.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        src.record_stream(self.stream)  # the allocator must not reuse t's memory before the copy ends
        return _Packed(host, t.device, event)

    def unpack(self, packed):
        if not isinstance(packed, _Packed):
            return packed
        if packed.back is not None:  # prefetched on the side stream: wait for that copy only
            out, done = packed.back
            packed.back = None
            current = torch.cuda.current_stream(packed.device)
            current.wait_event(done)
            out.record_stream(current)  # allocated on the side stream, used on this one
        else:
            out = self._copy_back(packed)
        self._prefetch_before(packed)
        return out

    def _copy_back(self, packed: _Packed) -> torch.Tensor:
        if packed.event is not None:
            torch.cuda.current_stream(packed.device).wait_event(packed.event)
        return packed.host.to(packed.device, non_blocking=self.cuda and self.store.kind == "cpu")

    def _prefetch_before(self, packed: _Packed) -> None:
        """Backward runs in reverse: copy back the activation packed just before this one on the
        side stream, while this part of backward computes (with --ac full: the previous block's input)."""
        prev = packed.prev() if packed.prev is not None else None
        if not self.cuda or self.store.kind != "cpu" or prev is None or prev.back is not None:
            return
        self.stream.wait_event(prev.event)
        with torch.cuda.stream(self.stream):
            out = prev.host.to(prev.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        prev.back = (out, done)

    def start(self, params) -> None:
        self.seen.clear()
        self.last, self.kept_bytes = None, 0
        params = list(params)
        # FSDP2 / TP parameters are DTensors (no storage of their own): their local shard's storage
        self.params = {(p.to_local() if hasattr(p, "to_local") else p).untyped_storage().data_ptr() for p in params}
        self.weight_shapes = {s for p in params if p.dim() == 2 for s in (tuple(p.shape), tuple(p.shape[::-1]))}


def apply_offload(model, cfg: OffloadConfig, device: torch.device):
    """Offload the activations autograd saves inside `model`'s forward; returns the model."""
    offloader = Offloader(cfg, torch.device(device))
    model._offloader = offloader  # tests and logging read copied_bytes; the store lives as long as the model
    state = {}

    def enter(module, args, kwargs):
        offloader.start(module.parameters())
        state["hooks"] = torch.autograd.graph.saved_tensors_hooks(offloader.pack, offloader.unpack)
        state["hooks"].__enter__()

    def leave(module, args, kwargs, output):
        hooks = state.pop("hooks", None)
        if hooks is not None:
            hooks.__exit__(None, None, None)
        offloader.seen.clear()  # the forward is over; no tensor from it can be packed again

    model.register_forward_pre_hook(enter, with_kwargs=True)
    model.register_forward_hook(leave, with_kwargs=True, always_call=True)
    return model


def apply(model, cfg, run):
    """--offload cpu / disk: each block's saved activations to host memory or disk."""
    return apply_offload(model, cfg.offload, run.device)
