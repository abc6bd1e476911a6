"""Checks the peers' test suites make (Lightly's tests/loss, POT's tests/test_sliced.py), on our loss.

* The objective is symmetric in its views.
* Identical inputs give exactly zero: ``rdmreg_loss(z, z)`` with one set of directions, and the
  objective with both views equal to the target's own samples given as the target.
* The prior's own samples score lower than samples of another law (an exponential of the same
  mean) at a size where that must hold: over 30 seeds the largest own-sample loss is 0.0061 and the
  smallest exponential one 0.057 (B 1024, D 16, K 64), a ninefold gap; the test keeps a fixed seed.
* Constant and near-constant features (a collapsed projector) give a finite, non-zero gradient.
* POT's ``ot.sliced_wasserstein_distance`` as an outside oracle: with ``projections`` a
  (d, n_projections) matrix and p = 2 it returns sqrt(mean over projections of the 1-D W2^2 with
  uniform weights), so its square is our loss with the same directions.

The ``torch.distributed.is_available() == False`` path is in tests/test_lightly_views.py.
"""
import numpy as np
import pytest
import torch

import lpjepa
from lpjepa import reference
from lpjepa.ops import directions as direction_ops
from conftest import tolerance

FP64 = dict(zip(("atol", "rtol"), tolerance(torch.float64)))
FP32 = dict(zip(("atol", "rtol"), tolerance(torch.float32)))


def _randn(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _target(*shape, seed, dtype=torch.float64):
    return lpjepa.sample_rgg(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype, backend="torch")


def _directions(num, dim, seed, dtype=torch.float64):
    return reference.random_projections(num, dim, dtype=dtype, generator=torch.Generator().manual_seed(seed))


# --- Symmetry -------------------------------------------------------------------------------


@pytest.mark.parametrize("rows,dim", [(3, 5), (64, 16), (257, 8)])
def test_the_objective_is_symmetric_in_its_views(rows, dim):
    z1, z2 = _randn(rows, dim, seed=1), _randn(rows, dim, seed=2)
    shared = dict(target=_target(rows, dim, seed=3), projections=_directions(12, dim, seed=4))
    per_view = dict(target=_target(2, rows, dim, seed=5), projections=torch.stack([_directions(12, dim, s) for s in (6, 7)]))
    swapped = {name: tensor.flip(0) for name, tensor in per_view.items()}  # view 0's target and directions go with z1
    for forward, backward in ((shared, shared), (per_view, swapped)):
        one = lpjepa.rectified_lpjepa_loss(z1, z2, **forward)
        other = lpjepa.rectified_lpjepa_loss(z2, z1, **backward)
        for name, a, b in zip(one._fields, one, other):
            torch.testing.assert_close(a, b, **FP64, msg=name)
    # The module's own draws: a shared target and Gaussian directions do not depend on the views' order.
    criterion = lpjepa.RectifiedLpJEPALoss(num_slices=12)
    torch.testing.assert_close(criterion(z1, z2, generator=torch.Generator().manual_seed(8)),
                               criterion(z2, z1, generator=torch.Generator().manual_seed(8)), **FP64)
    # Three views in any order, one shared target.
    z3 = _randn(rows, dim, seed=9)
    rdmreg = lpjepa.RDMReg(num_projections=12)
    values = [rdmreg(*views, **shared) for views in ((z1, z2, z3), (z3, z1, z2), (z2, z3, z1))]
    for value in values[1:]:
        torch.testing.assert_close(value, values[0], **FP64)


# --- Identical inputs: exactly zero ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows,dim", [(1, 4), (3, 5), (65, 16), (257, 8)])
def test_identical_inputs_give_exactly_zero(rows, dim, dtype):
    z = _randn(rows, dim, seed=rows, dtype=dtype).requires_grad_()
    projections = _directions(16, dim, seed=1, dtype=dtype)
    loss = lpjepa.rdmreg_loss(z, z.detach(), projections=projections)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(z.grad) == 0
    # The objective with z1 = z2 = the target's own samples, passed as the target (shared, and one per view).
    samples = _target(rows, dim, seed=rows + 1, dtype=dtype)
    for target in (samples, torch.stack([samples, samples])):
        parts = lpjepa.rectified_lpjepa_loss(samples, samples, target=target, projections=projections)
        assert parts.loss.item() == 0.0 and parts.invariance.item() == 0.0 and parts.regularizer.item() == 0.0
    # Views that differ, each equal to its own target.
    other = _target(rows, dim, seed=rows + 2, dtype=dtype)
    value = lpjepa.RDMReg(num_projections=16)(samples, other, target=torch.stack([samples, other]),
                                              projections=projections)
    assert value.item() == 0.0


# --- The prior's own samples against another law --------------------------------------------


def test_the_priors_own_samples_score_lower_than_an_exponentials():
    rows, dim, num_projections = 1024, 16, 64
    gen = torch.Generator().manual_seed(0)
    target = lpjepa.sample_rgg((rows, dim), generator=gen, dtype=torch.float64, backend="torch")
    own = lpjepa.sample_rgg((rows, dim), generator=gen, dtype=torch.float64, backend="torch")
    mean = reference.sigma_gn(1.0) / 2  # the rectified Laplace's mean: half zeros, half Exp(sigma)
    exponential = torch.empty(rows, dim, dtype=torch.float64).exponential_(1.0 / mean, generator=gen)
    projections = _directions(num_projections, dim, seed=1)
    own_loss = lpjepa.rdmreg_loss(own, target, projections=projections)
    other_loss = lpjepa.rdmreg_loss(exponential, target, projections=projections)
    assert torch.isclose(exponential.mean(), torch.tensor(mean, dtype=torch.float64), rtol=0.05)
    assert 3 * own_loss < other_loss, (own_loss.item(), other_loss.item())


# --- Collapse -------------------------------------------------------------------------------


@pytest.mark.parametrize("directions", ["gaussian", "orthogonal", "svd", "svd-bottom-half"])
@pytest.mark.parametrize("collapse", ["zeros", "constant", "near-constant"])
def test_collapsed_features_get_a_finite_non_zero_gradient(collapse, directions):
    rows, dim = 33, 8
    base = {"zeros": torch.zeros(rows, dim), "constant": torch.full((rows, dim), 0.7)}.get(collapse)
    if base is None:
        base = 0.7 + 1e-6 * _randn(rows, dim, seed=2, dtype=torch.float32)
    for entry in ("rdmreg_loss", "RDMReg", "objective"):
        z1, z2 = base.clone().requires_grad_(), base.clone().requires_grad_()
        gen = torch.Generator().manual_seed(3)
        if entry == "rdmreg_loss":
            loss = lpjepa.rdmreg_loss(z1, _target(rows, dim, seed=4, dtype=torch.float32), 16, generator=gen,
                                      directions=directions)
            z2 = None
        elif entry == "RDMReg":
            loss = lpjepa.RDMReg(num_projections=16, directions=directions)(z1, z2, generator=gen)
        else:
            loss = lpjepa.RectifiedLpJEPALoss(num_slices=16, directions=directions)(z1, z2, generator=gen)
        loss.backward()
        assert torch.isfinite(loss) and loss > 0, f"{entry}: {loss}"
        for z in (z1, z2) if z2 is not None else (z1,):
            assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0, f"{entry}, {collapse}, {directions}"


# --- POT as an outside oracle ---------------------------------------------------------------


def _pot_squared(z, target, projections):
    """POT's sliced W2, squared, with our (K, D) directions as its (d, n_projections) matrix."""
    ot = pytest.importorskip("ot")  # POT, in the test extra; only these tests need it
    distance = ot.sliced_wasserstein_distance(z.detach().double().numpy(), target.double().numpy(),
                                              projections=projections.double().T.numpy(), p=2)
    return float(distance) ** 2


@pytest.mark.parametrize("rows,dim,num_projections", [(3, 5, 7), (17, 16, 64), (257, 8, 33), (64, 3, 1)])
def test_pot_sliced_wasserstein_squared_is_our_loss(rows, dim, num_projections):
    z, target = _randn(rows, dim, seed=rows), _target(rows, dim, seed=dim)
    projections = _directions(num_projections, dim, seed=num_projections)
    theirs = _pot_squared(z, target, projections)
    assert theirs > 0
    ours = lpjepa.rdmreg_loss(z, target, projections=projections)
    np.testing.assert_allclose(ours.item(), theirs, rtol=FP64["rtol"], atol=FP64["atol"])
    # In fp32 features, against POT on the same (rounded) values.
    ours32 = lpjepa.rdmreg_loss(z.float(), target.float(), projections=projections.float())
    theirs32 = _pot_squared(z.float(), target.float(), projections.float())
    np.testing.assert_allclose(ours32.item(), theirs32, rtol=FP32["rtol"], atol=FP32["atol"])


@pytest.mark.parametrize("directions", ["orthogonal", "svd", "svd-bottom-half"])
def test_pot_agrees_with_every_direction_scheme_over_several_views(directions):
    rows, dim, num_projections = 40, 12, 20
    views = [_randn(rows, dim, seed=s) for s in (1, 2, 3)]
    target = _target(3, rows, dim, seed=4)
    if directions == "orthogonal":
        projections = direction_ops.orthogonal_projections(num_projections, dim, dtype=torch.float64,
                                                           generator=torch.Generator().manual_seed(5))
        projections = projections.expand(3, num_projections, dim)
    else:
        singular = direction_ops.centred_right_singular_vectors(torch.stack(views))
        projections = direction_ops.svd_projections(singular, num_projections, directions == "svd-bottom-half",
                                                    generator=torch.Generator().manual_seed(5))
    ours = lpjepa.RDMReg(num_projections=num_projections, target_draw="per-view")(*views, target=target,
                                                                               projections=projections)
    theirs = np.mean([_pot_squared(v, target[i], projections[i]) for i, v in enumerate(views)])
    np.testing.assert_allclose(ours.item(), theirs, rtol=FP64["rtol"], atol=FP64["atol"])
