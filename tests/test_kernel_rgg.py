"""The RGG sampler kernel against scipy.stats.gennorm, and its Philox seeding.

Statistical tests run at fixed seeds, so they are deterministic; their thresholds
(p-value 1e-4, 5 standard errors) would still pass a correct sampler at almost any
seed, and ``test_ks_rejects_a_wrong_exponent`` shows they have the power to fail.
"""
import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from conftest import requires_cuda
from lpjepa.kernels.rgg_sample import (
    GAMMA_MAX_ROUNDS,
    philox_seed_offset,
    rgg_launch,
    rgg_philox_increment,
    rgg_sample,
)

N_SAMPLES = 16384


def unit_variance_sigma(p):
    """The seed's sigma: GN_p(0, sigma) has unit variance before rectification."""
    return math.sqrt(math.gamma(1 / p) / math.gamma(3 / p)) / p ** (1 / p)


def gennorm(p):
    """X ~ GN_p(0, 1) in the seed's parameterisation."""
    return stats.gennorm(beta=p, scale=p ** (1 / p))


def zero_mass(p, mu, sigma):
    """P(ReLU(mu + sigma X) == 0) = P(X <= t), t = -mu / sigma, in closed form."""
    t = -mu / sigma
    return 0.5 + 0.5 * math.copysign(1.0, t) * special.gammainc(1 / p, abs(t) ** p / p)


def check_against_gennorm(sample, p, mu, sigma):
    """Zero mass within 5 standard errors, and a KS test of the positive part."""
    values = sample.double().cpu().numpy()
    n = values.size
    expected_zero = zero_mass(p, mu, sigma)
    observed_zero = np.mean(values == 0)
    stderr = math.sqrt(expected_zero * (1 - expected_zero) / n)
    assert abs(observed_zero - expected_zero) < 5 * stderr + 1e-12, (observed_zero, expected_zero)

    # Positive part: X = (y - mu) / sigma given X > t has CDF (F(x) - F(t)) / (1 - F(t)).
    dist = gennorm(p)
    t = -mu / sigma
    f_t = dist.cdf(t)
    x = (values[values > 0] - mu) / sigma
    result = stats.kstest(x, lambda v: (dist.cdf(v) - f_t) / (1 - f_t))
    assert result.pvalue > 1e-4, (result.statistic, result.pvalue, x.size)


@pytest.mark.parametrize("mu", [-1.0, 0.0, 0.5])
@pytest.mark.parametrize("p", [0.5, 1.0, 1.5, 2.0, 3.0])
def test_matches_rectified_gennorm(p, mu):
    torch.manual_seed(1000 + int(10 * p) + int(10 * mu))
    sigma = unit_variance_sigma(p)
    sample = rgg_sample((N_SAMPLES,), p=p, mu=mu, sigma=sigma, device="cpu")
    assert sample.dtype == torch.float32 and sample.shape == (N_SAMPLES,)
    assert torch.isfinite(sample).all() and (sample >= 0).all()
    check_against_gennorm(sample, p, mu, sigma)


@pytest.mark.parametrize("p", [0.2, 10.0])
def test_extreme_exponents_stay_exact(p):
    # p = 0.2 takes (p G)^(1/p) to the 5th power; p = 10 boosts with U^10.
    torch.manual_seed(7)
    sigma = unit_variance_sigma(p)
    sample = rgg_sample((N_SAMPLES,), p=p, mu=0.3, sigma=sigma, device="cpu")
    assert torch.isfinite(sample).all()
    check_against_gennorm(sample, p, 0.3, sigma)


def test_ks_rejects_a_wrong_exponent():
    torch.manual_seed(3)
    sample = rgg_sample((N_SAMPLES,), p=1.0, mu=0.0, sigma=unit_variance_sigma(1.0), device="cpu")
    with pytest.raises(AssertionError):
        check_against_gennorm(sample, 2.0, 0.0, unit_variance_sigma(2.0))


def test_2d_shape_and_sigma_zero():
    out = rgg_sample((3, 5), p=1.5, mu=0.25, sigma=0.0, device="cpu", seed=11, offset=0)
    assert out.shape == (3, 5)
    assert torch.equal(out, torch.full((3, 5), 0.25))
    negative = rgg_sample(7, p=2.0, mu=-0.5, sigma=0.0, device="cpu", seed=11, offset=0)
    assert torch.equal(negative, torch.zeros(7))


@pytest.mark.parametrize("p", [1.0, 2.0, 1.5])
def test_fp16_output_is_the_fp32_sample_cast_on_store(p):
    kwargs = dict(p=p, mu=0.1, sigma=1.3, device="cpu", seed=2024, offset=8)
    full = rgg_sample((1000,), dtype=torch.float32, **kwargs)
    half = rgg_sample((1000,), dtype=torch.float16, **kwargs)
    assert half.dtype == torch.float16
    assert torch.equal(half, full.half())


@requires_cuda  # the Triton interpreter mishandles bf16
def test_bf16_output_is_the_fp32_sample_cast_on_store():
    kwargs = dict(p=1.5, mu=0.1, sigma=1.3, device="cuda", seed=2024, offset=8)
    full = rgg_sample((4096,), dtype=torch.float32, **kwargs)
    assert torch.equal(rgg_sample((4096,), dtype=torch.bfloat16, **kwargs), full.bfloat16())


@pytest.mark.parametrize("p", [1.0, 2.0, 0.5])
def test_counter_based_stream(p):
    # Element i uses Philox counters (offset + i, ...): a later offset is a shifted stream.
    kwargs = dict(p=p, mu=0.0, sigma=1.0, device="cpu", seed=99)
    whole = rgg_sample((600,), offset=0, **kwargs)
    tail = rgg_sample((200,), offset=400, **kwargs)
    assert torch.equal(whole[400:], tail)
    other_seed = rgg_sample((600,), offset=0, p=p, mu=0.0, sigma=1.0, device="cpu", seed=100)
    assert not torch.equal(whole, other_seed)


def test_reproducible_under_manual_seed():
    torch.manual_seed(123)
    first = rgg_sample((500,), p=1.5, mu=0.0, sigma=1.0, device="cpu")
    second_call = rgg_sample((500,), p=1.5, mu=0.0, sigma=1.0, device="cpu")
    torch.manual_seed(123)
    again = rgg_sample((500,), p=1.5, mu=0.0, sigma=1.0, device="cpu")
    assert torch.equal(first, again)
    # Two consecutive calls draw different numbers.
    assert not torch.equal(first, second_call)


def test_reproducible_with_explicit_generator_and_default_untouched():
    def draw(generator):
        n = 500
        seed, offset = philox_seed_offset(rgg_philox_increment(n), "cpu", generator)
        return rgg_sample((n,), p=3.0, mu=0.0, sigma=1.0, device="cpu", seed=seed, offset=offset)

    default_state = torch.get_rng_state()
    g1 = torch.Generator().manual_seed(5)
    a1, a2 = draw(g1), draw(g1)
    g2 = torch.Generator().manual_seed(5)
    b1, b2 = draw(g2), draw(g2)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2)
    assert torch.equal(torch.get_rng_state(), default_state)


def test_philox_seed_offset_on_cpu_advances_the_generator():
    g = torch.Generator().manual_seed(0)
    seeds = [philox_seed_offset(1000, "cpu", g) for _ in range(3)]
    assert all(offset == 0 for _, offset in seeds)
    assert len({seed for seed, _ in seeds}) == 3
    assert all(0 <= seed < 2**63 for seed, _ in seeds)


@requires_cuda
def test_philox_seed_offset_on_cuda_advances_offset_by_rounded_increment():
    g = torch.Generator(device="cuda").manual_seed(17)
    seed0, offset0 = philox_seed_offset(10, "cuda", g)
    seed1, offset1 = philox_seed_offset(3, "cuda", g)
    seed2, offset2 = philox_seed_offset(1, "cuda", g)
    assert seed0 == seed1 == seed2 == 17
    assert (offset1 - offset0, offset2 - offset1) == (12, 4)
    # What it reads and advances is the generator's state, [seed, offset] as get_state holds it.
    state_seed, state_offset = (int(v) for v in g.get_state().view(torch.int64))
    assert (state_seed, state_offset) == (17, offset2 + 4)
    # The default generator of the device, when none is passed: torch.cuda.manual_seed reproduces it.
    state = torch.cuda.get_rng_state()
    try:
        torch.cuda.manual_seed(23)
        first = philox_seed_offset(8, "cuda")
        torch.cuda.manual_seed(23)
        assert philox_seed_offset(8, "cuda") == first and first[0] == 23
    finally:
        torch.cuda.set_rng_state(state)


def test_unaccepted_lanes_are_nan_never_a_value():
    out = torch.empty(512)
    launch = rgg_launch(out, p=1.5, mu=0.0, sigma=1.0, seed=31, offset=0)
    launch()
    reference = out.clone()
    assert not torch.isnan(reference).any()
    assert launch.meta["MAX_ROUNDS"] == GAMMA_MAX_ROUNDS

    # No round at all: every lane is unaccepted and must say so.
    launch._replace(meta={**launch.meta, "MAX_ROUNDS": 0})()
    assert torch.isnan(out).all()
    # One round: lanes that accepted keep exactly their value, the others are NaN.
    launch._replace(meta={**launch.meta, "MAX_ROUNDS": 1})()
    flagged = torch.isnan(out)
    assert 0 < flagged.sum() < 0.2 * out.numel()
    assert torch.equal(out[~flagged], reference[~flagged])


# p, mu and sigma are checked once, by lpjepa.sample_rgg (tests/test_errors.py, both backends);
# the launcher refuses what its stores cannot write, and half a Philox key.
@pytest.mark.parametrize("kwargs", [dict(dtype=torch.float64), dict(seed=1)])
def test_rejects_bad_parameters(kwargs):
    args = {**dict(p=1.0, mu=0.0, sigma=1.0, device="cpu"), **kwargs}
    with pytest.raises(ValueError):
        rgg_sample((4,), **args)
