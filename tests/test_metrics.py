"""Sparsity metrics on hand-built inputs whose answers are known."""
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
