"""sample_rgg (torch backend) against scipy.stats and the closed-form zero mass."""
import math

import numpy as np
import pytest
import scipy.stats
import torch

import lpjepa
from lpjepa import reference, rgg

N_SAMPLES = 40_000
P_VALUE_FLOOR = 1e-3  # seeds are fixed, so a pass is deterministic, not luck


def gn_law(p):
    """X ~ GN_p(0, 1) in the seed's parameterisation, as scipy knows it."""
    return scipy.stats.gennorm(p, scale=p ** (1 / p))


def check_against_scipy(samples, p, mu, sigma, rectify=True):
    """The zero mass within 5 binomial standard deviations of scipy's, and a KS test of the rest.

    Rectified: the active samples follow mu + sigma X given X > -mu / sigma. Dense: all
    samples follow mu + sigma X, and none is exactly zero.
    """
    law = gn_law(p)
    threshold = -mu / sigma if rectify else -math.inf  # a sample is active exactly when X > threshold
    q = law.cdf(threshold)
    if rectify:
        assert abs(q - rgg.expected_zero_fraction(p, mu, sigma)) < 1e-12
    else:
        assert rgg.expected_zero_fraction(p, mu, sigma, rectify=False) == 0.0
    observed = np.mean(samples == 0)
    assert abs(observed - q) < 5 * math.sqrt(q * (1 - q) / samples.size) + 1e-12, (observed, q)
    active = samples[samples > 0] if rectify else samples
    tail = law.sf(threshold)

    def conditional_cdf(y):
        return (law.cdf((y - mu) / sigma) - law.cdf(threshold)) / tail

    result = scipy.stats.kstest(active, conditional_cdf)
    assert result.pvalue > P_VALUE_FLOOR, (result.statistic, result.pvalue, active.size)


@pytest.mark.parametrize("p", [0.5, 1.0, 1.5, 2.0, 3.0])
@pytest.mark.parametrize("mu", [-0.8, 0.0, 0.6])
def test_sampler_matches_scipy(p, mu):
    gen = torch.Generator().manual_seed(int(1000 * p + 100 * mu) % 2**31)
    samples = lpjepa.sample_rgg(N_SAMPLES, p, mu, generator=gen, dtype=torch.float64, backend="torch").numpy()
    check_against_scipy(samples, p, mu, rgg.sigma_gn(p))


# mu as the prior's zero fraction: deep in the sparse tail, the seed's 0.5, and nearly dense.
EXTREME_ZEROS = [0.999, 0.5, 0.001]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [20.0, 50.0, 100.0, 0.1])
@pytest.mark.parametrize("zeros", EXTREME_ZEROS)
def test_sampler_exact_at_extreme_p_and_mu(p, zeros, dtype):
    # Large p: the Gamma(1/p) draw is tiny (e^-100 at p = 100), below fp32's smallest
    # normal; small p: (p G)^(1/p) is a tenth power. Both are drawn in logs.
    n = 200_000 if zeros == 0.999 else N_SAMPLES  # ~200 active samples in the sparse tail
    mu = rgg.mu_for_zero_fraction(zeros, p)
    gen = torch.Generator().manual_seed(int(p) * 10 + int(1000 * zeros))
    samples = lpjepa.sample_rgg(n, p, mu, generator=gen, dtype=dtype, backend="torch").double().numpy()
    check_against_scipy(samples, p, mu, rgg.sigma_gn(p))


def test_sampler_zero_mass_at_p100_mu_minus_half():
    # The audit's case: the clamped Gamma draw gave 0.499 zeros instead of 0.644.
    samples = lpjepa.sample_rgg(N_SAMPLES, 100.0, -0.5, generator=torch.Generator().manual_seed(5), backend="torch")
    expected = rgg.expected_zero_fraction(100.0, -0.5)
    assert expected == pytest.approx(0.644, abs=1e-3)
    assert abs((samples == 0).double().mean().item() - expected) < 5 * math.sqrt(expected * (1 - expected) / N_SAMPLES)


def test_the_check_rejects_a_clamped_gamma_draw():
    # The same check fails the draw through torch._standard_gamma, whose clamp at the
    # smallest normal float puts a false point mass into the positive part at p = 50.
    p, mu = 50.0, 0.0
    gen = torch.Generator().manual_seed(3)
    sign = torch.rand(N_SAMPLES, generator=gen) < 0.5
    gamma = torch._standard_gamma(torch.full((N_SAMPLES,), 1 / p), generator=gen)
    x = (p * gamma).pow(1 / p)
    samples = torch.relu(mu + rgg.sigma_gn(p) * torch.where(sign, -x, x)).double().numpy()
    with pytest.raises(AssertionError):
        check_against_scipy(samples, p, mu, rgg.sigma_gn(p))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("p,mu", [(1.0, -0.5), (2.0, 0.3), (1.5, -1.0), (50.0, 0.0)])
def test_dense_target_matches_scipy(p, mu, backend):
    n = 8192 if backend == "triton" else N_SAMPLES  # the interpreter is slow
    gen = torch.Generator().manual_seed(int(10 * p))
    dense = lpjepa.sample_rgg(n, p, mu, generator=gen, rectify=False, backend=backend)
    assert bool((dense < 0).any())
    check_against_scipy(dense.double().numpy(), p, mu, rgg.sigma_gn(p), rectify=False)
    # The same draw, rectified, is the ReLU of the dense one.
    rectified = lpjepa.sample_rgg(n, p, mu, generator=torch.Generator().manual_seed(int(10 * p)), backend=backend)
    assert torch.equal(rectified, torch.relu(dense))


@pytest.mark.parametrize("p,mu", [(1.0, -0.5), (2.0, 0.2), (0.7, 0.0)])
def test_sigma_conventions_in_the_sampler(p, mu):
    unit = rgg.sigma_for_unit_rectified_variance(p, mu)
    draws = {
        sigma: lpjepa.sample_rgg(1000, p, mu, sigma=sigma, generator=torch.Generator().manual_seed(9), backend="torch")
        for sigma in (None, "gn", "unit-rectified", unit)
    }
    assert torch.equal(draws[None], draws["gn"]) and torch.equal(draws["unit-rectified"], draws[unit])
    samples = lpjepa.sample_rgg(N_SAMPLES, p, mu, sigma="unit-rectified", dtype=torch.float64,
                                generator=torch.Generator().manual_seed(10), backend="torch").numpy()
    check_against_scipy(samples, p, mu, unit)


@pytest.mark.parametrize("p", [1.0, 2.0, 0.7])
def test_sampler_matches_the_seeds_sampler(p):
    torch.manual_seed(1)
    ours = lpjepa.sample_rgg((200, 100), p, -0.2, backend="torch").flatten().numpy()
    theirs = reference.sample_rgg((200, 100), p, -0.2).flatten().numpy()
    assert scipy.stats.ks_2samp(ours, theirs).pvalue > P_VALUE_FLOOR


def test_sigma_scales_the_samples():
    a = lpjepa.sample_rgg(1000, 2.0, 0.0, sigma=1.0, generator=torch.Generator().manual_seed(3))
    b = lpjepa.sample_rgg(1000, 2.0, 0.0, sigma=3.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(b, 3.0 * a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_dtype_shape_and_nonnegativity(dtype):
    out = lpjepa.sample_rgg((7, 3, 5), p=1.3, mu=0.1, dtype=dtype)
    assert out.shape == (7, 3, 5) and out.dtype == dtype
    assert bool((out >= 0).all()) and bool(torch.isfinite(out).all())
    assert lpjepa.sample_rgg(torch.Size([4, 2])).dtype == torch.get_default_dtype()


@pytest.mark.parametrize("p", [1.0, 2.0, 2.5])
def test_reproducible_and_fresh(p):
    torch.manual_seed(42)
    a = lpjepa.sample_rgg((64, 8), p)
    b = lpjepa.sample_rgg((64, 8), p)
    torch.manual_seed(42)
    assert torch.equal(a, lpjepa.sample_rgg((64, 8), p))
    assert not torch.equal(a, b)
    gen = torch.Generator().manual_seed(7)
    c = lpjepa.sample_rgg((64, 8), p, generator=gen)
    assert torch.equal(c, lpjepa.sample_rgg((64, 8), p, generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(c, lpjepa.sample_rgg((64, 8), p, generator=gen))


def test_laplace_tails_are_finite_and_symmetric():
    samples = lpjepa.sample_rgg(1_000_000, 1.0, 0.0, sigma=1.0, generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(samples).all())
    # Unrectified: with mu large, nothing is clipped, so the mean shows any asymmetry.
    shifted = lpjepa.sample_rgg(1_000_000, 1.0, 40.0, sigma=1.0, generator=torch.Generator().manual_seed(1))
    assert abs(shifted.double().mean().item() - 40.0) < 5 * math.sqrt(2.0 / 1_000_000)
