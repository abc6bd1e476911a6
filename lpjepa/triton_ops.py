"""The Triton backend: ``torch.library`` ops over the launchers in ``lpjepa.kernels``.

``lpjepa._dispatch`` loads this module for ``backend='triton'`` (and for CUDA tensors
under ``'auto'``); importing it fails cleanly where Triton is missing. The forward is
the fused projection + sort + residual kernel; the backward is one matmul,
2 / (B K) * residual^T @ projections, the torch backend's own formula
(``lpjepa.loss.residual_gradients``).

Both ops are registered with ``torch.library`` so that ``torch.compile`` traces a model
using them without a graph break:

* ``lpjepa::triton_sliced_wasserstein`` is a ``triton_op`` on a GPU: its body allocates
  the outputs and calls each kernel through ``wrap_triton``, so AOTAutograd decomposes
  it and Inductor sees (and schedules) the kernels themselves. Under Triton's
  interpreter (CPU tensors, ``TRITON_INTERPRET=1``) ``wrap_triton`` hands back the
  interpreted function, which cannot run on the fake tensors that tracing uses, so
  there (and on torch < 2.6, which has no ``triton_op``) the same body is an opaque
  ``custom_op`` whose fake is the launch plan with nothing launched.
* ``lpjepa::triton_rgg_sample`` is an opaque ``custom_op`` tagged
  ``nondeterministic_seeded`` (never deduplicated or dropped) and ``cudagraph_unsafe``:
  it reads its Philox seed and offset from the device's default generator on the host
  at each call, which a traced or CUDA-graph-captured body could not. A call with an
  explicit ``generator`` runs outside the op (``torch.compile`` breaks the graph there).
"""
import math
import os
from typing import List, Tuple

import torch

from .kernels import rgg as _rgg
from .kernels import swd as _swd
from .kernels._launch import KernelLaunch
from .loss import needs_target_residual, residual_gradients, save_residuals

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# True when torch.compile traces into the kernels (GPU); False: the op is opaque to it.
TRACES_INTO_KERNELS = hasattr(torch.library, "triton_op") and os.environ.get("TRITON_INTERPRET") != "1"


def _launch_wrapped(launch):
    """One KernelLaunch through wrap_triton: launched in eager, a triton_kernel_wrapper node when traced."""
    torch.library.wrap_triton(launch.kernel)[launch.grid](*launch.args, **launch.meta)


# wrap_triton only where torch.compile traces into the kernels (and where it exists).
_launch = _launch_wrapped if TRACES_INTO_KERNELS else KernelLaunch.__call__


def _planned_outputs(z, target, projections, need_target_residual):
    """((loss, residual_z, residual_target), launches): the outputs allocated, nothing launched."""
    (loss, residual_z, residual_t), launches = _swd.swd_forward_plan(
        z, target, projections, need_target_residual=need_target_residual
    )
    return (loss, residual_z, residual_z.new_empty(0) if residual_t is None else residual_t), launches


def _sliced_wasserstein_body(
    z: torch.Tensor, target: torch.Tensor, projections: torch.Tensor, need_target_residual: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, residual_z, residual_target) of ``swd_forward``; residual_target is empty unless asked for.

    z, target: (B, D), projections: (K, D), each fp32 / fp16 / bf16. loss: 0-dim fp32;
    residuals: (K, B) fp32, in the batch's original order.
    """
    outputs, launches = _planned_outputs(z, target, projections, need_target_residual)
    for launch in launches:
        _launch(launch)
    return outputs


def _sliced_wasserstein_fake(z, target, projections, need_target_residual):
    return _planned_outputs(z, target, projections, need_target_residual)[0]


if TRACES_INTO_KERNELS:
    triton_sliced_wasserstein = torch.library.triton_op(
        "lpjepa::triton_sliced_wasserstein", _sliced_wasserstein_body, mutates_args=()
    )
else:
    triton_sliced_wasserstein = torch.library.custom_op(
        "lpjepa::triton_sliced_wasserstein", _sliced_wasserstein_body, mutates_args=()
    )
    triton_sliced_wasserstein.register_fake(_sliced_wasserstein_fake)


def _setup_context(ctx, inputs, output):
    save_residuals(ctx, *inputs, *output[1:])


def _backward(ctx, grad_loss, _grad_residual_z, _grad_residual_t):
    return (*residual_gradients(ctx, grad_loss), None)


triton_sliced_wasserstein.register_autograd(_backward, setup_context=_setup_context)


def sliced_wasserstein(z, target, projections):
    """The sliced-Wasserstein loss of one view on the Triton kernels (see lpjepa.loss).

    fp64 inputs are computed in fp32 (the kernels' precision); the loss is 0-dim fp32
    and each gradient comes back in its input's dtype.
    """
    z, target, projections = (t if t.dtype in _KERNEL_DTYPES else t.float() for t in (z, target, projections))
    return triton_sliced_wasserstein(z, target, projections, needs_target_residual(target, projections))[0]


@torch.library.custom_op(
    "lpjepa::triton_rgg_sample",
    mutates_args=(),
    tags=(torch.Tag.nondeterministic_seeded, torch.Tag.cudagraph_unsafe),
)
def _rgg_sample_op(
    shape: List[int], p: float, mu: float, sigma: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    return _rgg.rgg_sample(shape, p=p, mu=mu, sigma=sigma, dtype=dtype, device=device)


@_rgg_sample_op.register_fake
def _(shape, p, mu, sigma, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


def sample_rgg(shape, *, p, mu, sigma, dtype, device, generator=None):
    """RGG samples from the Triton kernel, seeded from ``generator`` or the device's default one."""
    kernel_dtype = dtype if dtype in _KERNEL_DTYPES else torch.float32
    if generator is None:
        out = _rgg_sample_op(list(shape), float(p), float(mu), float(sigma), kernel_dtype, torch.device(device))
    else:
        seed, offset = _rgg.philox_seed_offset(_rgg.rgg_philox_increment(math.prod(shape)), device, generator)
        out = _rgg.rgg_sample(
            shape, p=p, mu=mu, sigma=sigma, dtype=kernel_dtype, device=device, seed=seed, offset=offset
        )
    return out.to(dtype)
