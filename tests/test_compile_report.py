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
def test_quick_report_compiles_every_kernel_cleanly():
    result = subprocess.run(
        [sys.executable, "-m", "lpjepa.kernels.compile_report", "--quick"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if " sm_" in line and not line[0].isdigit()]
    for kernel in ("rgg p=1.5", "_swd_fused_kernel", "_swd_residual_kernel", "_mean_of_partials_kernel"):
        for arch in ("sm_80", "sm_90"):
            assert any(row.startswith(kernel) and arch in row for row in rows), (kernel, arch, result.stdout)
    assert all(row.rstrip().endswith("ok") for row in rows), result.stdout
    assert "0 failing" in result.stdout


def test_report_problems_flags_spills_local_memory_and_shared_memory():
    assert report_problems(CLEAN, 80) == []
    assert report_problems(dict(CLEAN, spill_st=4), 90) == ["SPILL"]
    assert report_problems(dict(CLEAN, local=8), 90) == ["SPILL"]
    assert report_problems(dict(CLEAN, smem_dynamic=SHARED_LIMIT[80] + 1), 80) == ["SMEM>LIMIT"]
    # 200 KiB fits sm_90's 227 KiB but not sm_80's 163 KiB.
    big = dict(CLEAN, smem_static=1024, smem_dynamic=200 * 1024)
    assert report_problems(big, 90) == [] and report_problems(big, 80) == ["SMEM>LIMIT"]
