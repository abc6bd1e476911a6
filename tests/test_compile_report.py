"""The compile report: every kernel compiles for sm_80 and sm_90 without spills.

The test process runs under TRITON_INTERPRET=1 (no GPU); the report must drop it for
its own compile, which this test exercises by launching it from here as is.
"""
import os
import subprocess
import sys

import pytest

from lpjepa.kernels.compile_report import SHARED_LIMIT, _cuobjdump, report_problems

CLEAN = dict(regs=64, spill_st=0, spill_ld=0, stack=0, local=0, smem_static=0, smem_dynamic=4096)


@pytest.mark.skipif(_cuobjdump() is None, reason="cuobjdump (bundled with Triton's NVIDIA backend) is missing")
def test_quick_report_compiles_every_kernel_cleanly_and_models_the_paths():
    result = subprocess.run(
        [sys.executable, "-m", "lpjepa.kernels.compile_report", "--quick", "--model"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if " sm_" in line and not line[0].isdigit()]
    kernels = ("rgg p=1.5", "_project_kernel", "_sort_residual_kernel", "_residual_kernel", "_mean_of_partials_kernel")
    for kernel in kernels:
        for arch in ("sm_80", "sm_90"):
            assert any(row.startswith(kernel) and arch in row for row in rows), (kernel, arch, result.stdout)
    assert all(row.rstrip().endswith("ok") for row in rows), result.stdout
    assert "0 failing" in result.stdout
    model = result.stdout.split("Static performance model")[1].splitlines()
    # bf16 projections run on the tensor cores: HMMA / HGMMA in the SASS of both GPUs.
    for gpu in ("H100", "A100"):
        projections = [line.split() for line in model if line.startswith(gpu) and "_project_kernel" in line]
        assert projections and all(int(fields[-4]) > 0 for fields in projections), projections
        # The seed's shape already spreads its sorts over more programs than an H100 has SMs.
        sorts = [line.split() for line in model if line.startswith(gpu) and " seed " in line
                 and "_sort_residual_kernel" in line]
        assert sorts and all(int(fields[-7]) >= 132 for fields in sorts), sorts
        assert any(line.startswith(gpu) and "seed sequence" in line for line in model)
    assert sum("= path total" in line for line in model) == 2 * 3 * 4  # GPUs x shapes x paths


def test_report_problems_flags_spills_local_memory_and_shared_memory():
    assert report_problems(CLEAN, 80) == []
    assert report_problems(dict(CLEAN, spill_st=4), 90) == ["SPILL"]
    assert report_problems(dict(CLEAN, local=8), 90) == ["SPILL"]
    assert report_problems(dict(CLEAN, smem_dynamic=SHARED_LIMIT[80] + 1), 80) == ["SMEM>LIMIT"]
    # 200 KiB fits sm_90's 227 KiB but not sm_80's 163 KiB.
    big = dict(CLEAN, smem_static=1024, smem_dynamic=200 * 1024)
    assert report_problems(big, 90) == [] and report_problems(big, 80) == ["SMEM>LIMIT"]


def test_residency_follows_the_datasheet_rule():
    from lpjepa.kernels.perf_model import GPUS, residency

    h100 = GPUS["H100"]
    # 8 warps of 128 registers: 32768 registers a program, 2 fit in 65536.
    assert residency(128, 8, 0, h100) == 2
    # Registers are allocated per warp in 256s: 129 registers a thread count as 136.
    assert residency(129, 8, 0, h100) == 1
    # Shared memory, threads and the 32-block cap.
    assert residency(32, 4, 100 * 1024, h100) == 2
    assert residency(16, 16, 0, h100) == 4
    assert residency(16, 1, 0, h100) == 32


def test_bounds_scale_with_the_work():
    from lpjepa.kernels import perf_model as pm

    h100 = pm.GPUS["H100"]
    seed = pm.MODEL_SHAPES[0]
    official = pm.MODEL_SHAPES[1]
    cost = pm.projection_cost("p", 1, official.B, official.D, official.K, 2, False, programs=h100.sms)
    assert cost.flops == 2 * official.K * official.B * official.D
    # Compute-bound there: half the SMs busy, twice the bound.
    half = cost._replace(programs=h100.sms // 2)
    assert pm.kernel_bound_us(half, h100) == pytest.approx(2 * pm.kernel_bound_us(cost, h100))
    assert pm.bitonic_steps(8) == 8 * 3 * 4 / 2
    fwd = pm.path_costs(seed, ("triton", "registers"), with_backward=False)
    both = pm.path_costs(seed, ("triton", "registers"))
    assert pm.total_bound_us(both, h100)[0] > pm.total_bound_us(fwd, h100)[0]
    # path_costs' count (kernels/perf_model.py): the target draw, 3 for the directions, the stack, 2 casts,
    # 2 projections, the sort-residual and the mean forward; the residual scale, its cast and one matmul backward.
    assert pm.total_bound_us(fwd, h100)[1:] == (11, 11 * pm.LAUNCH_US)
    assert pm.total_bound_us(both, h100)[1:] == (14, 14 * pm.LAUNCH_US)
