"""Sampling the Rectified Generalized Gaussian prior with the Triton kernel (``lpjepa.kernels.rgg_sample``).

``lpjepa::triton_rgg_sample`` is an opaque ``custom_op`` tagged ``nondeterministic_seeded``
(never deduplicated or dropped) and ``cudagraph_unsafe``: it reads its Philox seed and
offset from the device's default generator on the host at each call, which a traced or
CUDA-graph-captured body could not. A call with an explicit ``generator`` runs outside
the op (``torch.compile`` breaks the graph there). Loaded only when a call resolves to
Triton (``lpjepa.ops.backend``).
"""
import math
from typing import List

import torch

from ..kernels import rgg_sample as kernels
from ..kernels.launch import KERNEL_DTYPES


@torch.library.custom_op(
    "lpjepa::triton_rgg_sample",
    mutates_args=(),
    tags=(torch.Tag.nondeterministic_seeded, torch.Tag.cudagraph_unsafe),
)
def _rgg_sample_op(
    shape: List[int], p: float, mu: float, sigma: float, dtype: torch.dtype, device: torch.device, rectify: bool
) -> torch.Tensor:
    return kernels.rgg_sample(shape, p=p, mu=mu, sigma=sigma, dtype=dtype, device=device, rectify=rectify)


@_rgg_sample_op.register_fake
def _(shape, p, mu, sigma, dtype, device, rectify):
    return torch.empty(shape, dtype=dtype, device=device)


def sample(shape, *, p, mu, sigma, dtype, device, generator=None, rectify=True):
    """RGG samples (dense ones when not ``rectify``) from the Triton kernel, seeded from ``generator`` or the device's default one.

    fp64 is drawn in fp32 (the kernel's precision) and cast.
    """
    kernel_dtype = dtype if dtype in KERNEL_DTYPES else torch.float32
    if generator is None:
        out = _rgg_sample_op(
            list(shape), float(p), float(mu), float(sigma), kernel_dtype, torch.device(device), bool(rectify)
        )
    else:
        increment = kernels.rgg_philox_increment(math.prod(shape))
        seed, offset = kernels.philox_seed_offset(increment, device, generator)
        out = kernels.rgg_sample(
            shape, p=p, mu=mu, sigma=sigma, dtype=kernel_dtype, device=device, seed=seed, offset=offset,
            rectify=rectify,
        )
    return out.to(dtype)
