"""The RGG distribution math against scipy.stats and numerical integration."""
import math

import pytest
import scipy.integrate
import scipy.stats

from lpjepa import rgg

PS = [0.5, 1.0, 1.5, 2.0, 3.0]
MUS = [-1.5, -0.3, 0.0, 0.7]


def gn_law(p):
    return scipy.stats.gennorm(p, scale=p ** (1 / p))


def integrated_moments(p, mu, sigma):
    """Mean and variance of ReLU(mu + sigma X) by quadrature over the GN_p density."""
    law, start = gn_law(p), -mu / sigma
    first = scipy.integrate.quad(lambda x: (mu + sigma * x) * law.pdf(x), start, math.inf, epsabs=1e-13)[0]
    second = scipy.integrate.quad(lambda x: (mu + sigma * x) ** 2 * law.pdf(x), start, math.inf, epsabs=1e-13)[0]
    return first, second - first**2


@pytest.mark.parametrize("p", PS)
def test_sigma_gn_is_the_seeds_and_gives_unit_variance(p):
    seed_sigma = math.sqrt(math.gamma(1 / p) / math.gamma(3 / p)) / (p ** (1 / p))
    assert rgg.sigma_gn(p) == pytest.approx(seed_sigma, rel=1e-13)
    assert (rgg.sigma_gn(p) ** 2) * gn_law(p).var() == pytest.approx(1.0, rel=1e-10)


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("mu", MUS)
def test_zero_fraction_and_inverse(p, mu):
    sigma = rgg.sigma_gn(p)
    q = rgg.zero_fraction(p, mu)
    assert q == pytest.approx(gn_law(p).cdf(-mu / sigma), abs=1e-12)
    assert rgg.mu_for_zero_fraction(q, p) == pytest.approx(mu, abs=1e-9)
    assert rgg.zero_fraction(p, mu, sigma=2.0) == pytest.approx(gn_law(p).cdf(-mu / 2.0), abs=1e-12)


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("q", [0.05, 0.5, 0.9, 0.999])
def test_mu_for_zero_fraction_against_scipy_quantile(p, q):
    expected = -rgg.sigma_gn(p) * gn_law(p).ppf(q)
    assert rgg.mu_for_zero_fraction(q, p) == pytest.approx(expected, abs=1e-8)


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("mu", MUS)
def test_rectified_moments_against_quadrature(p, mu):
    sigma = rgg.sigma_gn(p)
    mean, var = rgg.rectified_moments(p, mu)
    ref_mean, ref_var = integrated_moments(p, mu, sigma)
    assert mean == pytest.approx(ref_mean, abs=1e-8)
    assert var == pytest.approx(ref_var, abs=1e-8)
    assert rgg.rectified_mean(p, mu) == mean and rgg.rectified_variance(p, mu) == var


def test_rectified_gaussian_closed_form():
    mean, var = rgg.rectified_moments(2.0, 0.0)
    assert mean == pytest.approx(1 / math.sqrt(2 * math.pi), rel=1e-12)
    assert var == pytest.approx(0.5 - 1 / (2 * math.pi), rel=1e-12)


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("mu", MUS)
def test_sigma_for_unit_rectified_variance(p, mu):
    sigma = rgg.sigma_for_unit_rectified_variance(p, mu)
    assert integrated_moments(p, mu, sigma)[1] == pytest.approx(1.0, abs=1e-7)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "1"])
def test_bad_p_is_named(bad):
    with pytest.raises(ValueError, match="p must be"):
        rgg.zero_fraction(bad, 0.0)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_bad_fraction_is_named(bad):
    with pytest.raises(ValueError, match="q must be"):
        rgg.mu_for_zero_fraction(bad, 1.0)
