"""Faults: stop cleanly on preemption, skip non-finite steps, explain out-of-memory.

    python train.py --output-dir runs/a --save-every 200   # SIGTERM / SIGUSR1: finish the step, save, exit 0
    python train.py --output-dir runs/a --resume auto       # ... then continue exactly where it stopped
    python train.py --max-bad-steps 5                       # allow 4 non-finite steps in a row, stop at the 5th

Preemption: SLURM (`--signal=USR1@120`, or SIGTERM before a kill) and Kubernetes send a signal some
time before they kill a job. The handler only sets a flag; train.py polls `StepGuard.update_ok`
once per step, so the current step finishes, a checkpoint is written and the run exits with status
0 and a "resume with --resume auto" line. With several ranks the flags are summed over ranks, so
every rank stops after the same step even when only one of them got the signal. A signal during
start-up (loading) is kept, and the first step stops. Ctrl-C (SIGINT) stops the same way; a second
Ctrl-C stops at once, unsaved, in one line (exit 130).

Numerics: a step whose loss or gradient norm is inf/NaN is skipped (no optimizer or schedule step,
the gradients are dropped), counted in metrics.jsonl as `skipped_steps`, and left out of the logged
loss; --max-bad-steps such steps in a row stop the run with a message. Checking costs one host
sync per step (one small all-reduce with several ranks), which also carries the stop flag.

Out of memory: `oom_report` turns torch.OutOfMemoryError into one message with the sizes involved
and the flags that reduce memory that this run does not use yet.

References: SLURM sbatch --signal; torchtitan's non-finite-loss checks; PyTorch GradScaler's
skip-on-inf step. Works with every other flag (the hook is independent of the model); with
--deepspeed the engine has already applied the step when the guard looks, so a non-finite step
is counted and stops the run after --max-bad-steps, but is not undone.
"""

import contextlib
import dataclasses
import io
import os
import re
import signal
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from core import UserError, compat, optional
from core.distributed import Dist, peer_failure, record_error, teardown

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # SIGINT: Ctrl-C, which a second one makes immediate
_EARLY: list[str] = []  # SIGTERM / SIGUSR1 while the run starts (loading): the first step stops and saves


@dataclasses.dataclass
class FaultsConfig:
    max_bad_steps: int = 3
    """Stop the run after this many steps in a row with a non-finite loss or gradient norm (each one is skipped, not applied)."""  # noqa: E501


def validate(cfg) -> None:
    if cfg.faults.max_bad_steps < 1:
        raise UserError(f"--max-bad-steps must be at least 1 (got {cfg.faults.max_bad_steps})")


SAVED_ON_STOP_FILE = "NANOTUNE_SAVED_ON_STOP_FILE"  # set by launch/torchrun.py: where a node says it saved


class StepGuard:
    """Polled once per step: may this step's update be applied, and should the run stop after it?"""

    def __init__(self, cfg: FaultsConfig, d: Dist):
        self.max_bad, self.d = cfg.max_bad_steps, d
        self.skipped = self.bad_in_row = self.applied = 0  # applied: updates since the last log line
        self.signal: str | None = _EARLY[-1] if _EARLY else None  # the signal that arrived on this rank
        self.stop = False  # agreed over ranks: save and exit after this step
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            self._previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.signal == "SIGINT":  # a second Ctrl-C: stop now, without saving (run() ends it in one line)
                raise KeyboardInterrupt
            if self.d.is_main:
                print("Ctrl-C: finishing this step, then saving; press Ctrl-C again to stop at once, unsaved",
                      file=sys.stderr, flush=True)
        self.signal = signal.Signals(signum).name  # only a flag: the step in flight finishes first

    def update_ok(self, step_loss: torch.Tensor, grad_norm: torch.Tensor, step: int) -> bool:
        """False for a non-finite step (skip its update); sets `stop` when a signal arrived on any rank."""
        bad = ~(torch.isfinite(step_loss) & torch.isfinite(grad_norm))
        flags = torch.stack([bad.float(), torch.tensor(float(self.signal is not None), device=bad.device)])
        if self.d.world_size > 1:  # every rank (dp, tp, cp alike) must take the same branch
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        n_bad, n_stop = flags.tolist()  # the step's one host sync
        self.stop = self.stop or n_stop > 0
        if n_bad == 0:
            self.bad_in_row, self.applied = 0, self.applied + 1
            return True
        self.skipped, self.bad_in_row = self.skipped + 1, self.bad_in_row + 1
        if self.bad_in_row >= self.max_bad:
            raise UserError(f"steps {step - self.bad_in_row + 1}-{step}: {self.bad_in_row} steps in a row had a "
                            f"non-finite loss or gradient norm (--max-bad-steps {self.max_bad}); their updates "
                            f"were skipped. Lower --lr, raise --warmup-steps, set --max-grad-norm, check the data, "
                            f"or use --precision bf16-mixed / fp32")
        return False

    def metrics(self) -> dict:
        """For the log record: skipped steps so far; loss NaN when every step since the last line was skipped."""
        record = {"skipped_steps": self.skipped} | ({} if self.applied else {"loss": float("nan")})
        self.applied = 0
        return record

    def stop_message(self, checkpoint: Path, output_dir_given: bool) -> str:
        """The stop's line, also written where launch/torchrun.py reads it (its exit code: 0 once saved);
        the resume command names the run directory when the run chose it (runs/<date-time>)."""
        who = f"{self.signal} received" if self.signal else "another rank received a stop signal"
        flags = "--resume auto" if output_dir_given else f"--output-dir {checkpoint.parent.parent} --resume auto"
        message = (f"{who}: stopped after a complete step and saved {checkpoint}; "
                   f"resume with the same flags plus {flags}")
        if self.d.local_rank == 0 and (told := os.environ.get(SAVED_ON_STOP_FILE)):  # each node's launcher's exit
            Path(told).write_text(message)
        return message

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


# ---- out of memory

# (config field path, "already on" test, advice, the matrix row it turns on): the flags that lower peak
# memory, cheapest first. Paths missing from the Config (a feature not in this checkout) are skipped.
_MEMORY_FLAGS = [
    ("train.micro_batch_size", lambda v: v <= 1, "lower --micro-batch-size and raise --grad-accum (same global batch)",
     None),
    ("checkpointing.ac", lambda v: v != "none", "--ac full (recompute activations in backward)", "--ac full"),
    ("loss.loss", lambda v: v not in ("ce", "auto"), "--loss chunked (never materializes the full logits)",
     "--loss chunked"),
    ("lora_kernels.lora_kernels", bool, "--lora-kernels (fused LoRA, recomputes instead of saving)", "--lora-kernels"),
    ("lora.qlora", bool, "--qlora in place of --lora (4-bit base weights)", "--qlora"),
    ("offload.offload", lambda v: v not in ("none", None, False), "--offload cpu (activations to host memory)",
     "--offload cpu"),
    ("tiled_mlp.tiled_mlp", bool, "--tiled-mlp (MLP in sequence tiles)", "--tiled-mlp"),
    ("embedding_offload.offload_embeddings", bool,
     "--offload-embeddings (a frozen input-embedding table in CPU memory)", "--offload-embeddings"),
    ("sharding.fsdp", bool, "--fsdp with several GPUs (shards weights, grads and optimizer state)", "--fsdp"),
]
_REPLACES = {"--qlora": "--lora"}  # advice that swaps a flag: --qlora is advised only in place of --lora


def memory_advice(cfg) -> list[str]:
    """The memory-saving flags this run does not use yet and the compatibility matrix accepts with the
    flags it does use (no --lora-kernels for a full fine-tune, no --ac under CUDA graphs)."""
    present, on = {f.flag: f for f in compat.rows(cfg)}, compat.active(cfg)
    advice = []
    for path, is_on, text, flag in _MEMORY_FLAGS:
        value, there = compat.field_value(cfg, path)
        if there and not is_on(value) and (flag is None or _accepted(flag, on, present)):
            advice.append(text)
    return advice


def _accepted(flag: str, on: list, present: dict) -> bool:
    """Whether the matrix accepts `flag` beside the run's flags (the flag it would replace set aside)."""
    row, replaced = present.get(flag), _REPLACES.get(flag)
    if row is None or (replaced is not None and replaced not in {f.flag for f in on}):
        return False
    kept = [f for f in on if f.field != row.field and f.flag != replaced]
    return compat.problem(kept + [row], torch.cuda.is_available(), list(present.values())) is None


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def oom_report(err: BaseException, cfg) -> str:
    """One message for torch.OutOfMemoryError: what was asked, what was in use, and what to change."""
    asked = re.search(r"[Tt]ried to allocate ([\d.]+ [KMGT]?i?B)", str(err))
    sizes = [f"tried to allocate {asked.group(1)}"] if asked else []
    if torch.cuda.is_available():
        dev = torch.cuda.current_device()
        sizes += [f"{_gib(torch.cuda.memory_allocated(dev))} allocated",
                  f"{_gib(torch.cuda.memory_reserved(dev))} reserved",
                  f"peak {_gib(torch.cuda.max_memory_allocated(dev))}",
                  f"{_gib(torch.cuda.get_device_properties(dev).total_memory)} total on "
                  f"{torch.cuda.get_device_name(dev)}"]
    run = []
    for flag, path in (("--model", "model.path"), ("--precision", "model.precision"), ("--seq-len", "data.seq_len"),
                       ("--micro-batch-size", "train.micro_batch_size")):
        value, present = compat.field_value(cfg, path)
        if present:
            run.append(f"{flag} {value}")
    advice = memory_advice(cfg) if cfg is not None else []
    return (f"out of memory ({'; '.join(sizes) or str(err).splitlines()[0]}) with {', '.join(run)}. "
            f"To use less memory: {'; '.join(advice) or 'a smaller --seq-len or model'}")


def run(parse, train) -> int:
    """train(parse()) with the clean ends a user meets: a UserError is one line and exit 2, out of
    memory one line with the sizes and the flags that save memory (exit 3), a collective broken by
    another rank's exit one line from rank 0 (exit 1), a second Ctrl-C (or one before training) one line
    (exit 130). Each rank's own failure (a bug's last line too) also goes into torchrun's error file."""
    cfg = None

    def fail(message: str, code: int) -> int:
        if code != 2 or int(os.environ.get("RANK", "0")) == 0:  # bad input is the same on every rank: said once
            print(message, file=sys.stderr)
        record_error(message)  # torchrun's line names the first failed rank's
        return code

    try:
        with _early_signals():
            cfg = _parsed(parse)
            with optional.keep_out(optional.unused(cfg)):  # what other libraries would import on their own
                train(cfg)
        return 0
    except UserError as e:
        return fail(f"error: {e}", 2)
    except torch.OutOfMemoryError as e:
        return fail(f"error: {oom_report(e, cfg)}", 3)
    except KeyboardInterrupt:
        return fail("stopped at once by Ctrl-C: nothing saved since the last checkpoint", 130)
    except Exception as e:
        if isinstance(e, RuntimeError) and peer_failure(e):  # a collective broken by another rank's exit
            if int(os.environ.get("RANK", "0")) == 0:  # said once, not by every rank left; that rank says why
                print(f"error: {peer_failure(e)}", file=sys.stderr)
            return 1  # no error file: torchrun's root cause stays the rank that failed first
        record_error(crash_line(e))  # a bug: its traceback, and its last line for torchrun's summary
        raise
    finally:
        teardown()


def crash_line(err: BaseException) -> str:
    """An unexpected exception's one line: its type and its message's first line."""
    said = str(err).strip().splitlines()
    return f"{type(err).__name__}: {said[0]}" if said else type(err).__name__


def _parsed(parse):
    """parse(); a command line the parser refuses (it printed why) also goes into torchrun's error file."""
    try:
        with _silent_off_rank_0():
            return parse()
    except SystemExit as e:
        if e.code not in (0, None):
            record_error("error: the command line did not parse (the message above says why; train.py --help)")
        raise


@contextlib.contextmanager
def _silent_off_rank_0():
    """Every rank parses the same command line: its messages (a bad flag, --help) from rank 0 only."""
    if int(os.environ.get("RANK", "0")) == 0:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


@contextlib.contextmanager
def _early_signals():
    """SIGTERM / SIGUSR1 while the run starts (loading a model can take minutes) are kept, not a kill:
    the StepGuard takes them over, so the first step stops the run and saves."""
    _EARLY.clear()
    previous = {}
    if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
        previous = {s: signal.signal(s, lambda n, f: _EARLY.append(signal.Signals(n).name))
                    for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
