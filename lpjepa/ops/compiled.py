"""The sliced-Wasserstein op as ``torch.compile`` traces it: its bodies as registered ``torch.library`` ops.

Eager calls never come here (``lpjepa.ops.sliced_wasserstein`` runs its Function). Dynamo
cannot trace numpy's sort (the torch body on the CPU) or a kernel launch, so a traced call
runs the same three steps as ops with the same backward: ``lpjepa::sort_residual`` (the
torch body's sort), and ``lpjepa::triton_project`` / ``lpjepa::triton_sort_residual`` (the
Triton body). Where Inductor can trace into the kernels (a GPU, torch >= 2.6) the Triton
ones are ``triton_op``s launching through ``wrap_triton``, so Inductor sees and schedules the
kernels themselves; under Triton's interpreter, whose functions cannot run on fake tensors,
they are opaque ``custom_op``s whose fake is the launch plan with nothing launched.

Imported by an import statement inside the traced call (``lpjepa.loss``), which Dynamo
runs rather than traces, so these ops register (and Triton loads) only when something is
compiled.
"""
from typing import Tuple

import torch

from . import backend as backends

try:  # loaded here, natively: Dynamo cannot import a submodule while it traces the first Triton call
    from ..kernels import rgg_sample as _rgg_kernels, sliced_wasserstein as _swd_kernels  # noqa: F401
except ImportError:  # no Triton: the torch body's op still registers
    pass
from .sliced_wasserstein import (
    TORCH, TRACES_INTO_KERNELS, TRITON, compute_dtype, needs_target_residual, project_backward, torch_sort_residual,
    triton_operand_dtype, triton_project, triton_sort_residual, _triton_backward_operand_dtype,
)


def _launch_traced(launch):
    """One KernelLaunch through ``wrap_triton``: a triton_kernel_wrapper node that Inductor schedules."""
    torch.library.wrap_triton(launch.kernel)[launch.grid](*launch.args, **launch.meta)


_LAUNCH = _launch_traced if TRACES_INTO_KERNELS else None


def _sort_residual_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])


def _sort_residual_backward(ctx, grad_loss, _grad_residual, _grad_residual_t):
    """The op's formula: d loss / d proj = 2 / numel * residual, times grad_loss.

    The residual here is unscaled (the ops return the bodies' residual as is): with the
    kernels' scaled store, Inductor's graph gave wrong gradients once the loss had a second
    term (tests/test_compile.py), so the traced route keeps the scale in its backward.
    """
    residual, residual_t = ctx.saved_tensors
    grad_loss = grad_loss.to(residual.dtype) * (2.0 / residual.numel())
    grad_t = residual_t * grad_loss if ctx.needs_input_grad[1] and residual_t.numel() else None
    return residual * grad_loss, grad_t, None


def _with_empty(outputs, like):
    loss, residual, residual_t = outputs
    return loss, residual, like.new_empty(0) if residual_t is None else residual_t


@torch.library.custom_op("lpjepa::sort_residual", mutates_args=())
def torch_sort_residual_op(
    proj: torch.Tensor, proj_t: torch.Tensor, need_target_residual: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch body's sort and residual: (loss, residual, residual_target or empty)."""
    return _with_empty(torch_sort_residual(proj, proj_t, need_target_residual), proj)


@torch_sort_residual_op.register_fake
def _(proj, proj_t, need_target_residual):
    return proj.new_empty(()), proj.new_empty(proj.shape), proj.new_empty(proj_t.shape if need_target_residual else (0,))


torch_sort_residual_op.register_autograd(_sort_residual_backward, setup_context=_sort_residual_setup)


def _project_body(x: torch.Tensor, directions: torch.Tensor, allow_tf32: bool) -> torch.Tensor:
    return triton_project(x, directions, allow_tf32, _LAUNCH)


def _project_fake(x, directions, allow_tf32):
    return x.new_empty((x.shape[0], directions.shape[-2], x.shape[1]), dtype=torch.float32)


def _project_setup(ctx, inputs, output):
    x, directions, _ = inputs
    ctx.save_for_backward(x, directions)


def _project_op_backward(ctx, grad):
    x, directions = ctx.saved_tensors
    operand = _triton_backward_operand_dtype(x.dtype, x.device)
    grad_x, grad_directions = project_backward(grad, x, directions, operand, ctx.needs_input_grad[0],
                                               ctx.needs_input_grad[1])
    return (None if grad_x is None else grad_x.to(x.dtype),
            None if grad_directions is None else grad_directions.to(directions.dtype), None)


def _sort_body(
    proj: torch.Tensor, proj_t: torch.Tensor, need_target_residual: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _with_empty(triton_sort_residual(proj, proj_t, need_target_residual, _LAUNCH), proj)


def _sort_fake(proj, proj_t, need_target_residual):
    kernels = backends.kernels("sliced_wasserstein")
    path = kernels.default_paths(proj.shape[2], need_target_residual)[1]
    outputs, _ = kernels.sort_residual_plan(proj, proj_t, need_target_residual=need_target_residual, path=path)
    return _with_empty(outputs, proj)


def _register(name, body, fake):
    if TRACES_INTO_KERNELS:
        return torch.library.triton_op(f"lpjepa::{name}", body, mutates_args=())
    op = torch.library.custom_op(f"lpjepa::{name}", body, mutates_args=())
    op.register_fake(fake)
    return op


triton_project_op = _register("triton_project", _project_body, _project_fake)
triton_project_op.register_autograd(_project_op_backward, setup_context=_project_setup)
triton_sort_residual_op = _register("triton_sort_residual", _sort_body, _sort_fake)
triton_sort_residual_op.register_autograd(_sort_residual_backward, setup_context=_sort_residual_setup)


def traced(views, target, directions, backend):
    """``lpjepa.ops.sliced_wasserstein.sliced_wasserstein`` of one process while torch.compile traces.

    The backend is chosen as for an eager call (``lpjepa.ops.backend.run_op``); each body
    runs as ops (``sliced_wasserstein``).
    """
    need_t = needs_target_residual(target, directions)
    return backends.run_op("sliced_wasserstein", backend, views[0].device, compute_dtype(*views, target, directions),
                           lambda: sliced_wasserstein(TRITON, views, target, directions, need_t),
                           lambda: sliced_wasserstein(TORCH, views, target, directions, need_t))


def sliced_wasserstein(body, views, target, directions, need_target_residual):
    """The loss of one process on ``body`` (``TORCH`` or ``TRITON``), as ops: project, sort and residual, loss."""
    first = views[0]
    compute = compute_dtype(*views, target, directions)
    targets = target if target.dim() == 3 else target[None]
    if directions.dim() == 3 and targets.shape[0] == 1:
        targets = targets.expand(directions.shape[0], -1, -1)
    with torch.autocast(first.device.type, enabled=False):
        if not body.triton:
            x = torch.stack([view.to(compute) for view in views])
            P = directions.to(compute)
            proj = torch.matmul(P, x.transpose(1, 2))
            proj_t = torch.matmul(P, targets.to(compute).transpose(1, 2))
            return torch_sort_residual_op(proj, proj_t, need_target_residual)[0]
        operand = triton_operand_dtype(first)
        allow_tf32 = torch.backends.cuda.matmul.allow_tf32
        P = directions.to(operand)
        proj = triton_project_op(torch.stack([view.to(operand) for view in views]), P, allow_tf32)
        proj_t = triton_project_op(targets.to(operand), P, allow_tf32)
        return triton_sort_residual_op(proj.contiguous(), proj_t.contiguous(), need_target_residual)[0]
