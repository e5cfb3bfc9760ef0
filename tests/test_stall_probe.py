"""benchmarks/stall_probe.py: a new FlashAttention-4 kernel is reported with the key fields that changed,
and only calls slower than the floor are reported."""

import re
import sys
import time
import types

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import stall_probe  # noqa: E402


class FakeJITCache:  # flash_attn.cute.cache_utils.JITCache keeps its kernels in `cache`, keyed by a tuple
    def __init__(self):
        self.cache = {}

    def __setitem__(self, key, kernel):
        self.cache[key] = kernel


def test_a_new_kernel_names_the_key_fields_that_changed(capsys):
    stall_probe.report_new_fa4_keys(FakeJITCache)
    cache = FakeJITCache()
    cache[(90, "bf16", False, False)] = "first"
    assert capsys.readouterr().out == ""  # the first kernel of a cache is the warm-up, not a stall
    cache[(90, "bf16", False, True)] = "single key tile"
    out = capsys.readouterr().out
    assert "builds a kernel beside 1 in its cache; key fields changed: [(3, False, True)]" in out
    assert cache.cache[(90, "bf16", False, True)] == "single key tile"  # the kernel is still stored


def test_only_calls_over_the_floor_are_reported(capsys):
    owner = types.SimpleNamespace(build=lambda seconds: time.sleep(seconds) or seconds)
    stall_probe.time_calls(owner, "build", "kernel build", floor_s=0.05)
    assert owner.build(0) == 0 and capsys.readouterr().out == ""
    assert owner.build(0.06) == 0.06
    assert re.search(r"\] kernel build \d+\.\d\ds$", capsys.readouterr().out.strip())
