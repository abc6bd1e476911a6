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


@pytest.mark.parametrize("p", [0.5, 1.0, 1.5, 2.0, 3.0])
@pytest.mark.parametrize("mu", [-0.8, 0.0, 0.6])
def test_sampler_matches_scipy(p, mu):
    gen = torch.Generator().manual_seed(int(1000 * p + 100 * mu) % 2**31)
    samples = lpjepa.sample_rgg(N_SAMPLES, p, mu, generator=gen, dtype=torch.float64, backend="torch").numpy()
    sigma = rgg.sigma_gn(p)
    threshold = -mu / sigma  # a sample is active exactly when X > threshold
    law = gn_law(p)

    # The mass at zero against the closed form, within 5 binomial standard deviations.
    q = rgg.zero_fraction(p, mu)
    assert abs(q - law.cdf(threshold)) < 1e-12
    observed = np.mean(samples == 0)
    assert abs(observed - q) < 5 * math.sqrt(q * (1 - q) / N_SAMPLES)

    # The continuous part: active samples follow the law of mu + sigma X given X > threshold.
    active = samples[samples > 0]
    tail = law.sf(threshold)

    def conditional_cdf(y):
        return (law.cdf((y - mu) / sigma) - law.cdf(threshold)) / tail

    assert scipy.stats.kstest(active, conditional_cdf).pvalue > P_VALUE_FLOOR


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
