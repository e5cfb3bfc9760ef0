"""benchmarks/profile_step.py's breakdown: communication beside compute is not idle time."""

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import profile_step  # noqa: E402


def test_union_of_intervals():
    assert profile_step.covered([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20
    assert profile_step.covered([]) == 0


def test_nccl_beside_compute_is_not_idle_and_only_its_bare_part_is_exposed():
    # one step, 100 us: a GEMM 0-40, NCCL 30-60 (10 us beside the GEMM, 20 us alone), flash 70-90
    kernels = [("sm90_xmma_gemm_bf16", 0, 40), ("ncclDevKernel_AllGather_RING_LL", 30, 60),
               ("flash_fwd_kernel", 70, 90), ("vectorized_elementwise_kernel", 90, 100)]
    text = profile_step.table(kernels, steps=1)
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "| 0.0 | 30.0% |" in rows["communication (NCCL, beside compute)"]
    assert "| 0.0 | 20.0% |" in rows["communication alone (exposed)"]
    assert "| 0.0 | 10.0% |" in rows["idle (no kernel running)"]  # 60-70: nothing ran
    assert "| 0.0 | 40.0% |" in rows["matmul"] and "| 0.0 | 20.0% |" in rows["attention"]


def test_the_fused_loss_kernels_are_their_own_category():
    # CCE runs the head's matmuls inside its Triton kernels: counted as elementwise they hid a fifth of a step
    assert profile_step.category("_cce_backward_kernel") == "fused loss"
    assert profile_step.category("_cce_lse_forward_kernel") == "fused loss"
    assert profile_step.category("liger_cross_entropy_kernel") == "fused loss"
    assert profile_step.category("triton_per_fused_add_mul_0") == "triton (compiled)"
    assert profile_step.category("vectorized_elementwise_kernel") == "elementwise/reduction"
