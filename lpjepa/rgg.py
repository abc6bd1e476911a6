"""Distribution math of the Rectified Generalized Gaussian, for tuning sparsity.

A sample is Y = ReLU(mu + sigma * X) with X ~ GN_p(0, 1) in the seed's
parameterisation: X = S * (p * G)^(1/p), S a fair sign and G ~ Gamma(1/p, 1), so X has
density proportional to exp(-|x|^p / p) (``scipy.stats.gennorm(p, scale=p**(1/p))``).

Everything is closed form through the regularized incomplete gamma functions (P and Q,
each computed to full float64 accuracy, the smaller of the two directly: a series or a
continued fraction), with arguments formed in logs, except the moments of the rectified
law in the tail, where a difference of incomplete gammas would cancel: those are
integrated in a form without cancellation (``rectified_moments``). Inverses are solved by
bisection on monotone functions, so no extra dependency is needed. All functions take
and return Python floats.

``sigma`` arguments take a number, or a convention by name (``resolve_sigma``): 'gn'
(the default, the seed's) or 'unit-rectified'.
"""
import functools
import math

from ._checks import check_finite, check_p, check_sigma

_BISECTION_STEPS = 200
# rectified_moments: from this b^p / p on, the excess moments over b are integrated
# (exp-sinh rule over tau in _TAU_RANGE, at most _QUADRATURE_LEVELS halvings of the step).
_QUADRATURE_FROM = 0.05
_QUADRATURE_RTOL = 1e-14
_QUADRATURE_LEVELS = 8
_TAU_RANGE = (-6.5, 4.0)
# log(b^p / p) beyond which every tail moment of X over b underflows float64 (exp(-x), x > 1e300).
_LOG_X_BEYOND_TAIL = 690.0


def resolve_sigma(sigma, p, mu=None):
    """The scale a ``sigma`` argument stands for at (p, mu), as a float.

    None or 'gn': ``sigma_gn(p)``, unit variance before rectification (the seed's, the
    official code's ``sigma_GN``); 'unit-rectified': ``sigma_for_unit_rectified_variance(p, mu)``,
    unit variance after it (the official ``sigma_RGN``), which needs mu (a function that
    solves for mu passes None, and gets an error for that convention); a number > 0:
    itself. The convention names a formula, so a dense target takes the same number.
    """
    p = check_p(p)
    sigma = check_sigma(sigma)
    if sigma is None or sigma == "gn":
        return sigma_gn(p)
    if sigma == "unit-rectified":
        if mu is None:
            raise ValueError("sigma='unit-rectified' depends on mu, which this function solves for; pass a number")
        return sigma_for_unit_rectified_variance(p, check_finite("mu", mu))
    return sigma


# Terms of the series and of the continued fraction past which the incomplete gammas stop (never reached
# for the arguments this module makes: both converge geometrically).
_MAX_TERMS = 10_000
_RELATIVE_EPS = 1e-16
_TINY = 1e-300


def _log_gamma_series(a, x):
    """log P(a, x) by its power series, x^a e^-x / Gamma(a) * sum x^n / (a (a+1) ... (a+n)); for x < a + 1."""
    term = total = 1.0 / a
    for n in range(1, _MAX_TERMS):
        term *= x / (a + n)
        total += term
        if abs(term) < abs(total) * _RELATIVE_EPS:
            break
    return a * math.log(x) - x - math.lgamma(a) + math.log(total)


def _log_gamma_continued_fraction(a, x):
    """log Q(a, x) by Legendre's continued fraction (modified Lentz); for x >= a + 1."""
    b = x + 1.0 - a
    c, d = 1.0 / _TINY, 1.0 / b
    h = d
    for i in range(1, _MAX_TERMS):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = _TINY if abs(d) < _TINY else d
        c = b + an / c
        c = _TINY if abs(c) < _TINY else c
        d = 1.0 / d
        h *= d * c
        if abs(d * c - 1.0) < _RELATIVE_EPS:
            break
    return a * math.log(x) - x - math.lgamma(a) + math.log(h)


def _regularized_gammas(a, x):
    """(P(a, x), Q(a, x)), the regularized lower and upper incomplete gammas, each to full relative accuracy.

    The smaller of the two is computed directly (series below x = a + 1, continued
    fraction above) and the other is 1 minus it, so neither loses digits to cancellation.
    """
    if x <= 0.0:
        return 0.0, 1.0
    if math.isinf(x):
        return 1.0, 0.0
    if x < a + 1.0:
        lower = math.exp(_log_gamma_series(a, x))
        return lower, 1.0 - lower
    upper = math.exp(_log_gamma_continued_fraction(a, x))
    return 1.0 - upper, upper


def _gammaincc(a, x):
    """Regularized upper incomplete gamma Q(a, x) = 1 - P(a, x), accurate in the tail."""
    return _regularized_gammas(a, x)[1]


def sigma_gn(p):
    """Scale that gives GN_p unit variance before rectification (the seed's default).

    sigma = sqrt(Gamma(1/p) / Gamma(3/p)) / p^(1/p); p = 1 gives 1/sqrt(2), p = 2 gives 1.
    """
    p = check_p(p)
    return math.exp(0.5 * (math.lgamma(1 / p) - math.lgamma(3 / p)) - math.log(p) / p)


# Past these, exp() of a log leaves the float64 range: |x|^p / p is 0 or inf to the gamma functions.
_LOG_UNDERFLOW, _LOG_OVERFLOW = -700.0, 700.0


def _log_gamma_argument(x, p):
    """log(|x|^p / p), the argument of the incomplete gammas, without forming |x|^p (x != 0)."""
    return p * math.log(abs(x)) - math.log(p)


def _gamma_argument(x, p):
    """|x|^p / p as a float: 0 or inf where it leaves the float64 range (what the gamma functions need there)."""
    if x == 0:
        return 0.0
    log_t = _log_gamma_argument(x, p)
    return math.inf if log_t > _LOG_OVERFLOW else math.exp(log_t)


def _gn_half_masses(x, p):
    """(P, Q): P = P(|X| <= |x|) = P(1/p, |x|^p / p) and Q = 1 - P, each to full relative accuracy.

    Where |x|^p / p underflows (large p, small |x|), P is the first term of its series,
    t^a / Gamma(a + 1) with a = 1/p, computed from log t; the next term is t / (a + 1)
    times smaller.
    """
    a = 1.0 / p
    if x == 0:
        return 0.0, 1.0
    log_t = _log_gamma_argument(x, p)
    if log_t < _LOG_UNDERFLOW:
        lower = math.exp(a * log_t - math.lgamma(a + 1.0))
        return lower, 1.0 - lower
    if log_t > _LOG_OVERFLOW:
        return 1.0, 0.0
    return _regularized_gammas(a, math.exp(log_t))


def gn_cdf(x, p):
    """P(X <= x) for X ~ GN_p(0, 1) in the seed's parameterisation.

    Accurate in both tails and near 0 for every p: the far side is 0.5 * Q, never 1 - (...).
    """
    p = check_p(p)
    lower, upper = _gn_half_masses(x, p)
    if x < 0:
        return 0.5 * upper
    return 0.5 + 0.5 * lower if lower < 0.5 else 1.0 - 0.5 * upper


def _gn_upper_moment(k, s, p):
    """E[X^k; X > s] for X ~ GN_p(0, 1), k in {0, 1, 2}, s >= 0.

    Substituting u = x^p / p turns the integral into an upper incomplete gamma:
    Gamma((k+1)/p) / Gamma(1/p) * p^(k/p) / 2 * Q((k+1)/p, s^p / p).
    """
    a = (k + 1) / p
    log_scale = math.lgamma(a) - math.lgamma(1 / p) + (k / p) * math.log(p) - math.log(2.0)
    return math.exp(log_scale) * _gammaincc(a, _gamma_argument(s, p))


def expected_zero_fraction(p, mu, sigma=None, *, rectify=True):
    """Expected fraction of exact zeros of the prior, P(mu + sigma * X <= 0), X ~ GN_p(0, 1).

    ``sigma``: None or 'gn' (``sigma_gn(p)``, as the sampler does), 'unit-rectified' or a
    number (``resolve_sigma``). mu = 0 gives 0.5 for every p; lower mu gives more zeros.
    A dense target (``rectify=False``) has no exact zeros: its fraction is 0.
    """
    p = check_p(p)
    mu = check_finite("mu", mu)
    sigma = resolve_sigma(sigma, p, mu)
    return gn_cdf(-mu / sigma, p) if rectify else 0.0


# The name this function had first; ``lpjepa.metrics.zero_fraction(z)`` measures a batch.
zero_fraction = expected_zero_fraction


def mu_for_zero_fraction(q, p, sigma=None):
    """The mean shift mu whose rectified samples are exactly zero with probability q.

    Inverse of ``expected_zero_fraction`` in mu: "I want 90% zeros" is
    ``mu_for_zero_fraction(0.9, p)``. q must lie strictly between 0 and 1.
    """
    p = check_p(p)
    sigma = resolve_sigma(sigma, p)
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


def _log_gn_normaliser(p):
    """log c, c = 1 / (2 p^(1/p) Gamma(1 + 1/p)): the GN_p(0, 1) density is c exp(-|x|^p / p)."""
    return -math.log(2.0) - math.log(p) / p - math.lgamma(1.0 + 1.0 / p)


def _gn_variance(p):
    """Var[X], X ~ GN_p(0, 1): p^(2/p) Gamma(3/p) / Gamma(1/p)."""
    return math.exp(2.0 * math.log(p) / p + math.lgamma(3.0 / p) - math.lgamma(1.0 / p))


def _exp_sinh(integrand, count):
    """``count`` integrals over (0, inf) of the tuple-valued ``integrand(u)``, by the exp-sinh rule.

    u = exp(pi/2 sinh(tau)), the trapezoid rule in tau, the step halved until every
    integral changes by less than ``_QUADRATURE_RTOL``: for integrands that decay like
    exp(-u) and are smooth on (0, inf) it converges double-exponentially.
    """

    def nodes(step, odd_only):
        sums = [0.0] * count
        for j in range(math.ceil(_TAU_RANGE[0] / step), math.floor(_TAU_RANGE[1] / step) + 1):
            if odd_only and j % 2 == 0:
                continue
            tau = j * step
            u = math.exp(0.5 * math.pi * math.sinh(tau))
            weight = u * 0.5 * math.pi * math.cosh(tau)
            if weight > 0.0:
                for i, value in enumerate(integrand(u)):
                    sums[i] += value * weight
        return sums

    step = 0.5
    estimate = [step * total for total in nodes(step, False)]
    for _ in range(_QUADRATURE_LEVELS):
        step /= 2
        refined = [e / 2 + step * total for e, total in zip(estimate, nodes(step, True))]
        if all(abs(r - e) <= _QUADRATURE_RTOL * abs(r) for r, e in zip(refined, estimate)):
            return refined
        estimate = refined
    return estimate


def _tail_excess_moments(b, p):
    """(log_scale, (m0, m1, m2)) with E[(X - b)_+^k] = exp(log_scale) * m_k, X ~ GN_p(0, 1), b >= 0.

    The k = 1, 2 moments of the excess over b are small differences of the upper
    moments E[X^k; X > b] once b is in the tail (their ratio to b^k P(X > b) falls like
    b^-p), so there they are integrated directly: with x = b^p / p and
    (b + t)^p / p = x + u,

        E[(X - b)_+^k] = c e^-x b^(k + 1 - p) * int_0^inf e^-u ((1 + u/x)^(1/p) - 1)^k (1 + u/x)^(1/p - 1) du,

    a smooth integrand of size one, while e^-x goes into ``log_scale`` and never
    underflows on its own. Near the centre (x < ``_QUADRATURE_FROM``) the difference of
    upper incomplete gammas loses little and is used instead.
    """
    log_x = p * math.log(b) - math.log(p) if b > 0 else -math.inf
    if log_x > _LOG_X_BEYOND_TAIL:  # P(X > b) < exp(-x) is 0 in float64: nothing to integrate
        return -math.inf, (1.0, 1.0, 1.0)
    x = math.exp(log_x)
    if x < _QUADRATURE_FROM:
        upper = [_gn_upper_moment(k, b, p) for k in range(3)]
        excess = (upper[0], upper[1] - b * upper[0], upper[2] - 2.0 * b * upper[1] + b * b * upper[0])
        return 0.0, excess

    def integrand(u):
        log_ratio = math.log1p(u / x)
        base = math.exp((1.0 / p - 1.0) * log_ratio - u)
        excess = b * math.expm1(log_ratio / p)
        return base, base * excess, base * excess * excess

    return _log_gn_normaliser(p) - x + (1.0 - p) * math.log(b), _exp_sinh(integrand, 3)


def rectified_moments(p, mu, sigma=None):
    """(mean, variance) of Y = ReLU(mu + sigma * X), X ~ GN_p(0, 1).

    ``sigma`` as in ``expected_zero_fraction``. Accurate to 1e-10 relative for every
    p > 0 wherever the active fraction P(Y > 0) exceeds 1e-300 (checked against mpmath at
    100 digits in the tests, whose worst case is about 2e-12): Y / sigma is the excess (X - a)_+ over
    a = -mu / sigma, whose moments are taken from the tail in a form without
    cancellation (``_tail_excess_moments``). For a > 0 (the sparse side) mean and
    variance are the excess's own; for a < 0 (the dense side), with b = -a and the
    excess moments e_k of X over b, (X + b)_+ = X + b + (X' - b)_+ with X' = -X gives
    mean b + e_1 and variance Var[X] - e_2 - e_1^2 - 2 b e_1: the rectification's
    correction subtracted from the full variance, never a difference of two large
    second moments.
    """
    p = check_p(p)
    mu = check_finite("mu", mu)
    sigma = resolve_sigma(sigma, p, mu)
    a = -mu / sigma  # Y > 0 exactly when X > a
    log_scale, (m0, m1, m2) = _tail_excess_moments(abs(a), p)
    if a > 0:
        # Each moment scaled in logs: the active fraction may be far below the smallest
        # float while mean and variance are not.
        mean = math.exp(math.log(sigma) + log_scale + math.log(m1))
        spread = m2 - math.exp(log_scale) * m1 * m1  # >= m2 / 2 (Cauchy-Schwarz, P(X > a) <= 1/2)
        return mean, math.exp(2.0 * math.log(sigma) + log_scale + math.log(spread))
    b, scale = -a, math.exp(log_scale)
    e1, e2 = scale * m1, scale * m2
    return sigma * (b + e1), sigma * sigma * (_gn_variance(p) - e2 - e1 * e1 - 2.0 * b * e1)


def rectified_variance(p, mu, sigma=None):
    """Var[ReLU(mu + sigma * X)], X ~ GN_p(0, 1)."""
    return rectified_moments(p, mu, sigma)[1]


def sigma_for_unit_rectified_variance(p, mu):
    """The sigma for which ReLU(mu + sigma * X) has unit variance after rectification.

    The seed's ``sigma_gn(p)`` gives unit variance *before* rectification; this is the
    alternative that normalises the rectified features instead (the official code's
    ``sigma_RGN``). Solved by bisection: the rectified variance grows monotonically with
    sigma. Remembered per (p, mu), since a loss built every step asks again.
    """
    return _unit_rectified_sigma(check_p(p), check_finite("mu", mu))


@functools.lru_cache(maxsize=256)
def _unit_rectified_sigma(p, mu):
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
