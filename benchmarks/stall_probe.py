"""Run train.py and say what stalls its host: FlashAttention-4 kernel builds (with the compile-key fields
that changed), Triton autotuning, garbage-collector pauses, and any place the main thread stays more
than half a second (its stack, once per stay). Each line carries the seconds since start, so it
lines up with a `--log-every 1` step log.

    python benchmarks/stall_probe.py --model llama3-8b --lora --dataset chats.jsonl --log-every 1 --max-steps 40

The probes wrap library functions from outside; train.py runs unchanged. A slow step with no probe
line beside it waited on the GPU, not the host.
"""

import gc
import os
import runpy
import sys
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START = time.perf_counter()
STUCK_S = 0.5


def say(message: str) -> None:
    print(f"[probe {time.perf_counter() - START:7.2f}s] {message}", flush=True)


def time_calls(owner, name: str, label: str, floor_s: float) -> None:
    """Wrap owner.name so that every call slower than floor_s is reported."""
    original = getattr(owner, name)

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            if (took := time.perf_counter() - t0) > floor_s:
                say(f"{label} {took:.2f}s")
    setattr(owner, name, timed)


def report_new_fa4_keys(cache_class) -> None:
    """Each kernel FlashAttention-4 adds to a JIT cache: which fields of its key differ from the
    nearest key already there (index, old, new)."""
    original = cache_class.__setitem__

    def setitem(self, key, kernel):
        known = [k for k in self.cache if isinstance(k, tuple) and len(k) == len(key)]
        if known:
            nearest = min(known, key=lambda k: sum(a != b for a, b in zip(k, key)))
            changed = [(i, a, b) for i, (a, b) in enumerate(zip(nearest, key)) if a != b]
            say(f"FlashAttention-4 builds a kernel beside {len(known)} in its cache; key fields changed: {changed}")
        return original(self, key, kernel)
    cache_class.__setitem__ = setitem


def install_library_probes() -> None:
    try:
        import cutlass.cute
        from flash_attn.cute import cache_utils
    except ImportError:
        say("no FlashAttention-4 here")
    else:
        time_calls(cutlass.cute, "compile", "FlashAttention-4 kernel build (cute.compile)", 0.05)
        report_new_fa4_keys(cache_utils.JITCache)
    try:
        import triton.runtime.autotuner
        from torch._inductor.runtime import triton_heuristics
    except ImportError:
        say("no Triton here")
    else:
        time_calls(triton.runtime.autotuner.Autotuner, "run", "Triton autotuned kernel call", 0.2)
        time_calls(triton_heuristics.CachingAutotuner, "benchmark_all_configs", "inductor autotuning", 0.05)


def install_gc_probe(floor_s: float = 0.02) -> None:
    started = {}

    def on_gc(phase, info):
        if phase == "start":
            started["t"] = time.perf_counter()
        elif "t" in started and (took := time.perf_counter() - started.pop("t")) > floor_s:
            say(f"gc generation {info['generation']}: {took * 1000:.0f} ms, {info['collected']} objects freed")
    gc.callbacks.append(on_gc)


def watch_main_thread() -> None:
    """Sample the main thread's stack every 50 ms; print it once when it stays put past STUCK_S."""
    main = threading.get_ident()

    def sample():
        last, since, told = None, time.perf_counter(), False
        while (frame := sys._current_frames().get(main)) is not None:
            stack = traceback.extract_stack(frame)
            here, now = [(f.filename, f.lineno) for f in stack[-6:]], time.perf_counter()
            if here != last:
                last, since, told = here, now, False
            elif not told and now - since > STUCK_S:
                told = True
                where = "".join(f"\n    {os.path.relpath(f.filename, ROOT)}:{f.lineno} {f.name}" for f in stack[-12:])
                say(f"main thread held {now - since:.1f}s at:{where}")
            time.sleep(0.05)
    threading.Thread(target=sample, daemon=True).start()


if __name__ == "__main__":
    install_library_probes()
    install_gc_probe()
    watch_main_thread()
    sys.path.insert(0, ROOT)
    sys.argv = [os.path.join(ROOT, "train.py")] + sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
