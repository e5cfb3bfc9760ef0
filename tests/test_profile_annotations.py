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
