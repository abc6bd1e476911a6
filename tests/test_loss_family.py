"""The loss family of the paper and its official code: direction schemes, per-view and dense targets, sigma conventions.

Every option against an independent oracle: the orthogonal blocks against the identity
and the Haar law of a coordinate (scipy.stats.beta), the SVD directions against
torch.linalg.svd and numpy's SVD of the same batch, and every loss against the seed's
fp64 reference (``lpjepa.reference``) fed the same targets and directions.
"""
import numpy as np
import pytest
import scipy.stats
import torch

import lpjepa
from lpjepa import reference, rgg
from lpjepa.loss import draw_directions
from lpjepa.ops.directions import orthogonal_projections, random_projections
from lpjepa.ops.rgg_sample import triton_draw
from conftest import tolerance

FP64 = dict(zip(("atol", "rtol"), tolerance(torch.float64)))
FP32 = dict(zip(("atol", "rtol"), tolerance(torch.float32)))
ORTHONORMAL_TOL = 1e-6


def _views(batch, dim, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(batch, dim, generator=gen, dtype=dtype)
    return z1, z1 + 0.3 * torch.randn(batch, dim, generator=gen, dtype=dtype)


def _seed_loss(views, targets, projections):
    """The mean of the seed's per-view losses, view v against targets[v] along projections[v], in fp64."""
    leaves = [v.detach().double().requires_grad_() for v in views]
    loss = sum(reference.rdmreg_loss(v, t.double(), projections=P.double()) for v, t, P in zip(leaves, targets, projections))
    loss = loss / len(views)
    return loss, torch.autograd.grad(loss, leaves)


# --- Orthogonal blocks ----------------------------------------------------------------------


@pytest.mark.parametrize("num_projections,dim", [(64, 512), (1000, 256), (257, 33), (7, 3), (2048, 2048)])
def test_orthogonal_blocks_are_orthonormal(num_projections, dim):
    directions = orthogonal_projections(num_projections, dim, generator=torch.Generator().manual_seed(1))
    assert directions.shape == (num_projections, dim) and directions.dtype == torch.float32
    blocks = directions.double().split(dim)
    assert len(blocks) == -(-num_projections // dim)  # ceil(K / D) blocks
    for block in blocks:
        gram = block @ block.T
        assert (gram - torch.eye(block.shape[0], dtype=torch.float64)).abs().max() < ORTHONORMAL_TOL


def test_orthogonal_directions_are_uniform_on_the_sphere():
    # A coordinate x of a uniform unit vector in D dimensions has x^2 ~ Beta(1/2, (D - 1) / 2);
    # every row of every block must follow it, whatever its position in the block.
    dim, blocks = 12, 300
    directions = orthogonal_projections(dim * blocks, dim, generator=torch.Generator().manual_seed(2)).double()
    for column in (0, dim - 1):
        assert scipy.stats.kstest(directions[:, column].square().numpy(), scipy.stats.beta(0.5, (dim - 1) / 2).cdf).pvalue > 1e-3
    last_rows = directions.view(blocks, dim, dim)[:, -1, 0].square().numpy()  # the block's last row: no bias from QR order
    assert scipy.stats.kstest(last_rows, scipy.stats.beta(0.5, (dim - 1) / 2).cdf).pvalue > 1e-3


def test_orthogonal_directions_follow_the_generator():
    a = orthogonal_projections(40, 16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, orthogonal_projections(40, 16, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(a, orthogonal_projections(40, 16, generator=torch.Generator().manual_seed(4)))


# --- SVD + random directions ----------------------------------------------------------------


def _centred_svd(view):
    """(torch's V^T, numpy's V^T, numpy's singular values) of the centred batch, in fp64."""
    centred = view.double() - view.double().mean(dim=0)
    _, values, vh = np.linalg.svd(centred.numpy(), full_matrices=False)
    return torch.linalg.svd(centred, full_matrices=False).Vh, vh, values


@pytest.mark.parametrize("batch,dim,num_projections", [(30, 8, 20), (5, 9, 16), (33, 10, 4), (257, 12, 12)])
@pytest.mark.parametrize("scheme", ["svd", "svd-bottom-half"])
def test_svd_directions_against_the_batchs_svd(batch, dim, num_projections, scheme):
    views = _views(batch, dim, seed=batch)
    ours = draw_directions(scheme, num_projections, views, torch.Generator().manual_seed(5))
    rank = min(batch, dim)
    first_kept = rank // 2 if scheme == "svd-bottom-half" else 0
    kept = min(rank - first_kept, num_projections)
    extra = num_projections - kept
    shared = reference.random_projections(extra, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert ours.shape == (2, num_projections, dim)
    for v, view in enumerate(views):
        vh_torch, vh_numpy, values = _centred_svd(view)
        # Where the vectors are unique up to sign (a centred batch of B rows has rank B - 1: the last
        # vector is then arbitrary, tests/test_svd_fallback.py), torch's, with the sign that makes the
        # entry of largest magnitude positive; numpy's LAPACK may flip a sign: compare the lines.
        rows = [i for i in range(kept) if values[first_kept + i] > 1e-8 * values[0]]
        theirs = vh_torch[[first_kept + i for i in rows]]
        theirs = theirs * torch.gather(theirs, 1, theirs.abs().argmax(dim=1, keepdim=True)).sign()
        torch.testing.assert_close(ours[v, rows], theirs, **FP64)
        overlap = (ours[v, rows] @ torch.from_numpy(vh_numpy[[first_kept + i for i in rows]]).T).abs()
        torch.testing.assert_close(overlap.diagonal(), torch.ones(len(rows), dtype=torch.float64), **FP64)
        torch.testing.assert_close(ours[v, kept:], shared, **FP64)
    assert torch.equal(ours[0, kept:], ours[1, kept:])  # the random top-up is shared by the views


@pytest.mark.parametrize(
    "scheme,backend,dtype",
    [("svd", "torch", torch.float64), ("svd-bottom-half", "torch", torch.float64), ("svd", "triton", torch.float32)],
)
def test_svd_loss_and_gradient_match_the_seeds_loss_on_those_directions(scheme, backend, dtype):
    views = [v.to(dtype).requires_grad_() for v in _views(40, 10, seed=3)]
    target = lpjepa.sample_rgg((40, 10), mu=-0.3, generator=torch.Generator().manual_seed(6), dtype=dtype)
    module = lpjepa.RDMReg(num_projections=24, directions=scheme, backend=backend)
    loss = module(*views, target=target, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad(loss, views)
    projections = draw_directions(scheme, 24, [v.detach() for v in views], torch.Generator().manual_seed(7))
    # The seed's loss with the directions held fixed: no gradient flows through the SVD.
    ref, ref_grads = _seed_loss(views, [target, target], projections)
    tol = FP64 if dtype == torch.float64 else FP32
    torch.testing.assert_close(loss.double(), ref, **tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, **tol)


# --- Targets: per view, dense, sigma conventions -------------------------------------------------


@pytest.mark.parametrize(
    "directions,backend,dtype",
    [("gaussian", "torch", torch.float64), ("orthogonal", "torch", torch.float64), ("svd", "torch", torch.float64),
     ("svd", "triton", torch.float32), ("gaussian", "triton", torch.float32)],
)
def test_per_view_targets_against_the_seeds_loss(backend, dtype, directions):
    views = [v.to(dtype).requires_grad_() for v in _views(33, 9, seed=4)]
    module = lpjepa.RDMReg(p=1.5, mu=-0.4, num_projections=16, target_draw="per-view", directions=directions, backend=backend)
    loss = module(*views, generator=torch.Generator().manual_seed(8))
    grads = torch.autograd.grad(loss, views)
    gen = torch.Generator().manual_seed(8)
    if backend == "triton" and directions == "gaussian":
        # One sampler launch: the (V, B, D) targets and the directions (RDMReg.draw_together).
        targets, projections = triton_draw((2, 33, 9), 16, 9, p=1.5, mu=-0.4, sigma=module.target_sigma,
                                           dtype=dtype, directions_dtype=dtype, device="cpu", generator=gen)
    else:
        # The same draws by hand: a target per view, one after the other, then the directions.
        targets = [lpjepa.sample_rgg((33, 9), 1.5, -0.4, generator=gen, backend=backend) for _ in views]
        projections = draw_directions(directions, 16, [v.detach() for v in views], gen)
    projections = projections if projections.dim() == 3 else [projections] * 2
    assert not torch.equal(targets[0], targets[1])
    ref, ref_grads = _seed_loss(views, targets, projections)
    tol = FP64 if dtype == torch.float64 else FP32
    torch.testing.assert_close(loss.double(), ref, **tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, **tol)


def test_per_view_target_of_the_first_view_is_the_shared_target():
    shared = lpjepa.RDMReg(target_draw="shared").draw_targets(2, 16, 5, "cpu", torch.Generator().manual_seed(9))
    per_view = lpjepa.RDMReg(target_draw="per-view").draw_targets(2, 16, 5, "cpu", torch.Generator().manual_seed(9))
    assert per_view.shape == (2, 16, 5) and torch.equal(per_view[0], shared)


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float32)])
def test_explicit_per_view_targets_and_directions(backend, dtype):
    views = [v.to(dtype).requires_grad_() for v in _views(21, 7, seed=5)]
    gen = torch.Generator().manual_seed(10)
    targets = torch.rand(2, 21, 7, generator=gen, dtype=dtype)
    projections = reference.random_projections(2 * 12, 7, dtype=dtype, generator=gen).view(2, 12, 7)
    loss = lpjepa.RDMReg(backend=backend)(*views, target=targets, projections=projections)
    grads = torch.autograd.grad(loss, views)
    ref, ref_grads = _seed_loss(views, targets, projections)
    tol = FP64 if dtype == torch.float64 else FP32
    torch.testing.assert_close(loss.double(), ref, **tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, **tol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dense_target_against_the_seeds_loss(backend):
    views = [v.float() for v in _views(50, 6, seed=6)]
    module = lpjepa.RDMReg(p=2.0, mu=0.0, num_projections=16, rectify=False, backend=backend)
    loss = module(*views, generator=torch.Generator().manual_seed(11))
    gen = torch.Generator().manual_seed(11)
    if backend == "triton":  # one sampler launch draws both there (RDMReg.draw_together): the same draw by hand
        target, projections = triton_draw((50, 6), 16, 6, p=2.0, mu=0.0, sigma=rgg.sigma_gn(2.0), dtype=torch.float32,
                                          directions_dtype=torch.float32, device="cpu", generator=gen, rectify=False)
    else:
        target = lpjepa.sample_rgg((50, 6), 2.0, 0.0, generator=gen, rectify=False, backend=backend)
        projections = random_projections(16, 6, generator=gen)
    assert bool((target < 0).any())
    ref, _ = _seed_loss(views, [target, target], [projections, projections])
    torch.testing.assert_close(loss.double(), ref, **FP32)


@pytest.mark.parametrize("p,mu", [(1.0, -0.5), (2.0, 0.5)])
def test_sigma_conventions_of_the_module(p, mu):
    views = _views(30, 5, seed=7)
    unit = rgg.sigma_for_unit_rectified_variance(p, mu)
    by_name = lpjepa.RDMReg(p, mu, 8, sigma="unit-rectified", backend="torch")
    assert by_name.target_sigma == unit and lpjepa.RDMReg(p, mu, sigma=None).target_sigma == rgg.sigma_gn(p)
    by_value = lpjepa.RDMReg(p, mu, 8, sigma=unit, backend="torch")
    a = by_name(*views, generator=torch.Generator().manual_seed(12))
    assert a == by_value(*views, generator=torch.Generator().manual_seed(12))
    assert a != lpjepa.RDMReg(p, mu, 8, backend="torch")(*views, generator=torch.Generator().manual_seed(12))


def test_rectified_lpjepa_loss_passes_the_family_on():
    z1, z2 = _views(24, 8, seed=8)
    options = dict(p=1.5, mu=-0.2, num_projections=16, sigma="unit-rectified", rectify=False,
                   directions="svd-bottom-half", target_draw="per-view")
    parts = lpjepa.rectified_lpjepa_loss(z1, z2, generator=torch.Generator().manual_seed(13), **options)
    module_options = {k: v for k, v in options.items() if k not in ("p", "mu", "num_projections")}
    regularizer = lpjepa.RDMReg(1.5, -0.2, 16, **module_options)(z1, z2, generator=torch.Generator().manual_seed(13))
    torch.testing.assert_close(parts.regularizer, regularizer, **FP64)
    torch.testing.assert_close(parts.loss, 25.0 * torch.nn.functional.mse_loss(z1, z2) + 125.0 * regularizer, **FP64)


def test_gaussian_directions_are_the_seeds_draw():
    z1, z2 = _views(16, 6, seed=9)
    assert torch.equal(draw_directions("gaussian", 8, [z1], torch.Generator().manual_seed(1)),
                       reference.random_projections(8, 6, generator=torch.Generator().manual_seed(1)))
    torch.manual_seed(14)
    ours = lpjepa.RDMReg(num_projections=8, directions="gaussian", backend="torch")(z1, z2)
    torch.manual_seed(14)  # the same draws: the target, then the seed's directions
    target = lpjepa.sample_rgg((16, 6), backend="torch")
    projections = reference.random_projections(8, 6)
    ref, _ = _seed_loss([z1, z2], [target, target], [projections, projections])
    torch.testing.assert_close(ours, ref, **FP32)
