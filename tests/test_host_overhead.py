"""The Triton path's host cost: what an eager step runs, launches and imports (issue 24).

Timing targets are held by ``benchmarks/host_overhead.py``, never here; these tests pin
what the step does: its launches, that eager calls skip the compile machinery, and (on a
GPU) that the step replays in a CUDA graph with the eager value.
"""
import subprocess
import sys
import textwrap

import pytest
import torch

import lpjepa
from conftest import requires_cuda, tolerance


def test_the_benchmark_counts_one_launch_per_kernel_and_no_custom_op_dispatch():
    from benchmarks import host_overhead

    result = host_overhead.measure(seconds=0.05)
    # One draw, the views and the target projected together, one sort for both views, one reduction,
    # and the views' gradient in one kernel.
    assert result["triton_launches"] == {"_rgg_kernel": 1, "_project_kernel": 1, "_sort_residual_kernel": 1,
                                         "_mean_of_partials_kernel": 1, "_project_backward_kernel": 1}
    torch_kernels = result["torch_kernels_on_triton_path"]
    # Eager calls run the Function's bodies directly, not through torch.library's dispatch.
    assert not [name for name in torch_kernels if "triton" in name or "sort_residual" in name], torch_kernels
    # The views' gradient takes no torch matmul, scale or cast beside its kernel.
    assert not [name for name in torch_kernels if name in ("mm", "bmm", "mul", "mul_", "_to_copy")], torch_kernels
    assert result["launches_per_step"] == 5 + sum(torch_kernels.values())
    # Issue 24's launch target, met: the five Triton launches are the whole step.
    assert result["launches_per_step"] == 5 and result["met"]["launches"], torch_kernels
    assert result["launches_per_step"] < result["plain_torch_launches"]
    assert all(us > 0 for us in result["host_us"].values()) and result["ratio"] > 0


def test_an_eager_step_loads_no_compile_registration():
    script = textwrap.dedent(
        """
        import os, sys
        os.environ["TRITON_INTERPRET"] = "1"
        import torch, lpjepa
        z = torch.randn(6, 4, requires_grad=True)
        lpjepa.RDMReg(num_projections=8, backend="triton")(z, z * 2).backward()
        lpjepa.RDMReg(num_projections=8, backend="torch")(z, z * 2).backward()
        print("compiled" if "lpjepa.ops.compiled" in sys.modules else "eager only")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("eager only")


@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_the_step_replays_in_a_cuda_graph_with_the_eager_value(backend):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU()).cuda()
    target = lpjepa.sample_rgg((256, 64), device="cuda")
    projections = lpjepa.reference.random_projections(256, 64, "cuda")

    def step(x1, x2):
        return lpjepa.rectified_lpjepa_loss(net(x1), net(x2), target=target, projections=projections,
                                            backend=backend).loss

    torch._dynamo.reset()
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    atol, rtol = tolerance(torch.float32)
    for _ in range(4):  # the first calls record, the later ones replay the graph
        x1, x2 = torch.randn(256, 32, device="cuda"), torch.randn(256, 32, device="cuda")
        torch.testing.assert_close(compiled(x1, x2), step(x1, x2), atol=atol, rtol=rtol)
