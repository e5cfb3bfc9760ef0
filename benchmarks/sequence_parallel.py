"""The longest sequence that trains with sequence parallelism over N GPUs.

    python benchmarks/sequence_parallel.py --gpus 8 --budget-s 900 --out sp.md         # see gpu_distributed.sh sp
    python benchmarks/sequence_parallel.py --device cpu --gpus 2 --start 256 --max-len 1024   # CPU check

Llama-3.1-8B shape (random weights, bf16), LoRA r=16, micro-batch 1, one row holding ONE document
of the full length (full causal attention, no packing shortcut), over `--cp N` (N = --gpus, all
of them one sequence-parallel group, --fsdp shards the base over them) with the --alst recipe
(tiled MLP, chunked loss, block inputs offloaded, --ac full, --lora-kernels). ROWS: Ulysses with
--attn flash (FlashAttention-4 on an H200) + --liger, the record row; ring (its own pure-PyTorch
attention: one block's scores per rank, so moderate lengths only). A try is one training step in
its own torchrun (its own process group, killed whole on timeout), so an out-of-memory error or a
hang ends only that try.

Lengths double from the row's start until a failure, the time budget or --max-len, then one
bisection step (3/4 of the failed length) when it fits the time left. A try starts only when its
predicted time fits what is left of the row's share: the last try's step time x (L'/L)^2
(attention is quadratic; an upper bound, the linear part grows slower) + its measured start-up;
before any try, --ref (one GPU's step at a length: 633 s at 512K, benchmarks/results/
2026-11-29-long-context-h200.md) scaled by (L/ref)^2 / N (Ulysses: each GPU runs 1/N of the heads),
and the start is halved until that fits. --offload-keep-gib is planned per try (plan_keep) so that
the block inputs not kept on the GPU fit each rank's share of --host-gib pinned host memory.

tokens/s is that one step's, warm-up included, for the whole row; peak GiB is rank 0's torch max
allocated memory.
"""

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
K = 1024
GIB = 2**30
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
ROWS = [  # (label, mode, flags, GPU-only flags, start per GPU, share of the budget)
    # --alst under DDP failed on 2026-11-25 (--tiled-mlp: "mark a variable ready only once"), so --fsdp
    ("Ulysses, --alst, --fsdp (+ --liger on GPUs; --attn in the note)", "ulysses",
     ["--sp-mode", "ulysses", "--fsdp", "--alst"], ["--liger"], 256 * K, 0.8),
    # ring materializes one (L/N)^2 block of scores per head: ~20 bytes x 32 heads x (L/N)^2 at once
    ("ring, --alst, --fsdp", "ring", ["--sp-mode", "ring", "--fsdp", "--alst"], [], 4 * K, 0.2),
]


def _text(path: Path, tokens: int) -> Path:
    """One document of random letters (the embedded tokenizer: about one token per letter + space)."""
    if not path.exists():
        rng = random.Random(0)
        path.write_text(json.dumps({"text": " ".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=tokens + 256))})
                        + "\n")
    return path


def plan_keep(args, mode: str, seq_len: int) -> tuple[float | None, str]:
    """(--offload-keep-gib per rank, why); None when the try cannot fit host + device memory.

    Per rank: the block inputs that --ac full saves (layers x L/N tokens x hidden bf16, + ~15% for
    RoPE's cos/sin) go to pinned host memory, except the first ones, which the GPU keeps while it has
    room beside the weights and one block's working set (--gib-per-token per local token: 48 GiB at
    512K on one H200 + Ulysses' all-to-all buffers; ring also one block's (L/N)^2 scores per head).
    Pinned blocks are rounded up to a power of two (torch's caching host allocator); what goes to
    the host must fit --host-gib / N (all ranks share the machine's RAM)."""
    local = seq_len // args.gpus
    hidden = local * args.hidden * 2
    layer = 1.15 * hidden / GIB
    pinned = (2 ** math.ceil(math.log2(hidden)) + 0.15 * hidden) / GIB
    scores = 24 * args.heads * local**2 / GIB if mode == "ring" else 0.0  # fp32 scores, softmax, grads of one block
    room = args.gpu_gib - args.fixed_gib - args.gib_per_token * local - scores
    kept = max(0, min(args.layers, math.floor(room / layer)))
    host = (args.layers - kept) * pinned
    if room < 0 or host > args.host_gib / args.gpus:
        return None, (f"block inputs {args.layers * layer:.0f} GiB per rank: {host:.0f} GiB of them in host memory "
                      f"(> {args.host_gib / args.gpus:.0f}) or a working set beyond the GPU ({room:.0f} GiB left)")
    keep = round(kept * layer + min(0.05, layer / 2), 2)  # the offloader keeps tensors while they fit
    return keep, f"block inputs {args.layers * layer:.0f} GiB per rank, {kept} of {args.layers} blocks' kept on the GPU"


def _run_group(cmd: list[str], env: dict, log_path: Path, timeout: float) -> tuple[int | None, float]:
    """Run cmd in its own process group; on timeout kill the whole group (torchrun AND its workers, which
    would otherwise keep the GPUs' memory). Returns (exit status or None on timeout, seconds)."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=max(timeout, 1)), time.perf_counter() - start
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 30)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=grace)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
            return None, time.perf_counter() - start


def try_length(args, mode: str, seq_len: int, flags: list[str], dirs: tuple[Path, Path], timeout: float) -> dict:
    tmp, runs = dirs  # (where the documents go, where each try's folder goes)
    run = runs / f"run-{len(list(runs.glob('run-*')))}-{mode}-{seq_len}"
    run.mkdir(parents=True)
    keep = []
    if args.device == "cuda":
        gib, why = plan_keep(args, mode, seq_len)
        if gib is None:
            return {"status": "memory (predicted)", "wall_s": 0.0, "error": why}
        keep = ["--offload-keep-gib", str(gib)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.gpus),
           str(ROOT / "train.py"), "--model", args.model, "--lora", "--lora-rank", "16", "--precision", "bf16",
           "--attn", args.attn, "--cp", str(args.gpus), "--seq-len", str(seq_len), "--device", args.device,
           "--dataset", str(_text(tmp / f"text-{seq_len}.jsonl", seq_len)), "--dataset-format", "pretrain",
           "--val-dataset", "none", "--micro-batch-size", "1", "--max-steps", "1", "--log-every", "1",
           "--warmup-steps", "0", "--eval-exact-match", "0", "--skip-export", "--output-dir", str(run / "out"),
           *flags, *keep]
    env = dict(os.environ, **NO_MULTICAST, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    (run / "cmd.txt").write_text(" ".join(cmd) + "\n")
    rc, wall = _run_group(cmd, env, run / "log.txt", timeout)
    text = (run / "log.txt").read_text(errors="replace")
    if rc is None:
        return {"status": "time", "wall_s": wall, "error": f"killed after {timeout:.0f} s", **_keep(keep)}
    if rc != 0:
        status = "oom" if "out of memory" in text.lower() or "outofmemoryerror" in text.lower() else "error"
        tail = [line for line in text.strip().splitlines() if "error" in line.lower()] or text.strip().splitlines()
        return {"status": status, "wall_s": wall, "error": (tail or ["?"])[-1][:300], **_keep(keep)}
    try:
        steps = [json.loads(line) for line in (run / "out" / "metrics.jsonl").read_text().splitlines()]
        step = [m for m in steps if "loss" in m][-1]
    except (OSError, ValueError, IndexError) as e:
        return {"status": "error", "wall_s": wall, "error": f"no metrics: {e}", **_keep(keep)}
    if step.get("tokens") != seq_len:  # the row must hold seq_len tokens (not a shorter tokenization)
        return {"status": "error", "wall_s": wall, "error": f"trained {step.get('tokens')} tokens, not {seq_len}"}
    return {"status": "ok", "wall_s": wall, "tokens_per_s": step["tokens_per_s"], "peak_gib": step["peak_mem_gib"],
            "loss": step["loss"], **_keep(keep)}


def _keep(keep: list[str]) -> dict:
    return {"offload_keep_gib": float(keep[1])} if keep else {}


def predict(args, mode: str, seq_len: int, fits: list, overhead: float) -> float | None:
    """Seconds a try at seq_len should take: from the last fit (quadratic), else from --ref (Ulysses
    on the GPU only: ring's pure-PyTorch attention has no reference); None = no idea."""
    if fits:
        n, r = fits[-1]
        return overhead + n / r["tokens_per_s"] * (seq_len / n) ** 2
    if args.ref and mode == "ulysses" and args.device == "cuda":
        ref_len, ref_s = (float(x) for x in args.ref.split(":"))
        return overhead + ref_s * (seq_len / ref_len) ** 2 / args.gpus
    return None


def _mid(low: int, high: int, step: int) -> int:
    return (low + high) // 2 // step * step


def _fill(args, mode, fits, overhead, budget: float, grain: int, cap: int) -> int:
    """The longest multiple of grain (at most cap) whose predicted time fits budget; 0 if none."""
    n = cap // grain * grain
    while n >= grain and predict(args, mode, n, fits, overhead) > budget:
        n -= grain
    return max(n, 0)


def search(args, mode: str, flags: list[str], start: int, dirs: tuple[Path, Path], deadline: float,
           log) -> list[tuple[int, dict]]:
    """A probe, then lengths as long as the time left allows (at most doubling); a failed start is
    halved (down to --min-len); after the first failure above a fit, one bisection step."""
    grain = 8 * K if args.device == "cuda" else 64  # multiples of 2N (ring's zig-zag shards)
    tries, overhead, ceiling, bisected = [], args.startup_s, None, False
    seq_len = max(grain, start // grain * grain)
    if predict(args, mode, seq_len, [], overhead) is not None:  # Ulysses on GPUs: the record that fits
        # 1/1.3 of the share, probed at half of it first (a probe costs ~1/4 of the record, quadratic)
        record = _fill(args, mode, [], overhead, (deadline - time.perf_counter()) / 1.3, grain, args.max_len)
        seq_len = max(args.min_len, record // 2 // grain * grain) if args.start is None else seq_len
    while seq_len <= args.max_len:
        fits = [(n, r) for n, r in tries if r["status"] == "ok"]
        left = deadline - time.perf_counter()
        predicted = predict(args, mode, seq_len, fits, overhead)
        if predicted is not None and predicted > left:
            tries.append((seq_len, {"status": "time (predicted %.0f s, %.0f s left)" % (predicted, left)}))
            log({"mode": mode, "seq_len": seq_len, **tries[-1][1]})
            break
        # a try may run past its prediction (1.25x + a minute) but never past the row's share
        limit = left if predicted is None else min(left, 1.25 * predicted + 60)
        result = try_length(args, mode, seq_len, flags, dirs, limit)
        if predicted is not None:
            result["predicted_s"] = round(predicted)
        tries.append((seq_len, result))
        log({"mode": mode, "flags": flags, "seq_len": seq_len, **result})
        fits = [(n, r) for n, r in tries if r["status"] == "ok"]
        best = max([n for n, _ in fits], default=0)
        if result["status"] == "ok":
            overhead = max(10.0, result["wall_s"] - seq_len / result["tokens_per_s"])
            if bisected:
                break
            cap = 2 * seq_len if ceiling is None else _mid(best, ceiling, grain)
            bisected = ceiling is not None
            room = (deadline - time.perf_counter()) / 1.15  # leave room for the prediction's error
            seq_len = _fill(args, mode, fits, overhead, room, grain, cap)
            if seq_len <= best:
                tries.append((cap, {"status": f"time (the time left fits "
                                              f"{_length(seq_len) if seq_len else 'nothing'})"}))
                break
        elif result["status"] in ("oom", "memory (predicted)", "time"):
            ceiling = seq_len
            if best and not bisected:
                seq_len, bisected = _mid(best, ceiling, grain), True
            elif not best and seq_len // 2 >= args.min_len:
                seq_len = seq_len // 2 // grain * grain
            else:
                break
        else:  # an error is a bug, not a length limit: look at its log
            break
        if seq_len <= best or (ceiling is not None and seq_len >= ceiling):
            break
    return tries


def _length(n: int) -> str:
    return f"{n // K}K" if n % K == 0 else f"{n:,}"


def table(args, rows) -> str:
    lines = [f"| {args.gpus} {'GPUs' if args.device == 'cuda' else 'CPU processes'}: settings | longest sequence "
             f"that trained | tokens/s | peak GiB (rank 0) | --offload-keep-gib | tries |", "|---|---|---|---|---|---|"]
    for label, tries in rows:
        fits = [(n, r) for n, r in tries if r["status"] == "ok"]
        n, r = max(fits, key=lambda x: x[0]) if fits else (0, {})
        done = ", ".join(f"{_length(m)} {x['status']}" for m, x in tries)
        keep = r.get("offload_keep_gib")
        lines.append(f"| {label} | {f'**{_length(n)}** ({n:,})' if n else 'none'} | {r.get('tokens_per_s', 0):,.0f} | "
                     f"{r.get('peak_gib') or 0:.1f} | {'-' if keep is None else keep} | {done} |")
    return "\n".join(lines)


def host_gib() -> float:
    """Pinned host memory all ranks may use for block inputs: half of the machine's RAM (the rest: the
    ranks' own processes, ~5 GiB each, page cache, the data)."""
    try:
        kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
        return round(kib / 2**20 * 0.5, 0)
    except (OSError, StopIteration, ValueError):
        return 0.0


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=8, help="processes = --cp (one sequence-parallel group)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: gloo processes, tiny-llama, --attn sdpa, no --liger (a check of this script)")
    p.add_argument("--model", default=None, help="a preset; default llama3-8b (cuda), tiny-llama (cpu)")
    p.add_argument("--attn", default=None, help="default flash (cuda), sdpa (cpu)")
    p.add_argument("--rows", default="ulysses,ring", help="which ROWS, by mode, in order")
    p.add_argument("--budget-s", type=float, default=900, help="all rows; each gets its share of what is left")
    p.add_argument("--start", type=int, default=None,
                   help="first length of every row (default: Ulysses on GPUs half the record --ref predicts for "
                        "the row's share; else the row's per-GPU start x N)")
    p.add_argument("--min-len", type=int, default=16 * K, help="a failed start is not halved below this")
    p.add_argument("--max-len", type=int, default=8192 * K)
    p.add_argument("--ref", default="524288:633", help="LEN:SECONDS of one step on ONE GPU (Ulysses prediction)")
    p.add_argument("--startup-s", type=float, default=90, help="assumed start-up of a try before one is measured")
    p.add_argument("--gpu-gib", type=float, default=128, help="device memory per GPU the plan may use")
    p.add_argument("--host-gib", type=float, default=None,
                   help="pinned host memory all ranks may use (default: half the RAM)")
    p.add_argument("--fixed-gib", type=float, default=20, help="per rank: weights, adapters, optimizer, buffers")
    p.add_argument("--gib-per-token", type=float, default=130 / 2**20, help="per rank: working set per local token")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--out", default=None)
    p.add_argument("--logs", default=None, help="JSONL of every try (appended)")
    p.add_argument("--keep-runs", default=None, help="a folder to keep each try's command, log and metrics in")
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    args.model = args.model or ("tiny-llama" if cpu else "llama3-8b")
    args.attn = args.attn or ("sdpa" if cpu else "flash")
    args.host_gib = host_gib() if args.host_gib is None else args.host_gib
    return args


def main(argv=None) -> str:
    args = parse(argv)
    tmp = Path(tempfile.mkdtemp(prefix="sp-bench-"))  # the documents (MBs); the runs go to --keep-runs when given
    runs = Path(args.keep_runs) if args.keep_runs else tmp
    runs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log_file = open(args.logs, "a") if args.logs else None

    def log(record):
        print(json.dumps(record), flush=True)
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    chosen = [r for mode in args.rows.split(",") for r in ROWS if r[1] == mode]
    rows, shares = [], sum(r[5] for r in chosen)
    for label, mode, flags, gpu_flags, per_gpu, share in chosen:
        left = args.budget_s - (time.perf_counter() - t0)
        row_flags = flags + (gpu_flags if args.device == "cuda" else [])
        start = args.start or per_gpu * args.gpus
        rows.append((label, search(args, mode, row_flags, start, (tmp, runs),
                                   time.perf_counter() + left * share / shares, log)))
        shares -= share
    note = (f"\n{args.model} (llama3-8b = the Llama-3.1-8B shape), LoRA r=16, bf16, --attn {args.attn}, one "
            f"document per row, one step per try, --cp {args.gpus}; {versions()}; host memory for offload "
            f"{args.host_gib:.0f} GiB; budget {args.budget_s:.0f} s (used {time.perf_counter() - t0:.0f} s)")
    text = table(args, rows) + "\n" + note
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text, flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return text


def versions() -> str:
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"torch {torch.__version__}, {name}, PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '')}"


if __name__ == "__main__":
    main()
