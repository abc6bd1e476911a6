"""Distribution math of the Rectified Generalized Gaussian, for tuning sparsity.

A sample is Y = ReLU(mu + sigma * X) with X ~ GN_p(0, 1) in the seed's
parameterisation: X = S * (p * G)^(1/p), S a fair sign and G ~ Gamma(1/p, 1), so X has
density proportional to exp(-|x|^p / p) (``scipy.stats.gennorm(p, scale=p**(1/p))``).

Everything is closed form through the regularized incomplete gamma function
(``torch.special.gammainc``), evaluated in float64; inverses are solved by bisection
on monotone functions, so no extra dependency is needed. All functions take and
return Python floats.
"""
import math

import torch

from ._checks import check_p, check_sigma

_BISECTION_STEPS = 200


def _resolve_sigma(p, sigma):
    sigma = check_sigma(sigma)
    return sigma_gn(p) if sigma is None else sigma


def _gammainc(a, x):
    """Regularized lower incomplete gamma P(a, x) in float64."""
    a_t = torch.tensor(a, dtype=torch.float64)
    x_t = torch.tensor(x, dtype=torch.float64)
    return float(torch.special.gammainc(a_t, x_t))


def _gammaincc(a, x):
    """Regularized upper incomplete gamma Q(a, x) = 1 - P(a, x), accurate in the tail."""
    a_t = torch.tensor(a, dtype=torch.float64)
    x_t = torch.tensor(x, dtype=torch.float64)
    return float(torch.special.gammaincc(a_t, x_t))


def sigma_gn(p):
    """Scale that gives GN_p unit variance before rectification (the seed's default).

    sigma = sqrt(Gamma(1/p) / Gamma(3/p)) / p^(1/p); p = 1 gives 1/sqrt(2), p = 2 gives 1.
    """
    p = check_p(p)
    return math.exp(0.5 * (math.lgamma(1 / p) - math.lgamma(3 / p)) - math.log(p) / p)


def gn_cdf(x, p):
    """P(X <= x) for X ~ GN_p(0, 1) in the seed's parameterisation."""
    p = check_p(p)
    half_mass = 0.5 * _gammainc(1 / p, abs(x) ** p / p)
    return 0.5 + half_mass if x >= 0 else 0.5 - half_mass


def _gn_upper_moment(k, s, p):
    """E[X^k; X > s] for X ~ GN_p(0, 1), k in {0, 1, 2}, s >= 0.

    Substituting u = x^p / p turns the integral into an upper incomplete gamma:
    Gamma((k+1)/p) / Gamma(1/p) * p^(k/p) / 2 * Q((k+1)/p, s^p / p).
    """
    a = (k + 1) / p
    log_scale = math.lgamma(a) - math.lgamma(1 / p) + (k / p) * math.log(p) - math.log(2.0)
    return math.exp(log_scale) * _gammaincc(a, s**p / p)


def expected_zero_fraction(p, mu, sigma=None):
    """Expected fraction of exact zeros of the prior, P(mu + sigma * X <= 0), X ~ GN_p(0, 1).

    ``sigma=None`` uses ``sigma_gn(p)``, as the sampler does. mu = 0 gives 0.5 for
    every p; lower mu gives more zeros.
    """
    p = check_p(p)
    sigma = _resolve_sigma(p, sigma)
    return gn_cdf(-float(mu) / sigma, p)


# The name this function had first; ``lpjepa.metrics.zero_fraction(z)`` measures a batch.
zero_fraction = expected_zero_fraction


def mu_for_zero_fraction(q, p, sigma=None):
    """The mean shift mu whose rectified samples are exactly zero with probability q.

    Inverse of ``expected_zero_fraction`` in mu: "I want 90% zeros" is
    ``mu_for_zero_fraction(0.9, p)``. q must lie strictly between 0 and 1.
    """
    p = check_p(p)
    sigma = _resolve_sigma(p, sigma)
    if not isinstance(q, (int, float)) or not 0.0 < q < 1.0:
        raise ValueError(f"q must be a fraction strictly between 0 and 1; got q={q!r}")
    # expected_zero_fraction = F(-mu/sigma): find the GN_p quantile t = F^-1(q), then mu = -sigma t.
    # Bracket t: |X|^p / p ~ Gamma(1/p), so the quantile grows like (p log(1/tail))^(1/p).
    tail = min(q, 1.0 - q)
    bound = 1.0
    while min(gn_cdf(bound, p), 1.0 - gn_cdf(-bound, p)) < 1.0 - tail:
        bound *= 2.0
    lo, hi = -bound, bound
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if gn_cdf(mid, p) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * max(1.0, abs(mid)):
            break
    return -sigma * 0.5 * (lo + hi)


def rectified_moments(p, mu, sigma=None):
    """(mean, variance) of Y = ReLU(mu + sigma * X), X ~ GN_p(0, 1), in closed form."""
    p = check_p(p)
    sigma = _resolve_sigma(p, sigma)
    mu = float(mu)
    a = -mu / sigma  # Y > 0 exactly when X > a
    s = abs(a)
    p_active = 1.0 - gn_cdf(a, p)
    # X^1 is odd: E[X; X > a] = E[X; X > |a|] for either sign of a.
    first = _gn_upper_moment(1, s, p)
    # X^2 is even: below zero, add the mass between a and 0 to the upper tail.
    total_second = _gn_upper_moment(2, 0.0, p) * 2.0
    second = _gn_upper_moment(2, s, p) if a >= 0 else total_second - _gn_upper_moment(2, s, p)
    mean = mu * p_active + sigma * first
    second_moment = mu * mu * p_active + 2.0 * mu * sigma * first + sigma * sigma * second
    return mean, max(second_moment - mean * mean, 0.0)


def rectified_mean(p, mu, sigma=None):
    """E[ReLU(mu + sigma * X)], X ~ GN_p(0, 1)."""
    return rectified_moments(p, mu, sigma)[0]


def rectified_variance(p, mu, sigma=None):
    """Var[ReLU(mu + sigma * X)], X ~ GN_p(0, 1)."""
    return rectified_moments(p, mu, sigma)[1]


def sigma_for_unit_rectified_variance(p, mu):
    """The sigma for which ReLU(mu + sigma * X) has unit variance after rectification.

    The seed's ``sigma_gn(p)`` gives unit variance *before* rectification; this is the
    alternative that normalises the rectified features instead. Solved by bisection:
    the rectified variance grows monotonically with sigma.
    """
    p = check_p(p)
    mu = float(mu)
    lo, hi = 0.0, 1.0
    while rectified_variance(p, mu, hi) < 1.0:
        hi *= 2.0
        if hi > 1e12:
            raise ValueError(f"no sigma gives unit rectified variance for p={p}, mu={mu}")
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if mid > 0 and rectified_variance(p, mu, mid) < 1.0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-14 * hi:
            break
    return 0.5 * (lo + hi)


def zero_fraction_table(ps=(1.0, 2.0), mus=(-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0)):
    """A Markdown table of the expected fraction of zeros for each mu (rows) and p (columns)."""
    header = "| mu | " + " | ".join(f"p = {p:g}" for p in ps) + " |"
    rule = "|---:|" + "---:|" * len(ps)
    rows = [f"| {mu:+.1f} | " + " | ".join(f"{expected_zero_fraction(p, mu):.1%}" for p in ps) + " |" for mu in mus]
    return "\n".join([header, rule, *rows])
