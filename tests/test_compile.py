"""torch.compile traces a model that uses the loss without a graph break at the loss.

``fullgraph=True`` turns any graph break into an error. Without a GPU the Triton
backend runs on the interpreter, where its ops are opaque custom ops; the GPU
registration (a ``triton_op`` that Inductor traces into) is checked by tracing it in a
subprocess without the interpreter, and run for real by the GPU-only test.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lpjepa
from conftest import requires_cuda, tolerance


class TinyModel(torch.nn.Module):
    def __init__(self, backend, dim=16):
        super().__init__()
        self.backend = backend
        self.net = torch.nn.Sequential(torch.nn.Linear(8, dim), torch.nn.ReLU())

    def forward(self, x1, x2, target, projections):
        parts = lpjepa.rectified_lpjepa_loss(
            self.net(x1), self.net(x2), target=target, projections=projections, backend=self.backend
        )
        return parts.loss


def _compiled_matches_eager(model, inputs, compile_backend, dtype=torch.float32):
    eager = model(*inputs)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=compile_backend, fullgraph=True)
    loss = compiled(*inputs)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    atol, rtol = tolerance(dtype)
    torch.testing.assert_close(loss, eager, atol=atol, rtol=rtol)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, atol=atol, rtol=rtol)


@pytest.mark.parametrize(
    "loss_backend,compile_backend",
    [("torch", "aot_eager"), ("torch", "inductor"), ("triton", "aot_eager"), ("triton", "inductor")],
)
def test_compiled_loss_matches_eager_with_fullgraph(loss_backend, compile_backend):
    torch.manual_seed(0)
    model = TinyModel(loss_backend)
    inputs = (torch.randn(32, 8), torch.randn(32, 8), lpjepa.sample_rgg((32, 16)),
              lpjepa.reference.random_projections(16, 16))
    _compiled_matches_eager(model, inputs, compile_backend)


@pytest.mark.parametrize("loss_backend", ["torch", "triton"])
def test_rdmreg_module_drawing_its_own_randomness_compiles_without_graph_break(loss_backend):
    rdmreg = lpjepa.RDMReg(p=1.5, num_projections=16, backend=loss_backend)
    z = torch.randn(16, 4, requires_grad=True)
    torch.manual_seed(1)
    eager = [rdmreg(z, z * 0.5) for _ in range(2)]
    torch._dynamo.reset()
    compiled = torch.compile(rdmreg, backend="aot_eager", fullgraph=True)
    torch.manual_seed(1)
    losses = [compiled(z, z * 0.5) for _ in range(2)]
    losses[0].backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    # Each call draws fresh numbers (the sampler is neither cached nor deduplicated), the
    # same ones eager draws from the same seed.
    assert losses[0] != losses[1]
    torch.testing.assert_close(torch.stack(losses), torch.stack(eager))


# Runs without TRITON_INTERPRET, so lpjepa registers the loss as it does on a GPU. The
# whole program is traced on the CPU (no kernel runs): Dynamo with fullgraph=True, then
# AOTAutograd, whose joint forward + backward graph is captured and the compile stopped.
# Triton's active driver is replaced by one that names an sm_90 target, so that torch's
# analysis of which kernel arguments are written compiles each kernel to TTIR as on an
# H100 (without it, it assumes every argument is written and clones the inputs).
_GPU_REGISTRATION_TRACE = textwrap.dedent(
    """
    import sys

    import torch
    import triton
    from functorch.compile import default_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from triton.backends.compiler import GPUTarget

    class Sm90Driver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(Sm90Driver())

    import lpjepa
    from lpjepa.ops import compiled as compiled_ops, sliced_wasserstein as op

    assert op.TRACES_INTO_KERNELS

    class Captured(Exception):
        pass

    joint_graphs = []

    def partition(joint, inputs, **kwargs):
        joint_graphs.append(joint)
        return default_partition(joint, inputs, **kwargs)

    def stop(graph, inputs):
        raise Captured

    net = torch.nn.Linear(8, 16)

    def step(x, target, projections):
        # The compiled route of the Triton body itself: backend='triton' on CPU tensors would ask for the interpreter.
        return 3.0 * compiled_ops.sliced_wasserstein(op.TRITON, [net(x)], target, projections, False)

    batch = int(sys.argv[1])
    x, target = torch.randn(batch, 8), torch.rand(batch, 16)
    projections = lpjepa.reference.random_projections(16, 16)
    compiled = torch.compile(step, backend=aot_autograd(fw_compiler=stop, partition_fn=partition), fullgraph=True)
    try:
        compiled(x, target, projections)
    except torch._dynamo.exc.BackendCompilerFailed as error:
        assert isinstance(error.inner_exception, Captured), error
    (joint,) = joint_graphs
    for node in joint.graph.nodes:
        if "triton_kernel_wrapper" in str(node.target):
            name = kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__
            print("kernel", name, "writes", ",".join(node.kwargs["tensors_to_clone"]))
        elif node.target in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.sort.stable):
            print("op", node.target.__name__)
    """
)


@pytest.mark.parametrize("sort_path", ["registers", "torch_sort"])
def test_gpu_registration_is_traced_into_its_kernels(sort_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["LPJEPA_SORT_PATH"] = sort_path
    result = subprocess.run(
        [sys.executable, "-c", _GPU_REGISTRATION_TRACE, "20"], env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split("\n")
    # The forward's kernels, visible to Inductor, each writing its outputs only (the inputs
    # are not copied): the projections of the view and of the target, the sort and residual,
    # the reduction. The backward (z's gradient through the Linear) is plain matmuls.
    sort_kernel = {
        "registers": "kernel _sort_residual_kernel writes res_ptr,partial_ptr",
        "torch_sort": "kernel _residual_kernel writes res_ptr,partial_ptr",
    }[sort_path]
    assert [line for line in lines if line.startswith("kernel")] == [
        "kernel _project_kernel writes out_ptr",
        "kernel _project_kernel writes out_ptr",
        sort_kernel,
        "kernel _mean_of_partials_kernel writes out_ptr",
    ]
    assert "op mm.default" in lines or "op bmm.default" in lines
    assert ("op sort.stable" in lines) == (sort_path == "torch_sort")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_compiles_the_triton_loss_on_gpu(dtype):
    torch.manual_seed(0)
    model = TinyModel("auto", dim=64).cuda().to(dtype)
    inputs = (
        torch.randn(256, 8, device="cuda", dtype=dtype),
        torch.randn(256, 8, device="cuda", dtype=dtype),
        lpjepa.sample_rgg((256, 64), device="cuda", dtype=dtype),
        lpjepa.reference.random_projections(256, 64, "cuda"),
    )
    _compiled_matches_eager(model, inputs, "inductor", dtype)
