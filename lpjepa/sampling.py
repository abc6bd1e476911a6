"""``sample_rgg``: the Rectified Generalized Gaussian prior (or its dense parent), drawn on the target device."""
import torch

from . import _checks
from .ops import rgg_sample
from .ops.backend import check_backend, run_op
from .rgg import resolve_sigma


def sample_rgg(
    shape, p=1.0, mu=0.0, device="cpu", *, sigma=None, dtype=None, generator=None, backend="auto", rectify=True
):
    """Samples ReLU(mu + sigma * X), X ~ GN_p(0, 1): a drop-in for the seed's ``sample_rgg``.

    shape: int or sequence of ints. p > 0 is the shape (1 Laplace, 2 Gaussian); mu the
    mean shift (lower mu, more zeros; ``lpjepa.rgg.expected_zero_fraction`` gives the
    expected fraction). sigma: None or 'gn' (``sigma_gn(p)``, the seed's unit variance
    before rectification), 'unit-rectified' (unit variance after it,
    ``lpjepa.rgg.sigma_for_unit_rectified_variance(p, mu)``) or a number > 0.
    ``rectify=False`` draws the dense mu + sigma * X instead (the official code's
    ``lp_distribution``, the LpJEPA baseline; p = 2 is the isotropic Gaussian of LeJEPA).
    Everything is drawn on ``device`` (the seed draws its Gamma variates on the CPU and
    copies them each step) from ``generator`` or torch's default one, so
    ``torch.manual_seed`` makes runs reproducible; the rectified draw is the ReLU of the
    dense one from the same generator state. Returns a tensor of ``shape`` in ``dtype``
    (default: torch's default dtype, float32).

    backend: 'auto' (Triton kernel on CUDA, torch elsewhere), 'torch' or 'triton'.
    """
    shape = _checks.check_shape(shape)
    p = _checks.check_p(p)
    mu = _checks.check_finite("mu", mu)
    sigma = resolve_sigma(sigma, p, mu)
    check_backend(backend)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.float32; got dtype={dtype!r}")
    _checks.check_generator(generator, device)
    return draw(shape, p=p, mu=mu, sigma=sigma, dtype=dtype, device=device, generator=generator, backend=backend,
                rectify=bool(rectify))


def draw(shape, *, p, mu, sigma, dtype, device, generator, backend, rectify):
    """``sample_rgg`` on arguments already checked and resolved (``RDMReg`` checks its own once, at construction)."""
    return run_op(
        "rgg_sample", backend, device, None,
        lambda: rgg_sample.triton_sample(shape, p=p, mu=mu, sigma=sigma, dtype=dtype, device=device,
                                         generator=generator, rectify=rectify),
        lambda: rgg_sample.sample(shape, p=p, mu=mu, sigma=sigma, dtype=dtype, device=device, generator=generator,
                                  rectify=rectify))
