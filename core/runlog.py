"""The run directory and the per-step record: what ran, on what, and how it went.

`<output-dir>/` holds `config.json` (the resolved config), `run.json` (argv, git SHA and dirty
flag, package versions, device, world size, data counts), `git.diff` when the tree is dirty,
and `metrics.jsonl` with one object per logged record. A training step's record (every --log-every
steps, the first and the last, each save and evaluation) holds `step`, `loss` (per target token over
the steps since the last record; NaN when all of them were skipped), `lr`, `grad_norm`, `tokens`
(seen so far), `tokens_per_s`, `mfu` (null where the GPU's peak is unknown, and on CPU),
`peak_mem_gib`, `eta_s` (StepMeter.record) and `skipped_steps` (non-finite steps so far, from
core/faults.py); on an evaluation step also `val_loss`, `exact_match` (with --eval-exact-match, when
any answer was scored) and `eval_s` (core/evaluate.py). With a validation set, the record of step 0
is the evaluation before training: `step`, `val_loss`, `exact_match`, `eval_s`. --wandb sends every
record to W&B too. Rank 0 writes them and prints one line per record (plus a progress bar when
stderr is a terminal).
"""

import dataclasses
import json
import platform
import resource
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("torch", "transformers", "peft", "datasets", "tokenizers", "tyro", "accelerate",
            "bitsandbytes", "flash-attn", "flash-attn-4", "torchao", "deepspeed", "liger-kernel",
            "cut-cross-entropy", "wandb")
# Dense bf16 datasheet peaks (FLOP/s) by GPU name; MFU is reported against these. The first name the
# device's contains wins, so a variant comes before its family ("H100 PCIe" before "H100", the SXM part).
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "H800": 989e12,
             "A100": 312e12, "B200": 2250e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}
_REPO = Path(__file__).resolve().parent.parent


def peak_flops(device: torch.device) -> float | None:
    return peak_for(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def peak_for(gpu_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its CUDA name ("NVIDIA H100 80GB HBM3"), or None when unknown."""
    return next((v for k, v in PEAK_BF16.items() if k in gpu_name), None)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def _versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {"python": platform.python_version(), **found}


def write_run_info(run_dir: Path, cfg, device: torch.device, world_size: int, extra: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1, default=str))
    diff = _git("diff", "HEAD")
    info = {"argv": sys.argv, "git_sha": (_git("rev-parse", "HEAD") or "").strip() or None,
            "git_dirty": bool(diff), "versions": _versions(), "device": device_name(device),
            "world_size": world_size, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
    (run_dir / "run.json").write_text(json.dumps(info, indent=1, default=str))
    if diff:
        (run_dir / "git.diff").write_text(diff)


def _fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def format_line(m: dict, total_steps: int) -> str:
    """The one human line per logged record: a training step's, or the evaluation before the first step."""
    parts = [f"step {m['step']}/{total_steps}"] + ([f"loss {m['loss']:.4f}"] if "loss" in m else [])
    if "val_loss" in m:
        parts.append(f"val {m['val_loss']:.4f}")
    if m.get("exact_match") is not None:
        parts.append(f"exact match {100 * m['exact_match']:.1f}%")
    if "eval_s" in m:
        parts.append(f"eval {_fmt_duration(m['eval_s'])}")
    if "loss" not in m:
        return " | ".join(parts)
    parts += [f"lr {m['lr']:.2e}", f"gnorm {m['grad_norm']:.3f}", f"{m['tokens_per_s']:,.0f} tok/s"]
    if m.get("mfu") is not None:
        parts.append(f"mfu {100 * m['mfu']:.1f}%")
    if m.get("peak_mem_gib"):
        parts.append(f"mem {m['peak_mem_gib']:.1f}GiB")
    parts.append(f"eta {_fmt_duration(m['eta_s'])}")
    return " | ".join(parts)


class StepMeter:
    """Loss and token counts between log lines; reduced over ranks only when a line is written,
    so a training step costs no host-device sync for logging."""

    def __init__(self, device: torch.device, world_size: int, flops: tuple[float, float], total_steps: int,
                 start_step: int, tokens: int):
        self.device, self.world, self.flops, self.total = device, world_size, flops, total_steps
        self.peak, self.tokens, self.steps_left = peak_flops(device), tokens, total_steps - start_step
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.targets = self.window_tokens = self.window_sq = self.steps = 0
        self.t_window = self.t_start = time.perf_counter()
        if device.type == "cuda":  # the training peak, not model setup (a preset's bf16 init before 4-bit)
            torch.cuda.reset_peak_memory_stats(device)

    def count(self, targets: int, tokens: int, sum_sq_len: int) -> None:
        self.targets, self.window_tokens = self.targets + targets, self.window_tokens + tokens
        self.window_sq += sum_sq_len

    def add_loss(self, loss_sum: torch.Tensor) -> None:
        self.loss += loss_sum.detach()

    def step_done(self) -> float:
        """Count a finished step; returns the window's tokens/s estimate for the progress bar."""
        self.steps += 1
        return self.window_tokens * self.world / max(time.perf_counter() - self.t_window, 1e-9)

    def record(self, step: int, lr: float, grad_norm: torch.Tensor, reduce) -> dict:
        """The metrics of the window that ends at `step` (reduce: the all-reduce-sum over ranks)."""
        counts = [self.targets, self.window_tokens, self.window_sq]
        counts = torch.tensor(counts, dtype=torch.float64, device=self.device)
        loss, targets, tokens, sum_sq = reduce(torch.cat([self.loss[None], counts])).tolist()
        now = time.perf_counter()
        tok_s = tokens / (now - self.t_window)
        flops_s = (self.flops[0] * tokens + self.flops[1] * sum_sq) / (now - self.t_window)
        self.tokens += int(tokens)
        record = {"step": step, "loss": loss / max(targets, 1), "lr": lr, "grad_norm": grad_norm.item(),
                  "tokens": self.tokens, "tokens_per_s": tok_s,
                  "mfu": flops_s / (self.peak * self.world) if self.peak else None,
                  "peak_mem_gib": peak_mem_gib(self.device),
                  "eta_s": (now - self.t_start) / self.steps * (self.total - step)}
        self.loss.zero_()
        self.targets = self.window_tokens = self.window_sq = 0
        self.restart_clock()
        return record

    def restart_clock(self) -> None:
        """Start the throughput window now (evaluation and checkpoint time is not training)."""
        self.t_window = time.perf_counter()


def peak_mem_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS; Linux reports KiB


class MetricsLog:
    """metrics.jsonl writer + console output. On resume, entries after the resumed step are cut; a fresh
    run starts the file empty."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool):
        self.enabled, self.total = enabled, total_steps
        self.path = run_dir / "metrics.jsonl"
        self.bar, self.sinks = None, []
        if not enabled:
            return
        keep = []  # a resumed run keeps the history up to its step; a fresh one starts the file anew
        if start_step > 0 and self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
        self.path.write_text("".join(line + "\n" for line in keep))
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def record_at(self, step: int) -> dict:
        """The record logged at `step` (the history a resumed run kept), or {} (no such record, or not rank 0)."""
        if not self.enabled or not self.path.exists():
            return {}
        records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        return next((r for r in records if r.get("step") == step), {})

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink(record)
        self.print(format_line(record, self.total))

    def add_sink(self, sink) -> None:
        """Also send every record to `sink(record)` (and `sink.close()` at the end): W&B, see core/tracking.py."""
        self.sinks.append(sink)

    def advance(self, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{tokens_per_s:,.0f} tok/s", refresh=False)
            self.bar.update(1)

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for sink in self.sinks:
            sink.close()
