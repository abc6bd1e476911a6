"""The torch backend of the RDMReg loss against the seed's reference (lpjepa.reference)."""
import pytest
import torch

import lpjepa
from lpjepa import reference
from conftest import tolerance

SHAPES = [(2, 5), (3, 7), (255, 33), (257, 64), (64, 1), (256, 128)]


def _inputs(batch, dim, dtype=torch.float64, seed=0, continuous_target=False):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, dim, generator=gen, dtype=dtype)
    if continuous_target:  # no exact zeros, so no ties among the target's projections
        target = torch.rand(batch, dim, generator=gen, dtype=dtype) + 0.1
    else:
        target = lpjepa.sample_rgg((batch, dim), generator=gen, dtype=dtype, backend="torch")
    projections = reference.random_projections(16, dim, dtype=dtype, generator=gen)
    return z, target, projections


@pytest.mark.parametrize("batch,dim", SHAPES)
def test_value_and_gradient_match_reference_fp64(batch, dim):
    z, target, projections = _inputs(batch, dim)
    z_ours = z.clone().requires_grad_()
    z_ref = z.clone().requires_grad_()
    ours = lpjepa.rdmreg_loss(z_ours, target, projections=projections, backend="torch")
    ref = reference.rdmreg_loss(z_ref, target, projections=projections)
    ours.backward()
    ref.backward()
    atol, rtol = tolerance(torch.float64)
    torch.testing.assert_close(ours, ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(z_ours.grad, z_ref.grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("batch,dim", [(3, 7), (257, 64)])
def test_target_and_projection_gradients_match_reference(batch, dim):
    z, target, projections = _inputs(batch, dim, continuous_target=True)
    leaves_ours = [t.clone().requires_grad_() for t in (z, target, projections)]
    leaves_ref = [t.clone().requires_grad_() for t in (z, target, projections)]
    ours = lpjepa.rdmreg_loss(*leaves_ours[:2], projections=leaves_ours[2], backend="torch")
    ref = reference.rdmreg_loss(*leaves_ref[:2], projections=leaves_ref[2])
    grads_ours = torch.autograd.grad(ours, leaves_ours)
    grads_ref = torch.autograd.grad(ref, leaves_ref)
    atol, rtol = tolerance(torch.float64)
    for name, g_ours, g_ref in zip(("z", "target", "projections"), grads_ours, grads_ref):
        torch.testing.assert_close(g_ours, g_ref, atol=atol, rtol=rtol, msg=f"gradient of {name}")


@pytest.mark.parametrize("views", [1, 2])
def test_learnable_projections_get_the_target_side_of_their_gradient(views):
    # P's gradient has a term from the target's projections even when the target itself
    # needs none; a shared sorted target (two views) must not drop it.
    z, target, projections = _inputs(33, 9, continuous_target=True)
    zs = [z] + [torch.randn_like(z) for _ in range(views - 1)]
    P_ours = projections.clone().requires_grad_()
    ours = lpjepa.RDMReg(num_projections=16, backend="torch")(*zs, target=target, projections=P_ours)
    P_ref = projections.clone().requires_grad_()
    ref = sum(reference.rdmreg_loss(v, target, projections=P_ref) for v in zs) / views
    grad_ours, = torch.autograd.grad(ours, P_ours)
    grad_ref, = torch.autograd.grad(ref, P_ref)
    atol, rtol = tolerance(torch.float64)
    torch.testing.assert_close(grad_ours, grad_ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_computed_in_fp32(dtype):
    z, target, projections = _inputs(255, 48, dtype=torch.float32)
    z_low, target_low = z.to(dtype), target.to(dtype)
    z_ours = z_low.clone().requires_grad_()
    ours = lpjepa.rdmreg_loss(z_ours, target_low, projections=projections, backend="torch")
    ours.backward()
    # The oracle sees exactly the rounded inputs, in fp64.
    z_ref = z_low.double().requires_grad_()
    ref = reference.rdmreg_loss(z_ref, target_low.double(), projections=projections.double())
    ref.backward()
    assert ours.dtype == torch.float32
    assert z_ours.grad.dtype == dtype
    atol, rtol = tolerance(dtype)
    torch.testing.assert_close(ours.double(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(z_ours.grad.double(), z_ref.grad, atol=atol, rtol=rtol)


def test_drop_in_draws_the_seeds_projections():
    z, target, _ = _inputs(64, 32, dtype=torch.float32)
    torch.manual_seed(123)
    ours = lpjepa.rdmreg_loss(z, target, 100)
    torch.manual_seed(123)
    ref = reference.rdmreg_loss(z, target, 100)
    atol, rtol = tolerance(torch.float32)
    torch.testing.assert_close(ours, ref, atol=atol, rtol=rtol)
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.testing.assert_close(
        lpjepa.rdmreg_loss(z, target, generator=gen_a),
        reference.rdmreg_loss(z, target, generator=gen_b),
        atol=atol,
        rtol=rtol,
    )


def test_gradient_respects_incoming_grad():
    z, target, projections = _inputs(33, 9)
    z1 = z.clone().requires_grad_()
    z2 = z.clone().requires_grad_()
    lpjepa.rdmreg_loss(z1, target, projections=projections).backward()
    (2.5 * lpjepa.rdmreg_loss(z2, target, projections=projections)).backward()
    torch.testing.assert_close(z2.grad, 2.5 * z1.grad)


def test_non_contiguous_inputs():
    z, target, projections = _inputs(40, 24)
    z_t = z.T.contiguous().T  # same values, column-major strides
    assert not z_t.is_contiguous()
    ours = lpjepa.rdmreg_loss(z_t, target[:, :], projections=projections[::1])
    ref = reference.rdmreg_loss(z, target, projections=projections)
    torch.testing.assert_close(ours, ref)
    wide = torch.randn(40, 48, dtype=torch.float64)
    strided = wide[:, ::2]
    torch.testing.assert_close(
        lpjepa.rdmreg_loss(strided, target, projections=projections),
        reference.rdmreg_loss(strided.contiguous(), target, projections=projections),
    )


def test_nan_in_z_gives_nan_loss():
    z, target, projections = _inputs(17, 5)
    z[3, 2] = float("nan")
    assert torch.isnan(lpjepa.rdmreg_loss(z, target, projections=projections, backend="torch"))


def test_autocast_bf16_on_cpu_gives_fp32_loss():
    z, target, projections = _inputs(64, 32, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_bf16 = torch.nn.functional.linear(z, torch.eye(32))  # autocast makes this bf16
        loss = lpjepa.rdmreg_loss(z_bf16, target, projections=projections)
    assert z_bf16.dtype == torch.bfloat16 and loss.dtype == torch.float32
    ref = reference.rdmreg_loss(z_bf16.double(), target.double(), projections=projections.double())
    atol, rtol = tolerance(torch.bfloat16)
    torch.testing.assert_close(loss.double(), ref, atol=atol, rtol=rtol)


def test_rdmreg_module_shares_target_and_projections_across_views():
    z1, target, projections = _inputs(65, 12, seed=1)
    z2 = torch.randn_like(z1)
    views = [z1.clone().requires_grad_(), z2.clone().requires_grad_()]
    module = lpjepa.RDMReg(num_projections=16)
    ours = module(*views, target=target, projections=projections)
    ours.backward()
    ref_views = [z1.clone().requires_grad_(), z2.clone().requires_grad_()]
    ref = sum(reference.rdmreg_loss(v, target, projections=projections) for v in ref_views) / 2
    ref.backward()
    atol, rtol = tolerance(torch.float64)
    torch.testing.assert_close(ours, ref, atol=atol, rtol=rtol)
    for v, r in zip(views, ref_views):
        torch.testing.assert_close(v.grad, r.grad, atol=atol, rtol=rtol)


def test_rdmreg_module_is_reproducible_and_draws_fresh_numbers():
    z = torch.randn(32, 8)
    module = lpjepa.RDMReg(p=1.5, mu=-0.3, num_projections=8)
    a = module(z, generator=torch.Generator().manual_seed(9))
    b = module(z, generator=torch.Generator().manual_seed(9))
    assert a == b
    torch.manual_seed(0)
    c = module(z)
    d = module(z)
    assert c != d


def test_rectified_lpjepa_loss_parts():
    z1, target, projections = _inputs(48, 16)
    z2 = z1 + 0.1 * torch.randn_like(z1)
    parts = lpjepa.rectified_lpjepa_loss(z1, z2, target=target, projections=projections)
    invariance = torch.nn.functional.mse_loss(z1, z2)
    regularizer = (
        reference.rdmreg_loss(z1, target, projections=projections)
        + reference.rdmreg_loss(z2, target, projections=projections)
    ) / 2
    torch.testing.assert_close(parts.invariance, invariance)
    torch.testing.assert_close(parts.regularizer, regularizer)
    torch.testing.assert_close(parts.loss, 25.0 * invariance + 125.0 * regularizer)
    custom = lpjepa.rectified_lpjepa_loss(z1, z2, lamb_inv=1.0, lamb_reg=2.0, target=target, projections=projections)
    torch.testing.assert_close(custom.loss, invariance + 2.0 * regularizer)
