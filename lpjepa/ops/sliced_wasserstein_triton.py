"""The sliced-Wasserstein loss on the Triton backend: two ``torch.library`` ops over ``lpjepa.kernels``.

* ``lpjepa::triton_project``: (S, B, D) rows onto (K, D) directions -> (S, K, B) fp32
  projections; the tensor-core ``_project_kernel`` or cuBLAS. Backward: two matmuls.
* ``lpjepa::triton_projected_sliced_wasserstein``: (V, K, B) view projections against
  (T, K, B) target projections (T = 1 shared, or V) -> the loss and the residuals; the
  register sort ``_sort_residual_kernel`` or ``torch.sort`` + ``_residual_kernel``.
  Backward: d loss / d proj = 2 / (V K B) * residual (``loss_gradient_scale``).

Each view's loss is the second op on the first op's output (``views_loss``); the
global-batch loss under ``torch.distributed`` gathers the projections between the two.
Which path each op takes is measured on first use (``lpjepa.ops.path_choice``).

Precision: the projection's operands are the features' dtype, as autocast would make
them: fp16 / bf16 features project with fp16 / bf16 directions and target on the tensor
cores, accumulating in fp32; fp32 features as TF32 when torch allows it for matmuls
(``torch.backends.cuda.matmul.allow_tf32``, i.e. ``torch.set_float32_matmul_precision('high')``),
IEEE fp32 otherwise. Sorting, residuals and the loss are fp32; the backward's matmuls take
the forward's operand precision (the fp32 gradient of the projections rounded to the
features' dtype as an operand, as autocast does), accumulating in fp32. fp64 inputs are
computed as fp32 here; ``backend='auto'`` keeps them on the torch backend.

Loaded only when a call resolves to Triton (``lpjepa.ops.backend``): importing it imports
Triton and, on a GPU, registering a ``triton_op`` imports ``torch._dynamo`` (about a
second), which ``import lpjepa`` should not pay.

On a GPU both ops are ``triton_op``: the body calls each kernel through ``wrap_triton``,
so AOTAutograd decomposes it and Inductor sees (and schedules) the kernels themselves.
Under Triton's interpreter (CPU tensors, ``TRITON_INTERPRET=1``) ``wrap_triton`` hands back
the interpreted function, which cannot run on the fake tensors that tracing uses, so
there (and on torch < 2.6, which has no ``triton_op``) the same body is an opaque
``custom_op`` whose fake is the plan with nothing launched.
"""
import os
from typing import Tuple

import torch

from ..kernels import sliced_wasserstein as kernels
from ..kernels.launch import KERNEL_DTYPES, KernelLaunch, device_arch
from .path_choice import CHOOSER, bucket, device_key, may_time
from .sliced_wasserstein import projected_gradients, save_projected_residuals

# True when torch.compile traces into the kernels (GPU); False: the ops are opaque to it.
TRACES_INTO_KERNELS = hasattr(torch.library, "triton_op") and os.environ.get("TRITON_INTERPRET") != "1"


def _launch_wrapped(launch):
    """One KernelLaunch through wrap_triton: launched in eager, a triton_kernel_wrapper node when traced."""
    torch.library.wrap_triton(launch.kernel)[launch.grid](*launch.args, **launch.meta)


# wrap_triton only where torch.compile traces into the kernels (and where it exists).
_launch = _launch_wrapped if TRACES_INTO_KERNELS else KernelLaunch.__call__


def _register(name, body, fake):
    """``body`` as the op lpjepa::name: a triton_op where Inductor can see the kernels, else a custom_op with ``fake``."""
    if TRACES_INTO_KERNELS:
        return torch.library.triton_op(f"lpjepa::{name}", body, mutates_args=())
    op = torch.library.custom_op(f"lpjepa::{name}", body, mutates_args=())
    op.register_fake(fake)
    return op


# --- Projection ---------------------------------------------------------------------------


def projection_path(x, projections, allow_tf32, timing_allowed=None):
    """The projection path for this call (``lpjepa.ops.path_choice``); ``timing_allowed`` None: ``may_time``."""
    sources, batch, dim = x.shape
    key = (f"{device_key(x)}|{x.dtype}|tf32={allow_tf32}|S={sources}|B={bucket(batch)}|D={bucket(dim)}"
           f"|K={bucket(projections.shape[-2])}")

    def run(path):
        for launch in kernels.project_plan(x, projections, path=path, allow_tf32=allow_tf32)[1]:
            launch()

    timing_allowed = may_time(x, projections) if timing_allowed is None else timing_allowed
    default = kernels.default_paths(batch, arch=device_arch(x.device))[0]  # cuBLAS below sm_80
    return CHOOSER.choose("projection", key, list(kernels.PROJECTION_PATHS), default, run, timing_allowed)


def _project_body(x: torch.Tensor, projections: torch.Tensor, allow_tf32: bool) -> torch.Tensor:
    """(S, K, B) fp32 projections of x (S, B, D) onto projections (K, D) or (S, K, D), both in one kernel dtype."""
    path = projection_path(x, projections, allow_tf32)
    out, launches = kernels.project_plan(x, projections, path=path, allow_tf32=allow_tf32)
    for launch in launches:
        _launch(launch)
    return out


def _project_fake(x, projections, allow_tf32):
    return x.new_empty((x.shape[0], projections.shape[-2], x.shape[1]), dtype=torch.float32)


triton_project = _register("triton_project", _project_body, _project_fake)


def _project_setup_context(ctx, inputs, output):
    x, projections, _ = inputs
    ctx.save_for_backward(x, projections)


def _project_backward(ctx, grad):
    """d/dx[s] = grad[s]^T @ P and d/dP = sum over s of grad[s] @ x[s]: torch matmuls with the forward's operand dtype.

    The fp32 gradient of the projections is rounded to the features' dtype as a matmul
    operand, as autocast does for the seed's matmuls, so fp16 / bf16 features take the
    tensor cores here too (fp32 accumulation); fp32 features follow torch's fp32 matmul
    setting. In fp32 on the FMA units this matmul alone would outlast the seed's whole
    step at the official shape (``python -m lpjepa.kernels.compile_report --model``).
    bf16 below sm_80, which has no bf16 arithmetic, multiplies fp32 copies as the forward
    does (``kernels.bf16_as_fp32``) and rounds the gradients to bf16.
    """
    x, projections = ctx.saved_tensors
    grad_x = grad_projections = None
    operand_dtype = torch.float32 if kernels.bf16_as_fp32(x.dtype, device_arch(x.device)) else x.dtype
    with torch.autocast(grad.device.type, enabled=False):
        operand, rows_x, directions = (t.to(operand_dtype) for t in (grad, x, projections))
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(operand.transpose(1, 2), directions).to(x.dtype)
        if ctx.needs_input_grad[1] and projections.dim() == 3:  # a set of directions per source
            grad_projections = torch.bmm(operand, rows_x).to(x.dtype)
        elif ctx.needs_input_grad[1]:
            rows = operand.transpose(0, 1).reshape(grad.shape[1], -1)  # (K, S * B)
            grad_projections = (rows @ rows_x.reshape(-1, x.shape[2])).to(x.dtype)
    return grad_x, grad_projections, None


triton_project.register_autograd(_project_backward, setup_context=_project_setup_context)


# --- Sort and residual -------------------------------------------------------------------


def sort_path(proj, proj_t, need_target_residual, timing_allowed=None):
    """The sort path for this call (``lpjepa.ops.path_choice``); ``timing_allowed`` None: ``may_time``."""
    views, num_projections, batch = proj.shape
    candidates = list(kernels.sort_paths_for(batch, need_target_residual))
    key = (f"{device_key(proj)}|V={views}|T={proj_t.shape[0]}|B={bucket(batch)}|K={bucket(num_projections)}"
           f"|target_residual={need_target_residual}")

    def run(path):
        for launch in kernels.sort_residual_plan(proj, proj_t, need_target_residual=need_target_residual, path=path)[1]:
            launch()

    default = kernels.default_paths(batch, need_target_residual)[1]
    timing_allowed = may_time(proj, proj_t) if timing_allowed is None else timing_allowed
    return CHOOSER.choose("sort", key, candidates, default, run, timing_allowed)


def _planned_sort_outputs(proj, proj_t, need_target_residual, path):
    (loss, residual, residual_t), launches = kernels.sort_residual_plan(
        proj, proj_t, need_target_residual=need_target_residual, path=path
    )
    return (loss, residual, residual.new_empty(0) if residual_t is None else residual_t), launches


def _projected_body(
    proj: torch.Tensor, proj_t: torch.Tensor, need_target_residual: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, residual (V, K, B), residual_target (T, K, B) or empty), all fp32; see the module doc."""
    path = sort_path(proj, proj_t, need_target_residual)
    outputs, launches = _planned_sort_outputs(proj, proj_t, need_target_residual, path)
    for launch in launches:
        _launch(launch)
    return outputs


def _projected_fake(proj, proj_t, need_target_residual):
    path = kernels.default_paths(proj.shape[2], need_target_residual)[1]
    return _planned_sort_outputs(proj, proj_t, need_target_residual, path)[0]


triton_projected_sliced_wasserstein = _register(
    "triton_projected_sliced_wasserstein", _projected_body, _projected_fake
)


triton_projected_sliced_wasserstein.register_autograd(projected_gradients, setup_context=save_projected_residuals)


# --- What the public API calls ----------------------------------------------------------


def operand_dtype(features):
    """The dtype the projection's operands are rounded to: the features' own, fp32 for fp64."""
    return features.dtype if features.dtype in KERNEL_DTYPES else torch.float32


def project(x, projections, dtype=None):
    """(S, K, B) fp32 projections of x (S, B, D) onto (K, D) or (S, K, D) directions.

    Operands are rounded to ``dtype`` (default: x's operand dtype). A single source (S = 1)
    with (V, K, D) directions is projected onto each set (S = V, no copy of x).
    """
    if projections.dim() == 3 and x.shape[0] == 1:
        x = x.expand(projections.shape[0], -1, -1)
    dtype = operand_dtype(x) if dtype is None else dtype
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    return triton_project(x.to(dtype), projections.to(dtype), allow_tf32)


def projected_sliced_wasserstein(proj, proj_t):
    """The 0-dim fp32 loss of view projections (V, K, B) against target projections (T, K, B)."""
    need_target_residual = torch.is_grad_enabled() and proj_t.requires_grad
    return triton_projected_sliced_wasserstein(proj.contiguous(), proj_t.contiguous(), need_target_residual)[0]


def views_loss(views, target, projections):
    """The mean over ``views`` (each (B, D)) of their losses against ``target`` along ``projections``.

    target: (B, D) shared, or (V, B, D) one per view; projections: (K, D) shared, or
    (V, K, D) one set per view. A shared target along shared directions is projected
    once and its projections sorted once per direction for all views; otherwise each
    view's target is projected onto that view's directions (one (V, K, B) launch).
    Projection operands are the first view's dtype (see the module doc).
    """
    dtype = operand_dtype(views[0])
    # Autocast off: torch.stack is one of its promoting ops, and fp16 views under a bf16 autocast
    # (or bf16 under fp16) raise "Unexpected floating ScalarType in at::autocast::prioritize".
    with torch.autocast(views[0].device.type, enabled=False):
        projections = projections.to(dtype)  # once, for both projections below
        stacked = torch.stack([view.to(dtype) for view in views]) if len(views) > 1 else views[0].to(dtype)[None]
        proj = project(stacked, projections, dtype)
        targets = target.to(dtype) if target.dim() == 3 else target.to(dtype)[None]
        proj_t = project(targets, projections, dtype)
        return projected_sliced_wasserstein(proj, proj_t)
