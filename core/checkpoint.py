"""Resumable checkpoints, written atomically, and the final Hugging Face export.

    python train.py --output-dir runs/a --save-every 100
    python train.py --output-dir runs/a --resume auto          # continues from the latest checkpoint
    python train.py --output-dir runs/b --resume runs/a/checkpoints/step_00000100  # from a given one, into runs/b

Layout of `<output-dir>/checkpoints/step_<N>/`: the trainable weights and the optimizer state
through torch.distributed.checkpoint (sharded-ready, so later parallel layouts can reshard),
`trainer_state.json` (step, scheduler, data position), `rng_rank<R>.pt`, and last
`manifest.json`: every file's size and SHA-256. A checkpoint is written under a `.tmp-` name and
renamed when complete, so a run killed mid-save (even with SIGKILL) leaves the previous checkpoint
intact. `--resume auto` takes the newest checkpoint whose files match its manifest and skips, with
a warning, any that is truncated or corrupt (a disk error, a copy cut short). A save that fails
(disk full) removes its partial directory, keeps every earlier checkpoint and stops the run with
one line saying so. Hashing reads each saved file once more, on rank 0.
"""

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch

from core import UserError
from core.distributed import Dist, barrier, broadcast_object, unwrap
from core.optim import plan_changes

ENGINE_TAG = "deepspeed"  # the sub-directory of DeepSpeed's own files inside a step_<N> checkpoint


def _is_engine(model) -> bool:
    """--deepspeed (features/deepspeed_zero.py) wraps the model in DeepSpeed's engine, which saves and
    loads its own partitioned format through its own methods."""
    return type(model).__name__ == "DeepSpeedEngine"


def _load_engine(engine, path: Path) -> None:
    loaded, _ = engine.load_checkpoint(str(path), tag=ENGINE_TAG, load_lr_scheduler_states=False,
                                       load_module_strict=False)  # frozen weights come from --model
    if loaded is None:
        raise UserError(f"--resume {path}: no DeepSpeed checkpoint in it (it was not saved with --deepspeed)")


_STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"

# torch.distributed.checkpoint is imported where a checkpoint is saved or loaded: it pulls in DTensor and
# sympy, which `train.py --help` and a refused flag need not wait for


def _options():
    """Frozen weights are not saved (an adapter run stores only the adapter); strict=False lets them load."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _trainable(model) -> dict:
    """The trainable parameters by name, as detached views that DCP loads into in place.

    Not get_state_dict's model.state_dict(): a quantized base adds non-parameter entries there
    (bitsandbytes' absmax, SCB) that it cannot map to attributes (8-bit: AttributeError 'SCB') or
    saves into every checkpoint (4-bit), torch 2.13 + bitsandbytes 0.50.2; a resume rebuilds the
    frozen base from --model anyway.
    """
    return {n.replace("_orig_mod.", ""): p.detach() for n, p in unwrap(model).named_parameters() if p.requires_grad}


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in an output dir (renamed from .tmp-, with their state), oldest first."""
    root = Path(output_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in root.glob("step_*") if (m := _STEP_DIR.match(p.name))]
    return sorted(p for p in found if (p[1] / "trainer_state.json").is_file())


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(ckpt: Path) -> None:
    """Size and SHA-256 of every file in a checkpoint; written last, so its presence means complete."""
    files = {str(f.relative_to(ckpt)): {"bytes": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(ckpt.rglob("*")) if f.is_file() and f.name != MANIFEST}
    (ckpt / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def verify(ckpt: Path) -> str | None:
    """None when every file matches the manifest, else what is wrong."""
    try:
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (the save did not finish)"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"{MANIFEST} is damaged"
    for name, want in files.items():
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{name} is truncated or altered ({f.stat().st_size} of {want['bytes']} bytes)"
        if _sha256(f) != want["sha256"]:
            return f"{name} fails its SHA-256 checksum (corrupt)"
    return None


def resolve_resume(resume: str | None, output_dir: Path, d: Dist = Dist()) -> Path | None:
    """The checkpoint to continue from: --resume PATH (verified), or the newest valid one for 'auto'.
    Rank 0 verifies (each checkpoint file is read once, not once per rank); every rank gets its verdict."""
    if resume is None:
        return None
    path, error = broadcast_object(_resolve(resume, Path(output_dir)) if d.is_main else None, d)
    if error is not None:
        raise UserError(error)
    return path


def _resolve(resume: str, output_dir: Path) -> tuple[Path | None, str | None]:
    """(checkpoint or None, error or None)."""
    if resume == "auto":
        for _, path in reversed(checkpoints(output_dir)):
            problem = verify(path)
            if problem is None:
                return path, None
            print(f"warning: skipping checkpoint {path}: {problem}; trying an older one", file=sys.stderr)
        if (output_dir / "final").exists():
            return None, (f"--resume auto: {output_dir} holds a finished run (final/) and no checkpoint to continue "
                          f"from; choose another --output-dir (--save-every N keeps checkpoints)")
        print(f"resume: no checkpoint in {output_dir} yet; starting from step 0")  # safe to requeue
        return None, None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        return None, (f"--resume {resume}: not a complete checkpoint directory (no trainer_state.json); "
                      f"pass a checkpoints/step_<N> directory or 'auto'")
    if (problem := verify(path)) is not None:
        return None, f"--resume {resume}: {problem}; pass an older checkpoint or 'auto' (takes the newest valid one)"
    return path, None


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# torch.save's zip writer reports a full disk as a RuntimeError with no errno ("[enforce fail at
# inline_container.cc:672] . unexpected pos 704 vs 598", "basic_ios::clear: iostream error"; torch 2.13)
_TORCH_WRITE_FAILED = ("inline_container.cc", "PytorchStreamWriter", "iostream error")


def _write_error(e: BaseException, where: Path) -> str | None:
    """Why a save failed to write (disk full, quota, a read-only disk), or None for another error: an
    OSError, safetensors' error around one ("I/O error: No space left on device (os error 28)"), torch's
    writer's, or one of these inside DCP's CheckpointException or as the cause of another."""
    said = str(e)
    if isinstance(e, OSError):
        return e.strerror or said
    if type(e).__name__ == "SafetensorError" and "I/O error: " in said:
        return said.split("I/O error: ", 1)[1]
    if isinstance(e, RuntimeError) and any(s in said for s in _TORCH_WRITE_FAILED):
        return f"a file could not be written ({said.splitlines()[0]}), {_free(where)} free on its disk"
    for exc, _ in getattr(e, "failures", {}).values():
        if (why := _write_error(exc, where)) is not None:
            return why
    return _write_error(e.__cause__, where) if e.__cause__ is not None else None


def _free(where: Path) -> str:
    """The free space on the disk of `where` (or of its nearest existing parent)."""
    while not where.exists() and where != where.parent:
        where = where.parent
    return f"{shutil.disk_usage(where).free / 2**30:.2f} GiB"


def save_checkpoint(output_dir: Path, step: int, model, optimizer, scheduler, batches, d: Dist,
                    keep: int, tokens: int = 0) -> Path:
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    root = Path(output_dir) / "checkpoints"
    tmp = root / f".tmp-step_{step:08d}"
    try:
        return _save(root, step, model, optimizer, scheduler, batches, d, keep, tokens)
    except (Exception, CheckpointException) as e:
        if (why := _write_error(e, root)) is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # the partial save; earlier checkpoints stay untouched
        good = checkpoints(output_dir)
        kept = "the last good checkpoint " + str(good[-1][1]) + " is kept" if good else "no earlier checkpoint exists"
        raise UserError(f"saving checkpoint {tmp.name[5:]} in {root} failed: {why}; "
                        f"{kept}. "
                        f"Free disk space (or lower --keep-checkpoints), then rerun with --resume auto") from e


def _save(root: Path, step: int, model, optimizer, scheduler, batches, d: Dist, keep: int, tokens: int) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    final, tmp = root / f"step_{step:08d}", root / f".tmp-step_{step:08d}"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(d)
    if _is_engine(model):  # --deepspeed: the engine's own format (ZeRO partitions, frozen weights left out)
        model.save_checkpoint(str(tmp), tag=ENGINE_TAG, save_latest=False, exclude_frozen_parameters=True)
    else:
        optim_sd = get_optimizer_state_dict(unwrap(model), optimizer, options=_options())
        with warnings.catch_warnings():  # one process: DCP warns that it runs without a process group
            warnings.simplefilter("ignore", UserWarning)
            dcp.save({"model": _trainable(model), "optim": optim_sd}, checkpoint_id=tmp)
    torch.save(_rng_state(), tmp / f"rng_rank{d.rank}.pt")
    barrier(d)
    if d.is_main:
        state = {"step": step, "tokens": tokens, "world_size": d.world_size, "data": batches.state_dict(),
                 "scheduler": scheduler.state_dict()}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        write_manifest(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # atomic: the checkpoint appears complete or not at all
        for _, old in checkpoints(root.parent)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier(d)
    return final


def check_resume(path: Path, plan: dict, batches, d: Dist, deepspeed: bool) -> dict:
    """The checkpoint's trainer state (step, tokens, ...), read before the model loads: a resume that cannot
    continue the saved run is refused here, not minutes later. Refused: a changed schedule or optimizer
    (`plan`, core/optim.py schedule_plan), other rows a step, a checkpoint of the other format (DeepSpeed's
    or DCP's), a DeepSpeed checkpoint on another number of ranks. Restores the data position."""
    state = json.loads((path / "trainer_state.json").read_text())
    if deepspeed != (path / ENGINE_TAG).is_dir():  # DeepSpeed's engine and DCP keep the weights in other files
        saved, fix = ("with", "pass the same --deepspeed") if not deepspeed else ("without", "drop --deepspeed")
        raise UserError(f"--resume {path}: saved {saved} --deepspeed, it resumes only so; {fix}, or start anew "
                        f"in another --output-dir")
    saved = state["scheduler"].get("plan", {})
    if state["step"] >= plan.get("total_steps", 0):  # --max-steps at the saved step: only final/ is written, but
        saved = {k: v for k, v in saved.items() if k == "optimizer"}  # the optimizer's state still loads
    if changed := plan_changes(saved, plan):
        raise UserError(f"--resume {path}: this run changes {'; '.join(changed)}, which would bend the schedule or "
                        f"the optimizer midway; resume with the saved values, or start anew in another --output-dir")
    batches.load_state_dict(state["data"])
    if deepspeed and state["world_size"] != d.world_size:  # the engine's own format
        raise UserError(f"--resume {path}: a DeepSpeed checkpoint resumes on the number of ranks that saved it "
                        f"({state['world_size']}; this run has {d.world_size}); launch that many")
    return state


def load_checkpoint(path: Path, state: dict, model, optimizer, scheduler, d: Dist) -> None:
    """Restore the weights, optimizer, schedule and RNG that save_checkpoint wrote (after check_resume,
    whose `state` this is)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    if _is_engine(model):  # --deepspeed
        _load_engine(model, path)
    else:
        check_same_weights(path, _trainable(model))
        optim_sd = get_optimizer_state_dict(unwrap(model), optimizer, options=_options())
        sd = {"model": _trainable(model), "optim": optim_sd}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(sd, checkpoint_id=path)  # weights load in place; the optimizer state is set below
        set_optimizer_state_dict(unwrap(model), optimizer, sd["optim"], options=_options())
    scheduler.load_state_dict(state["scheduler"])
    rng_file = path / f"rng_rank{d.rank}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: fresh RNG there
        _set_rng_state(torch.load(rng_file, weights_only=False))


def check_same_weights(path: Path, trainable: dict) -> None:
    """Refuse a checkpoint whose trained weights are not this run's: another --model, --lora-rank or
    --lora-targets, an adapter resumed as a full fine-tune. DCP would stop with a traceback on a missing
    or resized weight, and load a subset silently (fewer --lora-targets drop the others' training)."""
    import torch.distributed.checkpoint as dcp

    saved = {k[len("model."):]: tuple(m.size) for k, m in dcp.FileSystemReader(path).read_metadata()
             .state_dict_metadata.items() if k.startswith("model.")}
    here = {k: tuple(p.shape) for k, p in trainable.items()}  # a DTensor's shape is the whole weight's
    resized = [k for k in saved.keys() & here.keys() if saved[k] != here[k]]
    problems = [f"{len(names)} {what} (first: {min(names)}{detail(min(names))})" for names, what, detail in (
        (resized, "of another shape", lambda k: f", saved {list(saved[k])}, here {list(here[k])}"),
        (saved.keys() - here.keys(), "saved that this run does not train", lambda k: ""),
        (here.keys() - saved.keys(), "trained here that it did not save", lambda k: "")) if names]
    if problems:
        raise UserError(f"--resume {path}: its weights are not this run's: {'; '.join(problems)}. Resume with the "
                        f"--model and adapter flags (--lora, --lora-rank, --lora-targets, --dora) that saved it "
                        f"(config.json beside checkpoints/ keeps them), or start anew in another --output-dir")


@contextlib.contextmanager
def atomic_dir(out: Path):
    """Yield a temporary sibling directory to fill; it replaces `out` only once the block completes,
    so a run killed mid-write leaves the previous `out` (or none), never a partial one."""
    out = Path(out)
    tmp = out.with_name(".tmp-" + out.name)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write (disk full) leaves no partial copy taking space
        raise
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


@contextlib.contextmanager
def final_dir(out: Path):
    """atomic_dir for a model a run writes once it has trained: a failed write ends the run in one line that
    says how to write it again, from the run's last checkpoint when there is one."""
    out = Path(out)
    try:
        with atomic_dir(out) as tmp:
            yield tmp
    except Exception as e:
        if (why := _write_error(e, out.parent)) is None:
            raise
        good = checkpoints(out.parent)
        again = (f"then rerun with the same flags plus --resume auto: it continues from {good[-1][1]} and writes "
                 f"{out.name}/" if good else "then train again: no checkpoint holds the trained weights "
                 "(--save-every N keeps them)")
        raise UserError(f"writing {out} failed: {why}; free disk space, {again}") from e


def export_hf(model, tokenizer, out: Path, d: Dist) -> Path | None:
    """Write the final model + tokenizer with save_pretrained (atomically, rank 0)."""
    if not d.is_main:
        return None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per shard drowns the log of a non-interactive run
    net = unwrap(model)
    stop_at_end_of_turn(getattr(net, "generation_config", None), tokenizer)
    with final_dir(out) as tmp, kv_cache_on(net.config):
        net.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def stop_at_end_of_turn(generation_config, tokenizer) -> None:
    """generate() stops where a chat run taught the model to stop: the template's end-of-turn token joins
    eos_token_id. A base model's eos is not its template's (Llama 3.1's <|end_of_text|> and <|eot_id|>,
    Qwen2.5's <|endoftext|> and <|im_end|>): without it, generation runs past the answer."""
    from core.chat import end_of_turn_id

    end = end_of_turn_id(tokenizer)
    if generation_config is None or end is None:
        return
    ids = generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if end not in ids:
        generation_config.eos_token_id = ids + [end]


@contextlib.contextmanager
def kv_cache_on(config):
    """The model's config as saved for inference: the KV cache on, which training turns off (core/model.py)."""
    config.use_cache = True
    try:
        yield
    finally:
        config.use_cache = False


def prepare_output_dir(output_dir: str | None, resume: str | None, d: Dist) -> Path:
    """--output-dir (default runs/<date-time>, the same on every rank); refuses one that holds an
    earlier run (checkpoints, metrics, a final model) unless the run resumes."""
    import time

    out = Path(output_dir or broadcast_object(time.strftime("runs/%Y%m%d-%H%M%S"), d))
    if resume is None and checkpoints(out):
        raise UserError(f"--output-dir {out} already holds checkpoints; pass --resume auto to continue "
                        f"that run, or choose another --output-dir")
    if resume is None and ((out / "final").exists() or (out / "metrics.jsonl").exists()):
        raise UserError(f"--output-dir {out} holds an earlier run's results; choose another --output-dir, "
                        f"or delete it to start over")
    if (problem := broadcast_object(_unwritable(out) if d.is_main else None, d)) is not None:
        raise UserError(f"--output-dir {out} cannot be written ({problem}); pass a directory you can write to")
    return out


def _unwritable(out: Path) -> str | None:
    """Why the run could not write its directory, found before the data and the model load (it is
    first written once they have), or None."""
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror or str(e)
    return None
