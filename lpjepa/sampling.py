"""Sampling the Rectified Generalized Gaussian prior on the target device."""
import torch

from . import _checks
from ._dispatch import triton_ops
from .rgg import sigma_gn


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


def sample_rgg(shape, p=1.0, mu=0.0, device="cpu", *, sigma=None, dtype=None, generator=None, backend="auto"):
    """Samples ReLU(mu + sigma * X), X ~ GN_p(0, 1): a drop-in for the seed's ``sample_rgg``.

    shape: int or sequence of ints. p > 0 is the shape (1 Laplace, 2 Gaussian); mu the
    mean shift (lower mu, more zeros; ``lpjepa.rgg.zero_fraction`` gives the expected
    fraction); sigma defaults to ``sigma_gn(p)``, the seed's unit variance before
    rectification. Everything is drawn on ``device`` (the seed draws its Gamma variates
    on the CPU and copies them each step) from ``generator`` or torch's default one, so
    ``torch.manual_seed`` makes runs reproducible. Returns a tensor of ``shape`` in
    ``dtype`` (default: torch's default dtype, float32).

    backend: 'auto' (Triton kernel on CUDA, torch elsewhere), 'torch' or 'triton'.
    """
    shape = _checks.check_shape(shape)
    p = _checks.check_p(p)
    mu = _checks.check_finite("mu", mu)
    sigma = _checks.check_sigma(sigma)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.float32; got dtype={dtype!r}")
    _checks.check_generator(generator, device)
    if sigma is None:
        sigma = sigma_gn(p)

    ops = triton_ops(backend, device)
    if ops is not None:
        return ops.sample_rgg(shape, p=p, mu=mu, sigma=sigma, dtype=dtype, device=device, generator=generator)

    # Half-precision random draws would round the tails; draw in fp32 (fp64 for fp64) and cast once.
    work_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = _generalized_normal(shape, p, device, work_dtype, generator)
    return torch.relu_(x.mul_(sigma).add_(mu)).to(dtype)
