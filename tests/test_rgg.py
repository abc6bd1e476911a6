"""The RGG distribution math against scipy.stats and numerical integration."""
import math

import mpmath
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
    assert rgg.rectified_variance(p, mu) == var


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


def mpmath_moments(p, mu, sigma, digits=100):
    """(mean, variance, active fraction) of ReLU(mu + sigma X) from incomplete gammas at ``digits`` digits.

    The official formula's form (upper moments of X past the threshold, then the excess's
    moments from them): its cancellation costs at most ~15 of the 100 digits here.
    """
    with mpmath.workdps(digits):
        p, mu, sigma = mpmath.mpf(p), mpmath.mpf(mu), mpmath.mpf(sigma)
        a = -mu / sigma
        c = 1 / (2 * p ** (1 / p) * mpmath.gamma(1 + 1 / p))

        def upper(k, t):  # E[X^k; X > t] for t >= 0
            return c * p ** ((k + 1) / p - 1) * mpmath.gammainc((k + 1) / p, t**p / p, mpmath.inf)

        whole = (mpmath.mpf(1), mpmath.mpf(0), p ** (2 / p) * mpmath.gamma(3 / p) / mpmath.gamma(1 / p))
        moments = [upper(k, a) if a >= 0 else whole[k] - (-1) ** k * upper(k, -a) for k in range(3)]
        first = moments[1] - a * moments[0]
        second = moments[2] - 2 * a * moments[1] + a * a * moments[0]
        return float(sigma * first), float(sigma**2 * (second - first**2)), float(moments[0])


# Thresholds a = -mu / sigma as x = |a|^p / p: the far sparse tail (active fraction down
# to ~1e-288), the switch between the two methods (0.05), the centre, and the dense side.
TAIL_XS = [650.0, 100.0, 10.0, 1.0, 0.06, 0.04, 1e-3, 0.0]


@pytest.mark.parametrize("p", [0.1, 0.5, 1.0, 2.0, 3.0, 20.0, 100.0])
def test_rectified_moments_against_mpmath_to_1e10_relative(p):
    sigma = rgg.sigma_gn(p)
    for x in TAIL_XS:
        for side in (1.0, -1.0):  # a > 0: sparse (mu < 0); a < 0: dense (mu > 0)
            mu = -side * (p * x) ** (1 / p) * sigma
            mean, var = rgg.rectified_moments(p, mu)
            ref_mean, ref_var, active = mpmath_moments(p, mu, sigma)
            assert active > 1e-300
            where = f"p={p}, mu={mu!r} (active fraction {active:.3g})"
            assert mean == pytest.approx(ref_mean, rel=1e-10), where
            assert var == pytest.approx(ref_var, rel=1e-10), where


@pytest.mark.parametrize("p,mu", [(2.0, -8.0), (2.0, -10.0), (3.0, -5.0), (0.5, -40.0)])
def test_rectified_moments_in_the_far_tail(p, mu):
    # Where the difference of incomplete gammas gave a negative mean or a zero variance.
    ref_mean, ref_var, _ = mpmath_moments(p, mu, rgg.sigma_gn(p))
    mean, var = rgg.rectified_moments(p, mu)
    assert mean > 0 and var > 0
    assert mean == pytest.approx(ref_mean, rel=1e-10) and var == pytest.approx(ref_var, rel=1e-10)


def test_rectified_moments_beyond_float64():
    # An active fraction below the smallest float gives zeros, not an error.
    assert rgg.rectified_moments(2.0, -1e200) == (0.0, 0.0)
    mean, var = rgg.rectified_moments(2.0, 1e200)
    assert mean == 1e200 and var == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("p,mu", [(1.0, 0.0), (2.0, -1.0), (0.5, -0.3), (20.0, 0.2)])
def test_sigma_conventions(p, mu):
    assert rgg.resolve_sigma(None, p, mu) == rgg.resolve_sigma("gn", p, mu) == rgg.sigma_gn(p)
    unit = rgg.resolve_sigma("unit-rectified", p, mu)
    assert unit == rgg.sigma_for_unit_rectified_variance(p, mu)
    assert rgg.rectified_variance(p, mu, "unit-rectified") == pytest.approx(1.0, rel=1e-12)
    assert rgg.resolve_sigma(0.7, p, mu) == 0.7
    assert rgg.expected_zero_fraction(p, mu, "unit-rectified") == pytest.approx(gn_law(p).cdf(-mu / unit), abs=1e-12)
    assert rgg.expected_zero_fraction(p, mu, rectify=False) == 0.0


@pytest.mark.parametrize("bad", ["sigma_GN", -1.0, 0.0, float("nan"), True])
def test_bad_sigma_is_named(bad):
    with pytest.raises(ValueError, match="sigma must be"):
        rgg.resolve_sigma(bad, 1.0, 0.0)


def test_unit_rectified_sigma_needs_mu():
    with pytest.raises(ValueError, match="depends on mu"):
        rgg.mu_for_zero_fraction(0.9, 1.0, sigma="unit-rectified")


@pytest.mark.parametrize("p", [0.1, 0.5, 1.0, 1.5, 2.0, 7.0, 100.0])
@pytest.mark.parametrize("mu", [-30.0, -3.0, -1e-3, -5e-4, 0.0, 5e-4, 1e-3, 3.0, 9.0, 30.0])
def test_expected_zero_fraction_is_accurate_in_both_tails_and_near_zero(p, mu):
    # Against mpmath's upper incomplete gamma at 50 digits: 0.5 * Q(1/p, |x|^p / p) on the
    # far side (no 1 - P cancellation in the oracle either), where |x|^p can underflow
    # (p = 100, mu = 5e-4) or the answer be 1e-58 (p = 1.5, mu = 30).
    with mpmath.workdps(50):
        x = -mpmath.mpf(mu) / mpmath.mpf(rgg.sigma_gn(p))
        a, t = 1 / mpmath.mpf(p), abs(x) ** p / p
        upper = mpmath.gammainc(a, t, mpmath.inf, regularized=True)
        exact = 0.5 * upper if x < 0 else 1 - 0.5 * upper
    ours = rgg.expected_zero_fraction(p, mu)
    assert ours == pytest.approx(float(exact), rel=1e-12, abs=0)


def test_mu_for_zero_fraction_half_is_zero_at_large_p():
    assert abs(rgg.mu_for_zero_fraction(0.5, 100.0)) < 1e-12
