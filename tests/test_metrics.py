"""Sparsity metrics on hand-built inputs whose answers are known."""
import numpy as np
import pytest
import torch

from lpjepa import metrics


def test_metrics_on_known_matrix():
    z = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 3.0, 0.0]])
    assert metrics.zero_fraction(z) == pytest.approx(6 / 12)
    assert metrics.l0_metric(z) == pytest.approx(6 / 12)
    # one-hot rows give 1/D, a flat row gives 1.
    assert metrics.l1_metric(z) == pytest.approx((0.25 + 1.0 + 0.25) / 3)
    assert metrics.dead_units(z) == 0
    assert metrics.dead_units(z[[0, 2]]) == 2
    ever = metrics.active_units(z[[0]]) | metrics.active_units(z[[2]])
    assert metrics.dead_units(ever_active=ever) == 2
    report = metrics.sparsity_report(z)
    assert set(report) == {"zero_fraction", "l0", "l1", "dead_units"}


def test_all_zero_rows_count_as_zero_in_l1():
    assert metrics.l1_metric(torch.zeros(3, 5)) == 0.0


def test_metrics_reject_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        metrics.zero_fraction(torch.zeros(5))


def _vicreg_oracle(z):
    """VICReg's two terms in numpy (fp64), as solo-learn's variance_loss and covariance_loss compute each view's."""
    z = z.double().numpy()
    std = np.sqrt(z.var(axis=0, ddof=1) + 1e-4)
    covariance = np.cov(z, rowvar=False)
    off_diagonal = covariance - np.diag(np.diag(covariance))
    return np.maximum(0.0, 1.0 - std).mean(), (off_diagonal**2).sum() / z.shape[1]


@pytest.mark.parametrize("rows,dim", [(3, 5), (255, 33), (256, 64)])
def test_vicreg_terms_against_numpy(rows, dim):
    gen = torch.Generator().manual_seed(rows)
    # Mixed scales: some dimensions under the unit-std hinge, some over it; correlated columns.
    z = torch.randn(rows, dim, generator=gen) * torch.linspace(0.1, 2.0, dim)
    z[:, 1] += 0.5 * z[:, 0]
    variance, covariance = metrics.vicreg_variance(z), metrics.vicreg_covariance(z)
    assert isinstance(variance, torch.Tensor) and variance.dim() == 0 and variance.dtype == torch.float32
    expected_variance, expected_covariance = _vicreg_oracle(z)
    assert variance.item() == pytest.approx(expected_variance, rel=1e-5, abs=1e-6)
    assert covariance.item() == pytest.approx(expected_covariance, rel=1e-4)


def test_vicreg_terms_vanish_where_vicreg_is_satisfied():
    z = 3.0 * torch.eye(8).repeat(4, 1)  # std > 1 in every dimension, yet correlated columns
    assert metrics.vicreg_variance(z).item() == 0.0
    assert metrics.vicreg_covariance(torch.randn(100_000, 4, generator=torch.Generator().manual_seed(0))).item() < 1e-3
