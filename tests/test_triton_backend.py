"""backend='triton' through the public API against the reference (interpreter without a GPU)."""
import math

import numpy as np
import pytest
import scipy.stats
import torch

import lpjepa
from lpjepa import reference, rgg
from conftest import requires_cuda, tolerance


@pytest.mark.parametrize("batch,dim", [(3, 5), (64, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_loss_and_gradients_match_reference(batch, dim, dtype):
    gen = torch.Generator().manual_seed(batch)
    z = torch.randn(batch, dim, generator=gen).to(dtype)
    target = (torch.rand(batch, dim, generator=gen) + 0.1).to(dtype)  # no ties
    projections = reference.random_projections(16, dim, generator=gen)
    leaves = [t.clone().requires_grad_() for t in (z, target, projections)]
    loss = lpjepa.rdmreg_loss(leaves[0], leaves[1], projections=leaves[2], backend="triton")
    grads = torch.autograd.grad(2.0 * loss, leaves)
    ref_leaves = [t.double().requires_grad_() for t in (z, target, projections)]
    ref = reference.rdmreg_loss(ref_leaves[0], ref_leaves[1], projections=ref_leaves[2])
    ref_grads = torch.autograd.grad(2.0 * ref, ref_leaves)
    atol, rtol = tolerance(dtype)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, atol=atol, rtol=rtol)
    for name, g, r, leaf in zip(("z", "target", "projections"), grads, ref_grads, leaves):
        assert g.dtype == leaf.dtype
        torch.testing.assert_close(g.double(), r, atol=atol, rtol=rtol, msg=f"gradient of {name}")


def test_triton_projection_gradient_without_target_gradient():
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(19, 6, generator=gen)
    target = torch.rand(19, 6, generator=gen) + 0.1
    projections = reference.random_projections(16, 6, generator=gen)
    P_ours = projections.clone().requires_grad_()
    grad_ours, = torch.autograd.grad(lpjepa.rdmreg_loss(z, target, projections=P_ours, backend="triton"), P_ours)
    P_ref = projections.double().requires_grad_()
    grad_ref, = torch.autograd.grad(reference.rdmreg_loss(z.double(), target.double(), projections=P_ref), P_ref)
    atol, rtol = tolerance(torch.float32)
    torch.testing.assert_close(grad_ours.double(), grad_ref, atol=atol, rtol=rtol)


def test_the_backward_multiplies_in_the_forwards_tf32_setting(patch):
    # The flag is read once a step, in the forward; flipping it before backward() changes nothing of that step.
    from lpjepa.kernels import sliced_wasserstein as kernels

    seen = []
    real = kernels.project_backward_plan

    def spy(*args, **kwargs):
        seen.append(kwargs["allow_tf32"])
        return real(*args, **kwargs)

    patch.setattr(kernels, "project_backward_plan", spy)
    gen = torch.Generator().manual_seed(8)
    z = torch.randn(6, 5, generator=gen, requires_grad=True)
    target = torch.rand(6, 5, generator=gen)
    projections = reference.random_projections(4, 5, generator=gen)
    for forward_flag in (True, False):
        patch.torch_flag(torch.backends.cuda.matmul, "allow_tf32", forward_flag)
        loss = lpjepa.rdmreg_loss(z, target, projections=projections, backend="triton")
        patch.torch_flag(torch.backends.cuda.matmul, "allow_tf32", not forward_flag)
        loss.backward()
    assert seen == [True, False]


def test_triton_loss_under_autocast():
    # The interpreter mishandles bf16, so fp16 autocast here; bf16 autocast runs on a GPU below.
    z32 = torch.randn(40, 12)
    target = lpjepa.sample_rgg((40, 12), mu=0.2)
    projections = reference.random_projections(16, 12)
    weight = torch.eye(12, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.float16):
        z = torch.nn.functional.linear(z32, weight)
        loss = lpjepa.rdmreg_loss(z, target, projections=projections, backend="triton")
    assert z.dtype == torch.float16 and loss.dtype == torch.float32
    loss.backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()
    ref = reference.rdmreg_loss(z.detach().double(), target.double(), projections=projections.double())
    atol, rtol = tolerance(torch.float16)
    torch.testing.assert_close(loss.double(), ref, atol=atol, rtol=rtol)


@requires_cuda
def test_triton_loss_under_bf16_autocast_on_gpu():
    gen = torch.Generator("cuda").manual_seed(3)
    z32 = torch.randn(300, 64, device="cuda", generator=gen)
    target = lpjepa.sample_rgg((300, 64), device="cuda", generator=gen)
    projections = reference.random_projections(256, 64, "cuda", generator=gen)
    weight = torch.eye(64, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        z = torch.nn.functional.linear(z32, weight)
        loss = lpjepa.rdmreg_loss(z, target, projections=projections)  # 'auto': the kernels on CUDA
    assert z.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(weight.grad).all()
    ref = reference.rdmreg_loss(z.detach().double(), target.double(), projections=projections.double())
    atol, rtol = tolerance(torch.bfloat16)
    torch.testing.assert_close(loss.double(), ref, atol=atol, rtol=rtol)


def test_triton_rdmreg_module_matches_torch_backend():
    z1, z2 = torch.randn(32, 8), torch.randn(32, 8)
    target = lpjepa.sample_rgg((32, 8))
    projections = reference.random_projections(16, 8)
    ours = lpjepa.RDMReg(num_projections=16, backend="triton")(z1, z2, target=target, projections=projections)
    torch_ = lpjepa.RDMReg(num_projections=16, backend="torch")(z1, z2, target=target, projections=projections)
    atol, rtol = tolerance(torch.float32)
    torch.testing.assert_close(ours, torch_, atol=atol, rtol=rtol)


@pytest.mark.parametrize("p,mu", [(1.0, -0.5), (2.0, 0.3), (1.5, 0.0)])
def test_triton_sampler_through_the_api(p, mu):
    gen = torch.Generator().manual_seed(11)
    samples = lpjepa.sample_rgg(8192, p, mu, generator=gen, backend="triton").double().numpy()
    again = lpjepa.sample_rgg(8192, p, mu, generator=torch.Generator().manual_seed(11), backend="triton")
    assert np.array_equal(samples, again.double().numpy())
    q = rgg.zero_fraction(p, mu)
    assert abs(np.mean(samples == 0) - q) < 5 * math.sqrt(q * (1 - q) / samples.size)
    sigma = rgg.sigma_gn(p)
    law = scipy.stats.gennorm(p, scale=p ** (1 / p))
    start = -mu / sigma
    active = samples[samples > 0]
    pvalue = scipy.stats.kstest(
        active, lambda y: (law.cdf((y - mu) / sigma) - law.cdf(start)) / law.sf(start)
    ).pvalue
    assert pvalue > 1e-3


@pytest.fixture
def launched(patch):
    """The Triton kernels the loss's ops launch, as (kernel name, meta, args), in order."""
    from lpjepa.ops import sliced_wasserstein as triton_ops

    calls = []
    real = triton_ops._launch

    def counting(launch):
        calls.append((launch.kernel.__name__, launch.meta, launch.args))
        real(launch)

    patch.setattr(triton_ops, "_launch", counting)
    return calls


def assert_matches_reference(loss, grads, views, target, projections):
    """The fp32 loss and views' gradients against the fp64 reference's mean over the views."""
    ref_views = [v.detach().double().requires_grad_() for v in views]
    ref = sum(reference.rdmreg_loss(v, target.double(), projections=projections.double()) for v in ref_views)
    ref_grads = torch.autograd.grad(ref / len(views), ref_views)
    atol, rtol = tolerance(torch.float32)
    torch.testing.assert_close(loss.double(), ref / len(views), atol=atol, rtol=rtol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=atol, rtol=rtol)


@pytest.mark.parametrize("sort_path", ["registers", "torch_sort"])
def test_views_share_one_projected_and_sorted_target(launched, patch, sort_path):
    patch.setenv("LPJEPA_SORT_PATH", sort_path)
    gen = torch.Generator().manual_seed(8)
    views = [torch.randn(24, 10, generator=gen, requires_grad=True) for _ in range(2)]
    target = torch.rand(24, 10, generator=gen)
    projections = reference.random_projections(16, 10, generator=gen)
    loss = lpjepa.RDMReg(num_projections=16, backend="triton")(*views, target=target, projections=projections)
    grads = torch.autograd.grad(loss, views)
    sort_kernel = "_sort_residual_kernel" if sort_path == "registers" else "_residual_kernel"
    # Both views and the target projected in one launch, one sort-and-residual launch for both views;
    # the backward: both views' gradients in one launch.
    assert [name for name, _, _ in launched] == ["_project_kernel", sort_kernel, "_mean_of_partials_kernel",
                                                 "_project_backward_kernel"]
    _, meta, args = launched[1]
    assert meta["SHARED_TARGET"] and args[-2] == 2  # V = 2 views against one target (the last: the residual scale)
    assert_matches_reference(loss, grads, views, target, projections)
    # The views and the target reach the projection as three pointers of their own: no stacked copy.
    _, meta, args = launched[0]
    assert meta["SOURCE_POINTERS"] == 3 and args[0] is views[0] and args[1] is views[1] and args[2] is target


def _transposed(gen, rows, cols):
    return torch.randn(cols, rows, generator=gen).T


@pytest.mark.parametrize("inputs_of, pointers", [
    # Two views and the target, all transposed: one layout, read where they lie.
    (lambda gen: ([_transposed(gen, 25, 10) for _ in range(2)], _transposed(gen, 25, 10).abs()), 3),
    # Views of two layouts: stacked into one (S, B, D) source.
    (lambda gen: ([torch.randn(25, 10, generator=gen), _transposed(gen, 25, 10)], torch.rand(25, 10, generator=gen)), 1),
    # Three views and a target: more sources than the kernel's pointers, stacked.
    (lambda gen: ([torch.randn(25, 10, generator=gen) for _ in range(3)], torch.rand(25, 10, generator=gen)), 1),
])
def test_views_of_any_layout_or_number_match_the_reference(launched, inputs_of, pointers):
    gen = torch.Generator().manual_seed(9)
    views, target = inputs_of(gen)
    views = [v.requires_grad_() for v in views]
    projections = reference.random_projections(16, 10, generator=gen)
    loss = lpjepa.RDMReg(num_projections=16, backend="triton")(*views, target=target, projections=projections)
    grads = torch.autograd.grad(loss, views)
    assert_matches_reference(loss, grads, views, target, projections)
    name, meta, _ = launched[0]
    assert name == "_project_kernel" and meta["SOURCE_POINTERS"] == pointers


@pytest.mark.parametrize(
    "mode,dtype,allow_tf32",
    [("fp32 IEEE", torch.float32, False), ("fp32 TF32", torch.float32, True), ("fp16", torch.float16, False)],
)
def test_every_precision_mode_matches_the_fp64_reference(mode, dtype, allow_tf32, patch):
    # bf16 runs on a GPU only (the interpreter mishandles it): test_triton_loss_under_bf16_autocast_on_gpu.
    patch.torch_flag(torch.backends.cuda.matmul, "allow_tf32", allow_tf32)
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(40, 24, generator=gen).to(dtype).requires_grad_()
    target = torch.rand(40, 24, generator=gen).to(dtype)
    projections = reference.random_projections(32, 24, generator=gen).requires_grad_()
    loss = lpjepa.rdmreg_loss(z, target, projections=projections, backend="triton")
    grads = torch.autograd.grad(loss, [z, projections])
    ref_leaves = [z.detach().double().requires_grad_(), projections.detach().double().requires_grad_()]
    ref = reference.rdmreg_loss(ref_leaves[0], target.double(), projections=ref_leaves[1])
    ref_grads = torch.autograd.grad(ref, ref_leaves)
    # fp16 rounds the directions and target to fp16 too (the precision policy); TF32 keeps
    # 10 mantissa bits, as fp16 does.
    atol, rtol = tolerance(torch.float16 if mode != "fp32 IEEE" else torch.float32)
    torch.testing.assert_close(loss.double(), ref, atol=atol, rtol=rtol, msg=mode)
    for name, g, r in zip(("z", "projections"), grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=atol, rtol=rtol, msg=f"{mode}: gradient of {name}")


def test_fp64_stays_on_the_torch_backend_under_auto():
    from lpjepa.ops.backend import use_triton

    assert not use_triton("sliced_wasserstein", "auto", "cuda", torch.float64)
    assert use_triton("sliced_wasserstein", "auto", "cuda", torch.float32)
    assert use_triton("sliced_wasserstein", "triton", "cpu", torch.float64)


def test_per_view_directions_and_targets_on_both_backends():
    # Two views, each with its own directions and its own target: both backends' ops agree
    # with the fp64 reference, value and gradients.
    from lpjepa.ops.sliced_wasserstein import sliced_wasserstein

    gen = torch.Generator().manual_seed(21)
    views = torch.randn(2, 30, 8, generator=gen)
    targets = torch.rand(2, 30, 8, generator=gen)
    projections = torch.nn.functional.normalize(torch.randn(2, 16, 8, generator=gen), dim=2)
    ref_views = views.double().requires_grad_()
    ref = sum(reference.rdmreg_loss(ref_views[v], targets[v].double(), projections=projections[v].double())
              for v in range(2)) / 2
    ref_grad, = torch.autograd.grad(ref, ref_views)
    atol, rtol = tolerance(torch.float32)
    for backend in ("torch", "triton"):
        leaf = views.clone().requires_grad_()
        loss = sliced_wasserstein(list(leaf), targets, projections, backend)
        grad, = torch.autograd.grad(loss, leaf)
        torch.testing.assert_close(loss.double(), ref, atol=atol, rtol=rtol, msg=backend)
        torch.testing.assert_close(grad.double(), ref_grad, atol=atol, rtol=rtol, msg=backend)


@pytest.mark.parametrize("shared_directions", [True, False])
def test_projection_backward_multiplies_bf16_as_fp32_below_sm_80(patch, shared_directions):
    # Turing has no bf16 arithmetic: the backward's matmuls take fp32 copies (the fp32
    # gradient unrounded), as the forward's cuBLAS path does, and round the result to bf16.
    from lpjepa.kernels import launch
    from lpjepa.ops import sliced_wasserstein as op

    gen = torch.Generator().manual_seed(31)
    x = torch.randn(2, 9, 12, generator=gen).bfloat16()
    shape = (5, 12) if shared_directions else (2, 5, 12)
    projections = torch.nn.functional.normalize(torch.randn(shape, generator=gen), dim=-1).bfloat16()
    grad = torch.randn(2, 5, 9, generator=gen)  # (S, K, B) fp32, as the forward's output

    def backward():
        operand = op._triton_backward_operand_dtype(x.dtype, x.device)
        grad_x, grad_p = op.project_backward(grad, x, projections, operand, True, True)
        return grad_x.to(x.dtype), grad_p.to(x.dtype)

    patch.setattr(launch, "device_arch", lambda device: 75)
    grad_x, grad_p = backward()
    directions = projections.float().expand(2, 5, 12)
    want_x = torch.matmul(grad.transpose(1, 2), directions)
    want_p = torch.bmm(grad, x.float())
    want_p = want_p.sum(0) if shared_directions else want_p
    assert grad_x.dtype == grad_p.dtype == torch.bfloat16
    torch.testing.assert_close(grad_x, want_x.bfloat16(), atol=0, rtol=0)
    torch.testing.assert_close(grad_p.float(), want_p, **dict(zip(("atol", "rtol"), tolerance(torch.bfloat16))))
    patch.setattr(launch, "device_arch", lambda device: 80)  # the bf16 operand path: the gradient rounded first
    rounded_x, _ = backward()
    torch.testing.assert_close(rounded_x.float(), torch.matmul(grad.bfloat16().float().transpose(1, 2), directions),
                               **dict(zip(("atol", "rtol"), tolerance(torch.bfloat16))))
