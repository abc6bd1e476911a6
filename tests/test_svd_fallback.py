"""SVD directions that never stop a run, and that are a function of the input alone.

* Deterministic: two calls on one input give identical directions, with B <= D (where the last
  singular vector lies in the null space of the centred batch and the SVD leaves it arbitrary) and
  with B > D; reordering the batch's rows, which changes the SVD's arithmetic but not its
  subspaces, gives the same directions.
* The null-space rows are orthonormal, orthogonal to the centred batch and to the other rows.
* A failing ``torch.linalg.svd`` falls back to eigh of the covariance with a warning naming the
  cause, spanning the same subspaces (the same vectors, by the same sign rule) and giving the
  same loss; when eigh fails too (non-finite features) the run still goes on: a NaN loss and a
  warning, no exception.
"""
import contextlib

import pytest
import torch

import lpjepa
from lpjepa.ops import directions as direction_ops
from conftest import tolerance

FP64 = dict(zip(("atol", "rtol"), tolerance(torch.float64)))
FP32 = dict(zip(("atol", "rtol"), tolerance(torch.float32)))


@contextlib.contextmanager
def svd_failing(message="simulated convergence failure"):
    """``torch.linalg.svd`` raises ``torch.linalg.LinAlgError(message)`` inside."""
    real = torch.linalg.svd

    def failing(*args, **kwargs):
        raise torch.linalg.LinAlgError(message)

    torch.linalg.svd = failing
    try:
        yield
    finally:
        torch.linalg.svd = real


def _batch(views, rows, dim, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    # Decaying column scales: distinct singular values, so the row space vectors are unique up to sign.
    scales = torch.linspace(2.0, 0.3, dim, dtype=dtype)
    return torch.randn(views, rows, dim, generator=gen, dtype=dtype) * scales


def _centred(batch):
    return batch - batch.mean(dim=1, keepdim=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows,dim", [(5, 9), (24, 48), (9, 9), (40, 12)])
def test_two_calls_on_one_input_give_identical_directions(rows, dim, dtype):
    batch = _batch(2, rows, dim, seed=rows, dtype=dtype)
    first = direction_ops.centred_right_singular_vectors(batch)
    assert first.shape == (2, min(rows, dim), dim) and first.dtype == dtype
    assert torch.equal(first, direction_ops.centred_right_singular_vectors(batch.clone()))
    z, target = batch[0], lpjepa.sample_rgg((rows, dim), dtype=dtype, generator=torch.Generator().manual_seed(1))
    losses = [lpjepa.rdmreg_loss(z, target, 32, directions="svd", generator=torch.Generator().manual_seed(2))
              for _ in range(2)]
    assert torch.equal(losses[0], losses[1])


@pytest.mark.parametrize("rows,dim", [(5, 9), (24, 48), (17, 17), (40, 12)])
def test_the_directions_do_not_depend_on_the_order_of_the_rows(rows, dim):
    """Reordered rows: the same centred subspaces, other arithmetic in the SVD; the same directions."""
    batch = _batch(1, rows, dim, seed=3)
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(4))
    ours = direction_ops.centred_right_singular_vectors(batch)
    reordered = direction_ops.centred_right_singular_vectors(batch[:, order])
    torch.testing.assert_close(reordered, ours, atol=1e-9, rtol=0)


@pytest.mark.parametrize("rows,dim", [(5, 9), (24, 48), (9, 9)])
def test_the_null_space_rows_are_orthonormal_and_orthogonal_to_the_batch(rows, dim):
    batch = _batch(2, rows, dim, seed=5)
    vectors = direction_ops.centred_right_singular_vectors(batch)
    for view in range(2):
        v = vectors[view]
        torch.testing.assert_close(v @ v.T, torch.eye(min(rows, dim), dtype=torch.float64), atol=1e-12, rtol=0)
        # The centred batch has rank rows - 1 <= dim: its last direction projects every row to the mean.
        spread = (_centred(batch)[view] @ v[-1]).abs().max()
        assert spread < 1e-12, spread
        # Every other row's sign: its largest entry is positive.
        largest = torch.gather(v[:-1], 1, v[:-1].abs().argmax(dim=1, keepdim=True))
        assert (largest > 0).all()


def test_collapsed_features_get_the_coordinate_axes():
    """A constant batch: every singular value is zero, so every row is the deterministic completion."""
    batch = torch.full((1, 6, 4), 0.3, dtype=torch.float64)
    vectors = direction_ops.centred_right_singular_vectors(batch)
    assert torch.equal(vectors[0], torch.eye(4, dtype=torch.float64))


@pytest.mark.parametrize("rows,dim", [(5, 9), (24, 48), (40, 12)])
def test_a_failing_svd_falls_back_to_eigh_with_a_warning_and_the_same_directions(rows, dim):
    batch = _batch(2, rows, dim, seed=6)
    expected = direction_ops.centred_right_singular_vectors(batch)
    with svd_failing(), pytest.warns(RuntimeWarning) as warned:
        fallback = direction_ops.centred_right_singular_vectors(batch)
    message = str(warned[0].message)
    assert "torch.linalg.svd failed" in message and "LinAlgError: simulated convergence failure" in message
    assert "torch.linalg.eigh of its covariance" in message
    # The same subspaces: the same vectors (same sign rule, same null-space rule), and so the same projectors.
    torch.testing.assert_close(fallback, expected, atol=1e-7, rtol=0)
    for k in range(1, min(rows, dim) + 1):
        torch.testing.assert_close(fallback[:, :k].transpose(1, 2) @ fallback[:, :k],
                                   expected[:, :k].transpose(1, 2) @ expected[:, :k], atol=1e-7, rtol=0)


@pytest.mark.parametrize("scheme", ["svd", "svd-bottom-half"])
def test_a_failing_svd_does_not_change_the_loss(scheme):
    views = [v.float() for v in _batch(2, 24, 16, seed=7)]
    target = lpjepa.sample_rgg((24, 16), generator=torch.Generator().manual_seed(8))

    def loss():
        return lpjepa.RDMReg(num_projections=32, directions=scheme)(*views, target=target,
                                                                     generator=torch.Generator().manual_seed(9))

    expected = loss()
    with svd_failing(), pytest.warns(RuntimeWarning, match="torch.linalg.svd failed"):
        fallback = loss()
    torch.testing.assert_close(fallback, expected, **FP32)


def test_non_finite_features_never_stop_the_run():
    """Both SVD and eigh fail on NaN: a warning naming both, the coordinate axes, and a NaN loss."""
    z = _batch(1, 12, 6, seed=10, dtype=torch.float32)[0].requires_grad_()
    broken = z.detach().clone()
    broken[3, 2] = float("nan")
    target = lpjepa.sample_rgg((12, 6), generator=torch.Generator().manual_seed(11))
    with pytest.warns(RuntimeWarning, match=r"torch.linalg.svd failed.*and so did torch.linalg.eigh") as warned:
        loss = lpjepa.rdmreg_loss(broken, target, 16, directions="svd", generator=torch.Generator().manual_seed(12))
    assert "Non-finite features" in str(warned[0].message)
    assert torch.isnan(loss)
    with pytest.warns(RuntimeWarning):
        vectors = direction_ops.centred_right_singular_vectors(broken[None])
    assert torch.equal(vectors[0], torch.eye(6))
