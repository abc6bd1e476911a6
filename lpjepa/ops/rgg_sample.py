"""Sampling the (Rectified) Generalized Gaussian prior: the torch and Triton bodies side by side.

Y = ReLU(mu + sigma * X), or mu + sigma * X for a dense target, X ~ GN_p(0, 1) in the
seed's parameterisation (see ``lpjepa.rgg``), drawn on the target device: by torch ops from
a torch generator (``sample``), or by the Triton kernel of ``lpjepa.kernels.rgg_sample``
from Philox counters (``triton_sample``). ``triton_draw`` is the loss's whole draw on the
Triton backend: the target and the Gaussian directions in one launch of that kernel.
Nothing is differentiated.
"""
import math
from typing import List, Tuple

import torch

from ..kernels.launch import KERNEL_DTYPES  # torch only: no Triton import
from . import backend as backends


# Half the step of torch.rand's grid k / 2^m (m = 24 in fp32, 53 in fp64).
_HALF_STEP = {torch.float32: 2.0**-25, torch.float64: 2.0**-54}


def _open_uniform(shape, device, dtype, generator):
    """Uniforms in (0, 1]: torch.rand's grid k / 2^m shifted by half a step, so log() is always finite."""
    return torch.rand(shape, device=device, dtype=dtype, generator=generator).add_(_HALF_STEP[dtype])


def _log_gamma(count, shape_a, device, dtype, generator):
    """(count,) values of log G, G ~ Gamma(shape_a, 1), exact for every shape_a > 0.

    Marsaglia-Tsang rejection, kept in logs: log G = log d + log v. A shape below 1 draws
    at shape_a + 1 and boosts, log G = log G' + log(U) / shape_a. ``torch._standard_gamma``
    returns G itself and clamps it at the smallest normal float, which for shape 1/p with
    large p puts a false point mass where most of the true law lies (1/p = 0.01: the
    typical G is e^-100, below fp32's 1e-38). Each round accepts with probability >= 0.95;
    the rejected entries are drawn again until none is left.
    """
    boost = shape_a < 1.0
    d = (shape_a + 1.0 if boost else shape_a) - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    log_g = torch.empty(count, device=device, dtype=dtype)
    pending = torch.arange(count, device=device)
    while pending.numel():
        normal = torch.randn(pending.numel(), device=device, dtype=dtype, generator=generator)
        log_u = _open_uniform(pending.numel(), device, dtype, generator).log_()
        v = (1.0 + c * normal) ** 3
        log_v = torch.where(v > 0, v, torch.ones_like(v)).log_()
        accepted = (v > 0) & (log_u < 0.5 * normal * normal + d - d * v + d * log_v)
        log_g[pending[accepted]] = math.log(d) + log_v[accepted]
        pending = pending[~accepted]
    if boost:
        log_g += _open_uniform(count, device, dtype, generator).log_() / shape_a
    return log_g


@torch.library.custom_op(
    "lpjepa::log_gamma",
    mutates_args=(),
    tags=(torch.Tag.nondeterministic_seeded, torch.Tag.cudagraph_unsafe),
)
def _log_gamma_op(count: int, shape_a: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``_log_gamma`` from the default generator, as one opaque op.

    torch.compile cannot trace the rejection loop (its sizes depend on the draws), so a
    compiled graph calls this op instead; it is tagged as random so that it is never
    merged or dropped, and it syncs the host once per round, which a CUDA graph cannot
    capture. A call with its own generator runs ``_log_gamma`` outside the op.
    """
    return _log_gamma(count, shape_a, device, dtype, None)


@_log_gamma_op.register_fake
def _(count, shape_a, device, dtype):
    return torch.empty(count, device=device, dtype=dtype)


def _generalized_normal(shape, p, device, dtype, generator):
    """X ~ GN_p(0, 1) in the seed's parameterisation, drawn on ``device`` in ``dtype``.

    p = 1 (Laplace) is a signed exponential and p = 2 is exactly N(0, 1) (the seed's
    (2 G)^(1/2) with G ~ Gamma(1/2) is a chi with one degree of freedom), so neither
    needs a Gamma draw. Any other p draws log G, G ~ Gamma(1/p), and takes
    |X| = (p G)^(1/p) = exp((log p + log G) / p) in logs, so that neither a tiny G
    (large p) nor a huge power (small p) leaves the floats before the result does.
    """
    if p == 2.0:
        return torch.randn(shape, device=device, dtype=dtype, generator=generator)
    uniform = torch.rand(shape, device=device, dtype=dtype, generator=generator)
    if p == 1.0:
        # Inverse CDF of the Laplace law. torch.rand returns k / 2^m, k < 2^m (m = 24 in
        # fp32); shifting by half a step makes the grid symmetric about 1/2 and keeps both
        # ends away from log(0). One uniform gives sign and magnitude.
        centred = uniform.add_(_HALF_STEP[dtype] - 0.5).mul_(2.0)  # in (-1, 1), symmetric
        magnitude = torch.log1p(-centred.abs()).neg_()
        return magnitude.copysign_(centred)
    count = math.prod(shape)
    if generator is None:
        log_g = _log_gamma_op(count, 1.0 / p, torch.device(device), dtype)
    else:
        log_g = _log_gamma(count, 1.0 / p, device, dtype, generator)
    log_g = log_g.reshape(shape)
    magnitude = log_g.add_(math.log(p)).div_(p).exp_()
    return torch.where(uniform < 0.5, -magnitude, magnitude)


def sample(shape, *, p, mu, sigma, dtype, device, generator=None, rectify=True):
    """(shape) samples of ReLU(mu + sigma * X) (or mu + sigma * X when not ``rectify``) in ``dtype``.

    Arguments already checked. Half-precision random draws would round the tails, so the
    draw is made in fp32 (fp64 for fp64) and cast once.
    """
    work_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = _generalized_normal(shape, p, device, work_dtype, generator).mul_(sigma).add_(mu)
    return (torch.relu_(x) if rectify else x).to(dtype)


# --- The Triton body ---------------------------------------------------------------------------


def _triton_sample_op_body(
    shape: List[int], p: float, mu: float, sigma: float, dtype: torch.dtype, device: torch.device, rectify: bool
) -> torch.Tensor:
    return backends.kernels("rgg_sample").rgg_sample(shape, p=p, mu=mu, sigma=sigma, dtype=dtype, device=device,
                                                     rectify=rectify)


# Traced calls only: it reads its Philox seed and offset from the device's default generator
# on the host at each call, which a traced or CUDA-graph-captured body could not, so it is
# opaque, never deduplicated or dropped (nondeterministic_seeded) and kept out of CUDA graphs.
_triton_sample_op = torch.library.custom_op(
    "lpjepa::triton_rgg_sample", _triton_sample_op_body, mutates_args=(),
    tags=(torch.Tag.nondeterministic_seeded, torch.Tag.cudagraph_unsafe),
)


@_triton_sample_op.register_fake
def _(shape, p, mu, sigma, dtype, device, rectify):
    return torch.empty(shape, dtype=dtype, device=device)


def triton_sample(shape, *, p, mu, sigma, dtype, device, generator=None, rectify=True):
    """``sample`` by the Triton kernel, seeded from ``generator`` or the device's default one.

    fp64 is drawn in fp32 (the kernel's precision) and cast. Eager calls launch the kernel
    directly; while ``torch.compile`` traces, the call is the opaque op above (a call with
    its own generator breaks the graph there).
    """
    kernels = backends.kernels("rgg_sample")
    kernel_dtype = dtype if dtype in KERNEL_DTYPES else torch.float32
    if generator is None:
        if torch.compiler.is_compiling():
            out = _triton_sample_op(list(shape), float(p), float(mu), float(sigma), kernel_dtype,
                                    torch.device(device), bool(rectify))
        else:
            out = kernels.rgg_sample(shape, p=p, mu=mu, sigma=sigma, dtype=kernel_dtype, device=device,
                                     rectify=rectify)
    else:
        increment = kernels.rgg_philox_increment(math.prod(shape))
        seed, offset = kernels.philox_seed_offset(increment, device, generator)
        out = kernels.rgg_sample(shape, p=p, mu=mu, sigma=sigma, dtype=kernel_dtype, device=device, seed=seed,
                                 offset=offset, rectify=rectify)
    return out if out.dtype == dtype else out.to(dtype)


def triton_draw(target_shape, num_directions, dim, *, p, mu, sigma, dtype, directions_dtype, device, generator=None,
                rectify=True):
    """(target, directions) of one loss step, drawn by one launch of the Triton sampler.

    target: ``target_shape`` (e.g. (B, D), or (V, B, D) one per view: i.i.d. elements either
    way) in ``dtype``, the law of ``triton_sample``'s. directions: (num_directions, dim)
    unit rows in ``directions_dtype``, D standard normals divided by their fp32 norm, so
    uniform on the sphere: the seed's law, from the sampler's Philox stream (not the numbers
    of torch.randn). Both dtypes are the kernel's (fp32, fp16 or bf16; computed in fp32,
    rounded on store). One generator advance covers both (``generator`` or the device's
    default one; the same generator state gives the same pair). While ``torch.compile``
    traces, a call from the default generator is the opaque op below, which draws the same
    numbers (a call with its own generator breaks the graph there, as ``triton_sample``'s).
    """
    if generator is None and torch.compiler.is_compiling():
        return _triton_draw_op(list(target_shape), int(num_directions), int(dim), float(p), float(mu), float(sigma),
                               dtype, directions_dtype, torch.device(device), bool(rectify))
    return _triton_draw_body(target_shape, num_directions, dim, p, mu, sigma, dtype, directions_dtype, device,
                             rectify, generator)


def _triton_draw_body(target_shape, num_directions, dim, p, mu, sigma, dtype, directions_dtype, device, rectify,
                      generator=None):
    kernels = backends.kernels("rgg_sample")
    # size= as a keyword: a positional shape costs torch's argument parser 0.4 us more a call (measured).
    target = torch.empty(size=target_shape, dtype=dtype, device=device)
    directions = torch.empty(size=(num_directions, dim), dtype=directions_dtype, device=device)
    seed, offset = kernels.philox_seed_offset(
        kernels.rgg_philox_increment(target.numel(), directions.numel()), device, generator)
    kernels.rgg_launch(target, p=p, mu=mu, sigma=sigma, seed=seed, offset=offset, rectify=rectify,
                       directions=directions, check=False)()
    return target, directions


def _triton_draw_op_body(
    target_shape: List[int], num_directions: int, dim: int, p: float, mu: float, sigma: float, dtype: torch.dtype,
    directions_dtype: torch.dtype, device: torch.device, rectify: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _triton_draw_body(target_shape, num_directions, dim, p, mu, sigma, dtype, directions_dtype, device, rectify)


# Traced calls only, as ``_triton_sample_op``: the seed and offset are read from the default
# generator on the host at each call, so the op is opaque, random and kept out of CUDA graphs.
_triton_draw_op = torch.library.custom_op(
    "lpjepa::triton_rgg_draw", _triton_draw_op_body, mutates_args=(),
    tags=(torch.Tag.nondeterministic_seeded, torch.Tag.cudagraph_unsafe),
)


@_triton_draw_op.register_fake
def _(target_shape, num_directions, dim, p, mu, sigma, dtype, directions_dtype, device, rectify):
    return (torch.empty(target_shape, dtype=dtype, device=device),
            torch.empty((num_directions, dim), dtype=directions_dtype, device=device))
