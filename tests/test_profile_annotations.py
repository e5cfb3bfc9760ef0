"""benchmarks/profile_step.py counts kernels only: the GPU-side ranges of profiler annotations
(ProfilerStep#N, Optimizer.step#AdamW.step) would count their kernels a second time."""

import sys
from pathlib import Path
from types import SimpleNamespace

from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from profile_step import kernel_events  # noqa: E402


def _event(name, start, end, device=DeviceType.CUDA, annotation=False):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), device_type=device,
                           is_user_annotation=annotation)


def test_annotations_and_cpu_events_are_not_kernels():
    events = [_event("ProfilerStep#5", 0, 100), _event("Optimizer.step#AdamW.step", 80, 95),
              _event("an_annotation_flagged_by_torch", 0, 50, annotation=True),
              _event("aten::mm", 0, 10, device=DeviceType.CPU),
              _event("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", 1, 9),
              _event("void at::native::multi_tensor_apply_kernel<at::native::FusedAdamMathFunctor<float, 4>>", 80, 95)]
    assert [name for name, _, _ in kernel_events(events)] == [
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT",
        "void at::native::multi_tensor_apply_kernel<at::native::FusedAdamMathFunctor<float, 4>>"]


def test_idle_gaps_name_the_host_work_that_kept_the_gpu_waiting():
    from profile_step import gaps, idle_gaps

    kernels = [("gemm_a", 0, 1000), ("gemm_b", 1100, 2000),  # a 0.1 ms gap: below the threshold
               ("adam_kernel", 2000, 2500), ("flash_fwd", 7500, 9000)]  # a 5 ms gap after the optimizer
    host = [("aten::_local_scalar_dense", 2400, 7000), ("Optimizer.step#AdamW.step", 1900, 2600),
            ("aten::embedding", 7200, 7450)]
    text = idle_gaps(gaps(kernels), host, min_us=200)
    rows = [line for line in text.splitlines() if line.startswith("| 5.00")]
    assert len(rows) == 1 and "`adam_kernel`" in rows[0] and "`flash_fwd`" in rows[0]
    assert rows[0].index("aten::_local_scalar_dense") < rows[0].index("aten::embedding")  # most overlap first
    assert "`aten::_local_scalar_dense` 4.5" in rows[0] and "Optimizer.step" in rows[0]
    assert "0.10" not in text  # the short gap is left out


def test_idle_time_is_split_by_gap_length_and_charged_to_the_host_ops_that_overlap_it():
    from profile_step import gaps, idle_by_host_op, idle_by_length

    # gaps: 10-310 (0.3 ms), 320-6320 (6 ms), 6400-6420 (0.02 ms); k4 overlaps k3, leaving no gap between
    kernels = [("k1", 0, 10), ("k2", 310, 320), ("k3", 6320, 6330), ("k4", 6325, 6400), ("k5", 6420, 6430)]
    host = [("aten::all", 5, 110), ("cudaStreamSynchronize", 400, 6300), ("outer", 0, 7000)]
    idle = gaps(kernels)
    assert [(a, b) for a, b, *_ in idle] == [(10, 310), (320, 6320), (6400, 6420)]
    lengths = idle_by_length(idle, steps=1).splitlines()[2:]
    assert lengths == ["| under 0.05 ms | 1 | 0.0 |", "| 0.05-0.5 ms | 1 | 0.3 |", "| 0.5-5 ms | 0 | 0.0 |",
                       "| 5 ms or more | 1 | 6.0 |"]
    rows = [line for line in idle_by_host_op(idle, host, steps=1).splitlines() if line.startswith("| `")]
    assert rows == ["| `outer` | 6.3 |", "| `cudaStreamSynchronize` | 5.9 |", "| `aten::all` | 0.1 |"]


def test_idle_time_is_charged_to_the_kernel_each_gap_held_up():
    from profile_step import gaps, idle_by_next_kernel

    # gaps before "flat": 0.1 and 0.2 ms; before "gemm": 0.4 ms; one of 0.02 ms, left out
    kernels = [("gemm", 0, 10), ("flat", 110, 120), ("gemm", 520, 530), ("flat", 730, 740), ("gemm", 760, 770)]
    rows = [line for line in idle_by_next_kernel(gaps(kernels), steps=1).splitlines() if line.startswith("| `")]
    assert rows == ["| `gemm` | 1 | 0.4 |", "| `flat` | 2 | 0.3 |"]
    assert idle_by_next_kernel(gaps(kernels[:1]), steps=1).startswith("no gap of 0.05 ms")
