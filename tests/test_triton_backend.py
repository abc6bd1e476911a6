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
