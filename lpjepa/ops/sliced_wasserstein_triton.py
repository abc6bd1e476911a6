"""The sliced-Wasserstein op on the Triton backend, over the launchers in ``lpjepa.kernels``.

The forward is the fused projection + sort + residual kernel
(``lpjepa.kernels.sliced_wasserstein``); the backward is the torch backend's own
formula (``save_residuals`` / ``residual_gradients`` in ``lpjepa.ops.sliced_wasserstein``),
one matmul per input.

Loaded only when a call resolves to Triton (``lpjepa.ops.backend``): importing it imports
Triton and, on a GPU, registering a ``triton_op`` imports ``torch._dynamo`` (about a
second), which ``import lpjepa`` should not pay.

``lpjepa::triton_sliced_wasserstein`` is a ``triton_op`` on a GPU: its body allocates the
outputs and calls each kernel through ``wrap_triton``, so AOTAutograd decomposes it and
Inductor sees (and schedules) the kernels themselves. Under Triton's interpreter (CPU
tensors, ``TRITON_INTERPRET=1``) ``wrap_triton`` hands back the interpreted function,
which cannot run on the fake tensors that tracing uses, so there (and on torch < 2.6,
which has no ``triton_op``) the same body is an opaque ``custom_op`` whose fake is the
launch plan with nothing launched.
"""
import os
from typing import Tuple

import torch

from ..kernels import sliced_wasserstein as kernels
from ..kernels.launch import KERNEL_DTYPES, KernelLaunch
from .sliced_wasserstein import needs_target_residual, residual_gradients, save_residuals

# True when torch.compile traces into the kernels (GPU); False: the op is opaque to it.
TRACES_INTO_KERNELS = hasattr(torch.library, "triton_op") and os.environ.get("TRITON_INTERPRET") != "1"


def _launch_wrapped(launch):
    """One KernelLaunch through wrap_triton: launched in eager, a triton_kernel_wrapper node when traced."""
    torch.library.wrap_triton(launch.kernel)[launch.grid](*launch.args, **launch.meta)


# wrap_triton only where torch.compile traces into the kernels (and where it exists).
_launch = _launch_wrapped if TRACES_INTO_KERNELS else KernelLaunch.__call__


def _planned_outputs(z, target, projections, need_target_residual):
    """((loss, residual_z, residual_target), launches): the outputs allocated, nothing launched."""
    (loss, residual_z, residual_t), launches = kernels.swd_forward_plan(
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
    """The sliced-Wasserstein loss of one view on the Triton kernels.

    fp64 inputs are computed in fp32 (the kernels' precision); the loss is 0-dim fp32
    and each gradient comes back in its input's dtype.
    """
    z, target, projections = (t if t.dtype in KERNEL_DTYPES else t.float() for t in (z, target, projections))
    return triton_sliced_wasserstein(z, target, projections, needs_target_residual(target, projections))[0]
