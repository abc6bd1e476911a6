"""Sampling the Rectified Generalized Gaussian prior on the torch backend.

Y = ReLU(mu + sigma * X), X ~ GN_p(0, 1) in the seed's parameterisation (see
``lpjepa.rgg``), drawn on the target device from a torch generator. The Triton
sampler is ``lpjepa.ops.rgg_sample_triton``.
"""
import torch


def _generalized_normal(shape, p, device, dtype, generator):
    """X ~ GN_p(0, 1) in the seed's parameterisation, drawn on ``device`` in ``dtype``.

    p = 1 (Laplace) is a signed exponential and p = 2 is exactly N(0, 1) (the seed's
    (2 G)^(1/2) with G ~ Gamma(1/2) is a chi with one degree of freedom), so neither
    needs a Gamma draw; any other p draws Gamma(1/p) with torch's exact sampler.
    """
    if p == 2.0:
        return torch.randn(shape, device=device, dtype=dtype, generator=generator)
    uniform = torch.rand(shape, device=device, dtype=dtype, generator=generator)
    if p == 1.0:
        # Inverse CDF of the Laplace law. torch.rand returns k / 2^m, k < 2^m (m = 24 in
        # fp32); shifting by half a step makes the grid symmetric about 1/2 and keeps both
        # ends away from log(0). One uniform gives sign and magnitude.
        half_step = 0.5 * torch.finfo(dtype).eps / 2 if dtype == torch.float32 else 2.0**-54
        centred = uniform.add_(half_step - 0.5).mul_(2.0)  # in (-1, 1), symmetric
        magnitude = torch.log1p(-centred.abs()).neg_()
        return magnitude.copysign_(centred)
    concentration = torch.full(shape, 1.0 / p, device=device, dtype=dtype)
    magnitude = torch._standard_gamma(concentration, generator=generator).mul_(p).pow_(1.0 / p)
    return torch.where(uniform < 0.5, -magnitude, magnitude)


def sample(shape, *, p, mu, sigma, dtype, device, generator=None):
    """(shape) samples of ReLU(mu + sigma * X) in ``dtype``; arguments already checked.

    Half-precision random draws would round the tails, so the draw is made in fp32
    (fp64 for fp64) and cast once.
    """
    work_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = _generalized_normal(shape, p, device, work_dtype, generator)
    return torch.relu_(x.mul_(sigma).add_(mu)).to(dtype)
