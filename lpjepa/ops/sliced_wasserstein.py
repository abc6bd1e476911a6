"""The sliced-Wasserstein op: one autograd Function, its torch and Triton bodies side by side.

For V views (each (b, D)), a target (B, D) shared by the views or (V, B, D) one per view,
and unit directions (K, D) shared or (V, K, D) one set per view, the loss is the mean over
views of the seed's ``rdmreg_loss``: the mean over directions and batch of the squared
difference between the sorted projections of a view and of its target. Every route, on
either backend, on one process or over a ``torch.distributed`` group, computes it in three
steps:

1. **project**: (S, B, D) rows onto the directions -> (S, K, B) projected values,
   direction-major so that each sort reads one contiguous row;
2. **sort and residual**: each direction's projected views against its sorted target,
   giving the loss and the *residual*, each projected feature minus the target quantile
   of its rank, in the batch's original order::

       residual[v, k, b] = proj[v, k, b] - sorted(proj_t[v or 0, k])[rank of b in proj[v, k]]

3. **loss**: the mean of the squared residual.

Under a process group the views' rows (or their projections, whichever moves fewer
bytes) are all-gathered between steps 1 and 2, so the sort runs over the global batch.

One autograd formula for all of them, with no graph through the sort: d loss / d proj =
2 / numel * residual, and the projection's backward is one matmul, d loss / d z =
residual^T @ P times that scale (likewise the target's residual for its gradient, and both
for the directions'). Under a group each rank keeps the residual of its own rows.

The two bodies:

* **torch** (every device; the CPU path): the matmul and the sort in the compute dtype,
  fp32 (fp64 for fp64 inputs), numpy's sort on the CPU (``sort_rows``).
* **Triton** (CUDA; the kernels of ``lpjepa.kernels.sliced_wasserstein``): the projection's
  operands in the features' dtype (fp16 / bf16 on the tensor cores, fp32 as TF32 when torch
  allows it), fp32 accumulation, sort and loss; each step's path ('triton' or 'cublas'
  projection, 'registers' or 'torch_sort' sort) from ``lpjepa.ops.path_choice``. The
  backward writes the views' gradient in one kernel (``project_backward_plan``: the
  residual's rounding, the matmul, the loss's gradient and the views' dtype); the
  directions' and the target's take the formula's torch matmuls. The kernels load at the
  first Triton call (``lpjepa.ops.backend``), never at import.

Eager calls run the Function, which calls each body directly and pays for nothing else.
``torch.compile`` cannot trace numpy's sort or a kernel launch, so while it traces, the API
(``lpjepa.loss``) runs the same bodies as registered ``torch.library`` ops with the same
backward instead (``lpjepa.ops.compiled``, which imports this module, never the other way
round; on a GPU the Triton ones are ``triton_op``s, so that Inductor sees the kernels themselves).
"""
import os
from typing import NamedTuple

import numpy as np
import torch

from ..kernels import launch as kernel_launch  # torch only: no Triton import
from ..kernels.launch import KERNEL_DTYPES
from . import backend as backends
from . import path_choice


def compute_dtype(*tensors):
    """float64 if any input is float64, else float32: the precision the torch body computes in."""
    for tensor in tensors:
        if tensor is not None and tensor.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _as(tensor, dtype):
    """``tensor.to(dtype)`` without the dispatcher's cost when it already is (every step's usual case)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


# --- The torch body --------------------------------------------------------------------------


def sort_rows(x):
    """Each row of a (R, B) float matrix sorted ascending (a new tensor).

    On the CPU numpy's vectorised sort runs 10-30x faster than torch.sort (measured by
    benchmarks/), so CPU tensors go through it without a copy; NaN sorts last in both, so
    a NaN input still gives a NaN loss.
    """
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.detach().numpy(), axis=1))
    return torch.sort(x, dim=1).values


def argsort_rows(x):
    """(R, B) int64 indices that sort each row of a (R, B) float matrix ascending."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.argsort(x.detach().numpy(), axis=1))
    return torch.sort(x, dim=1).indices


def _sorted_with_order(proj_t, need_order, in_place=False):
    """(each row of proj_t (K, B) sorted, the order that sorts it or None); ``in_place`` sorts proj_t itself."""
    if not need_order:
        if in_place and proj_t.device.type == "cpu" and proj_t.is_contiguous():
            proj_t.detach().numpy().sort(axis=1)
            return proj_t, None
        return sort_rows(proj_t), None
    order = argsort_rows(proj_t)
    return torch.gather(proj_t, 1, order), order


def torch_project(sources, directions, dtype):
    """(S, K, B) projections in ``dtype`` of ``sources`` (a list of (n, B, D), S rows of them in all).

    directions: (K, D) shared, or (S, K, D) one set per source row. Each source is
    multiplied where it lies (no stacked copy of the views).
    """
    directions = directions.to(dtype)
    rows = sum(source.shape[0] for source in sources)
    batch = sources[0].shape[1]
    out = torch.empty((rows, directions.shape[-2], batch), dtype=dtype, device=directions.device)
    row = 0
    for source in sources:
        for rows in source:  # mm writes into out's own rows; a batched matmul with out= goes through a copy
            torch.mm(directions if directions.dim() == 2 else directions[row], _as(rows, dtype).T, out=out[row])
            row += 1
    return out


def torch_sort_residual(proj, proj_t, need_target_residual, residual_scale=1.0, in_place=False):
    """(loss, residual (V, K, B), residual_target (T, K, B) or None) of view projections against target projections.

    proj (V, K, B) and proj_t (T, K, B) in one dtype (T = 1: one target shared by the
    views, sorted once per direction; T = V: one per view). residual_target, only when
    ``need_target_residual``, is the targets' residual with the sign of their gradient
    (summed over the views for a shared target). The loss is the mean of the squared
    residual, a 0-dim tensor in proj's dtype; both residuals are returned times
    ``residual_scale`` (the Function passes 2 / numel: the loss's gradient in proj).
    ``in_place``: the residual is written over proj, and the target's projections are sorted
    where they lie (a caller that owns both saves their buffers: at the official shape 8 MB
    a view and 8 MB for the target).
    """
    proj_t = _as(proj_t, proj.dtype)
    shared = proj_t.shape[0] == 1
    residual = proj if in_place else torch.empty_like(proj)
    quantiles = torch.empty_like(proj[0]) if in_place else None
    residual_t = torch.zeros_like(proj_t) if need_target_residual else None
    if shared:
        t_sorted, t_order = _sorted_with_order(proj_t[0], need_target_residual, in_place)
    for v in range(proj.shape[0]):
        if not shared:
            t_sorted, t_order = _sorted_with_order(proj_t[v], need_target_residual, in_place)
        # Each quantile goes to the row holding its rank: the residual comes out in the
        # batch's order without sorting proj's values, in residual[v]'s own buffer.
        order = argsort_rows(proj[v])
        placed = quantiles if in_place else residual[v]
        placed.scatter_(1, order, t_sorted)
        torch.sub(proj[v], placed, out=residual[v])
        if need_target_residual:
            # Each row's order is a permutation, so the sum over views is deterministic.
            residual_t[0 if shared else v].scatter_add_(1, t_order, -torch.gather(residual[v], 1, order))
        del order  # before the next view's: two (K, B) int64 orders at once would be the peak
    flat = residual.reshape(-1)
    loss = torch.dot(flat, flat) / flat.numel()
    if residual_scale != 1.0:
        residual.mul_(residual_scale)
        if residual_t is not None:
            residual_t.mul_(residual_scale)
    return loss, residual, residual_t


# --- The Triton body -------------------------------------------------------------------------


def _launch(launch):
    """One ``KernelLaunch`` of the kernels layer, run now: every eager launch of the op goes through this name."""
    launch()


def _run(launches, launch, outputs):
    """Runs a plan's ``launches`` through ``launch`` (a traced launcher) or ``_launch``; returns the plan's outputs."""
    launch = launch or _launch
    for one in launches:
        launch(one)
    return outputs


# Where the kernels are traced into (a GPU, torch >= 2.6), the compiled route's ops are
# triton_ops (``lpjepa.ops.compiled``).
TRACES_INTO_KERNELS = hasattr(torch.library, "triton_op") and os.environ.get("TRITON_INTERPRET") != "1"


def _kernels():
    return backends.kernels("sliced_wasserstein")


def triton_operand_dtype(features):
    """The dtype the Triton projection's operands are rounded to: the features' own, fp32 for fp64."""
    return features.dtype if features.dtype in KERNEL_DTYPES else torch.float32


def triton_project(x, directions, allow_tf32, launch=None):
    """(S, K, B) fp32 projections of x onto directions (K, D) or (S, K, D), both in one kernel dtype.

    x: (S, B, D), or a tuple of 2 or 3 (B, D) tensors of one layout (``project_plan``).
    """
    path = path_choice.projection_path(x, directions, allow_tf32)
    out, launches = _kernels().project_plan(x, directions, path=path, allow_tf32=allow_tf32, check=False)
    return _run(launches, launch, out)


_UNUSED = {}  # {device: a 1-element fp32 tensor}, the eager sort's argument where no target residual is written


def triton_sort_residual(proj, proj_t, need_target_residual, launch=None, residual_scale=1.0, in_place=False):
    """``torch_sort_residual`` on the kernels: fp32 contiguous proj (V, K, B) and proj_t (T, K, B), fp32 outputs.

    ``in_place``: the residual is written over proj (the Function's, which owns it; never
    a registered op's, whose outputs may not alias its inputs).
    """
    path = path_choice.sort_path(proj, proj_t, need_target_residual)
    unused = None
    if launch is None:  # eager; a traced launch must not alias a buffer across calls
        unused = _UNUSED.get(proj.device)
        if unused is None:
            unused = _UNUSED[proj.device] = torch.empty(1, dtype=torch.float32, device=proj.device)
    outputs, launches = _kernels().sort_residual_plan(proj, proj_t, need_target_residual=need_target_residual,
                                                      path=path, check=False, unused=unused,
                                                      residual_scale=residual_scale, in_place=in_place)
    return _run(launches, launch, outputs)


def triton_project_backward(residual, directions, grad_scale, out_dtype, allow_tf32, launch=None):
    """(S, B, D) ``out_dtype`` gradient of the rows projected onto ``directions``, in one launch.

    residual (S, K, B) fp32: the projections' gradient up to ``grad_scale``, a 0-dim fp32
    tensor on the device (never read on the host); directions (K, D) or (S, K, D) in the
    operands' dtype, to which the kernel rounds the residual (``project_backward``'s formula).
    """
    out, launches = _kernels().project_backward_plan(residual, directions, grad_scale, out_dtype=out_dtype,
                                                     allow_tf32=allow_tf32, check=False)
    return _run(launches, launch, out)


def _triton_backward_operand_dtype(features_dtype, device):
    """The backward's matmul operands: the features' dtype, or fp32 for bf16 below sm_80 (no bf16 arithmetic there)."""
    return torch.float32 if _kernels().bf16_as_fp32(features_dtype, kernel_launch.device_arch(device)) else features_dtype


# --- The bodies as the Function sees them ------------------------------------------------------


class Body(NamedTuple):
    """One backend's implementation of the two steps, and the dtypes it computes in."""

    name: str
    triton: bool
    # backend='triton' asked for this body: a kernel that fails in the backward raises rather than falls back.
    strict: bool = False

    def project(self, sources, directions, operand_dtype):
        """(S, K, B) projections of the (n, B, D) ``sources`` (already in ``operand_dtype`` on Triton)."""
        if not self.triton:
            return torch_project(sources, directions, operand_dtype)
        x = sources[0] if len(sources) == 1 else torch.cat(sources)  # one launch for every source
        return triton_project(x, _as(directions, operand_dtype), torch.backends.cuda.matmul.allow_tf32)

    def sort_residual(self, proj, proj_t, need_target_residual, residual_scale):
        """The loss and residuals; both bodies write the residual over ``proj``, which the Function owns."""
        if not self.triton:
            return torch_sort_residual(proj, proj_t, need_target_residual, residual_scale, in_place=True)
        return triton_sort_residual(proj, proj_t.contiguous(), need_target_residual, residual_scale=residual_scale,
                                    in_place=True)


TORCH = Body("torch", False)
TRITON = Body("triton", True)
TRITON_STRICT = Body("triton", True, strict=True)


# --- The one autograd formula -------------------------------------------------------------------


def project_backward(grad, x, directions, operand_dtype, need_x, need_directions, grad_scale=None):
    """(grad_x (S, B, D), grad_directions) of projections (S, K, B) = directions @ x^T from their gradient.

    The gradient of the projections is ``grad`` times ``grad_scale`` (a 0-dim tensor, or
    None for 1): the scale multiplies the matmuls' (S, B, D) and (K, D) results rather than
    the (S, K, B) gradient, which at K > D is the smaller pass and never a copy of the
    residual. The matmuls take ``operand_dtype`` operands (the fp32 gradient rounded to the
    features' dtype on the Triton body, as autocast does for the seed's matmuls, so fp16 /
    bf16 take the tensor cores here too); None where not needed. grad_directions is summed
    over the sources for shared (K, D) directions.
    """
    grad = _as(grad, operand_dtype)
    P = _as(directions, operand_dtype)
    grad_x = None
    if need_x:
        if P.dim() == 3:
            grad_x = torch.bmm(grad.transpose(1, 2), P)
        elif grad.device.type == "cpu":  # one mm a source: the CPU's bmm would copy the stride-0 directions
            grad_x = grad.new_empty((grad.shape[0], grad.shape[2], P.shape[1]))
            for source in range(grad.shape[0]):
                torch.mm(grad[source].T, P, out=grad_x[source])
        else:  # bmm on stride-0 shared directions: matmul would copy the transposed gradient to fold it
            grad_x = torch.bmm(grad.transpose(1, 2), P.expand(grad.shape[0], -1, -1))
        if grad_scale is not None:
            grad_x.mul_(grad_scale)
    grad_directions = None
    if need_directions:
        x = _as(x, operand_dtype)
        if directions.dim() == 3:
            grad_directions = torch.bmm(grad, x)
        else:  # (K, S * B) @ (S * B, D)
            grad_directions = grad.transpose(0, 1).reshape(grad.shape[1], -1) @ x.reshape(-1, x.shape[2])
        if grad_scale is not None:
            grad_directions.mul_(grad_scale)
    return grad_x, grad_directions


class Gather(NamedTuple):
    """How a call spans a process group: what is all-gathered and each rank's share of the gradient.

    features: True to gather the views' rows, False their projections; all_gather(t, dim):
    the group's tensors concatenated along ``dim`` in rank order (no autograd); rows: this
    rank's rows of the global batch (a slice); scale: the factor on this rank's gradient.
    """

    features: bool
    all_gather: object
    rows: slice
    scale: float


class SlicedWasserstein(torch.autograd.Function):
    """loss = the mean over views of the sliced-Wasserstein loss; see the module doc.

    forward(body, gather, need_target_residual, target, directions, *views): views (b, D),
    target (B, D) or (V, B, D), directions (K, D) or (V, K, D); gather None (one process) or
    a ``Gather``. Returns the 0-dim loss in the body's compute dtype (fp32 on Triton).
    """

    @staticmethod
    def forward(ctx, body, gather, need_target_residual, target, directions, *views):
        device_type = views[0].device.type
        if torch.is_autocast_enabled(device_type):  # checked, not entered: a with block costs every step
            with torch.autocast(device_type, enabled=False):
                return _forward(ctx, body, gather, need_target_residual, target, directions, views)
        return _forward(ctx, body, gather, need_target_residual, target, directions, views)

    @staticmethod
    def backward(ctx, grad_loss):
        device_type = grad_loss.device.type
        if torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return _backward(ctx, grad_loss)
        return _backward(ctx, grad_loss)


def _forward(ctx, body, gather, need_target_residual, target, directions, views):
    """``SlicedWasserstein.forward`` with autocast off."""
    first = views[0]
    count = len(views)
    view_dtype = first.dtype  # the views' one dtype, or None where they differ
    for view in views:
        if view.dtype != view_dtype:
            view_dtype = None
            break
    if body.triton:
        operand = triton_operand_dtype(first)
        # Read once a step: the backward's product takes the forward's precision.
        ctx.allow_tf32 = allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    else:
        operand = compute_dtype(*views, target, directions)
    # One process, shared directions, a target of the views' rows: one projection launch for all
    # (the torch body projects the target apart: its projections are freed once sorted).
    together = body.triton and gather is None and directions.dim() == 2 and target.shape[-2] == first.shape[0]
    if together and target.dim() == 2:  # the common step, in the fewest calls
        x = (*views, target)
        if view_dtype != operand or target.dtype != operand:
            x = tuple([_as(source, operand) for source in x])
        layout = x[0].stride()
        for source in x:
            if source.stride() != layout:
                layout = None
                break
        if layout is None or len(x) > _kernels().MAX_SOURCE_POINTERS:
            x = torch.stack(x)  # the kernel reads at most three (B, D) sources of one layout where they lie
        proj, proj_t = triton_project(x, _as(directions, operand), allow_tf32).split_with_sizes((count, 1))
    else:
        view_rows = [_as(view, operand)[None] for view in views] if body.triton else [view[None] for view in views]
        targets = target if target.dim() == 3 else target[None]
        if directions.dim() == 3 and targets.shape[0] == 1:
            targets = targets.expand(directions.shape[0], -1, -1)
        if body.triton:
            targets = _as(targets, operand)
        if together:
            proj, proj_t = body.project(view_rows + [targets], directions, operand).split_with_sizes(
                (count, targets.shape[0]))
        else:
            local = view_rows
            if gather is not None and gather.features:
                local = [gather.all_gather(torch.cat(view_rows), 1)]
            proj = body.project(local, directions, operand)
            if gather is not None and not gather.features:
                proj = gather.all_gather(proj, 2)
            proj_t = body.project([targets], directions, operand)
    # d loss / d proj = scale * residual. The kernels store the residual times the scale, so
    # the backward only multiplies by grad_loss; the torch body keeps it unscaled (on the CPU
    # an extra pass over the residual costs more than the backward's scalar product).
    scale = 2.0 * (1 if gather is None else gather.scale) / proj.numel()
    ctx.residual_scale = 1.0 if body.triton else scale
    loss, residual, residual_t = body.sort_residual(proj, proj_t, need_target_residual,
                                                    scale if body.triton else 1.0)
    if gather is not None:
        residual = residual[:, :, gather.rows]
    ctx.backward_operand = operand
    if body.triton and operand == torch.bfloat16:  # bf16 below sm_80 multiplies fp32 copies
        ctx.backward_operand = _triton_backward_operand_dtype(operand, first.device)
    ctx.view_dtype = view_dtype
    ctx.view_dtypes = None if view_dtype is not None else [view.dtype for view in views]
    ctx.body = body
    if body.triton:  # one kernel writes the views' gradient: in the views' dtype if they share one it writes
        ctx.views_grad_dtype = view_dtype if view_dtype in KERNEL_DTYPES else torch.float32
    ctx.need_target_residual = need_target_residual
    saved_target = None
    if need_target_residual:  # the target's gradient, or the directions': the backward reads the target
        ctx.target_shape, ctx.target_dtype = target.shape, target.dtype
        saved_target = target
    ctx.save_for_backward(residual, residual_t, directions, saved_target, *(views if directions.requires_grad else ()))
    return loss


def _backward(ctx, grad_loss):
    """``SlicedWasserstein.backward`` with autocast off."""
    residual, residual_t, directions, target, *views = ctx.saved_tensors
    needs = ctx.needs_input_grad
    need_views, need_target, need_directions = True in needs[5:], needs[3] and ctx.need_target_residual, needs[4]
    grad_loss = _as(grad_loss, residual.dtype)
    if ctx.residual_scale != 1.0:
        grad_loss = grad_loss * ctx.residual_scale
    operand = ctx.backward_operand
    x = torch.stack([_as(view, operand) for view in views]) if need_directions else None
    # The Triton body's views' gradient: one kernel (the residual's rounding, the product, the
    # scale and the views' dtype in one launch); the directions' and the target's keep the formula.
    grad_x = grad_directions = None
    if need_views and ctx.body.triton:
        # The kernel compiles at the first backward, after the forward's ran: a failure there is
        # guarded as the forward's (None: the formula below computes the gradient).
        grad_x = backends.run_guarded(
            "sliced_wasserstein", residual.device, ctx.body.strict,
            lambda: triton_project_backward(residual, _as(directions, operand), grad_loss, ctx.views_grad_dtype,
                                            ctx.allow_tf32),
            _no_gradient)
    need_torch_x = need_views and grad_x is None
    if need_torch_x or need_directions:  # not called for nothing: it would round the residual first
        torch_x, grad_directions = project_backward(residual, x, directions, operand, need_torch_x, need_directions,
                                                    grad_loss)
        grad_x = torch_x if need_torch_x else grad_x
    grad_target = None
    if need_target or (need_directions and ctx.need_target_residual):
        targets = target if target.dim() == 3 else target[None]
        if directions.dim() == 3 and targets.shape[0] == 1:
            targets = targets.expand(directions.shape[0], -1, -1)
        grad_t_rows, grad_directions_t = project_backward(residual_t, targets, directions, operand, need_target,
                                                          need_directions, grad_loss)
        if need_target:
            grad_target = grad_t_rows.sum(0) if len(ctx.target_shape) == 2 else grad_t_rows
            grad_target = grad_target.to(ctx.target_dtype)
        if need_directions:
            grad_directions = grad_directions + grad_directions_t
    if grad_directions is not None:
        grad_directions = grad_directions.to(directions.dtype)
    if not need_views:
        return (None, None, None, grad_target, grad_directions, *[None] * (len(needs) - 5))
    view_grads = grad_x.unbind(0)
    # Already in the views' one dtype (the step's case): autograd drops the gradient of a view that needs none.
    if grad_x.dtype != ctx.view_dtype:
        dtypes = ctx.view_dtypes or [ctx.view_dtype] * len(view_grads)
        view_grads = [_as(grad, dtype) if needs[5 + v] else None
                      for v, (grad, dtype) in enumerate(zip(view_grads, dtypes))]
    return (None, None, None, grad_target, grad_directions, *view_grads)


def _no_gradient():
    return None


# --- What the API calls -------------------------------------------------------------------------


def needs_target_residual(target, directions):
    """Whether the backward needs the target's residual: for the target's gradient or the directions'."""
    return (target.requires_grad or directions.requires_grad) and torch.is_grad_enabled()


def sliced_wasserstein(views, target, directions, backend="auto", gather=None):
    """The mean over ``views`` of their sliced-Wasserstein losses against ``target`` along ``directions``, eagerly.

    views: a sequence of (b, D) floating tensors on one device; target (B, D) shared or
    (V, B, D) one per view; directions (K, D) shared or (V, K, D) one set per view. gather:
    None for one process, or a ``Gather`` (``lpjepa.loss``'s global-batch loss). backend:
    'auto', 'torch' or 'triton' (``lpjepa.ops.backend``). Returns the 0-dim loss, float32
    (float64 on the torch body for float64 inputs), differentiable in every input. While
    ``torch.compile`` traces, the API calls ``lpjepa.ops.compiled.sliced_wasserstein`` instead.
    """
    need_t = needs_target_residual(target, directions)
    return backends.run_op(
        "sliced_wasserstein", backend, views[0].device, compute_dtype(*views, target, directions),
        lambda: SlicedWasserstein.apply(TRITON_STRICT if backend == "triton" else TRITON, gather, need_t, target,
                                        directions, *views),
        lambda: SlicedWasserstein.apply(TORCH, gather, need_t, target, directions, *views),
    )
