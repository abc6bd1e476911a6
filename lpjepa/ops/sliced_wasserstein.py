"""The sliced-Wasserstein op on the torch backend, and the autograd formula both backends share.

For features z (B, D), target samples (B, D) and unit directions P (K, D), the loss is
the seed's ``rdmreg_loss``: the mean over directions and batch of the squared difference
between the sorted projections of z and of the target.

Its gradient needs no graph through the sort. The forward keeps the residual, each
projected feature minus the target quantile of its rank, in the batch's original order:

    residual_z[k, b] = (P z^T)[k, b] - sorted((P target^T)[k])[rank of b in (P z^T)[k]]

and the backward is one matmul, d loss / d z = 2 / (B K) * residual_z^T @ P (likewise
for the target, with the sign of its side, and for P). On projected values the
gradient is the residual itself, 2 / numel * residual: ``save_projected_residuals`` and
``projected_gradients``, which ``lpjepa.ops.sliced_wasserstein_triton`` registers for
its op too.

Two ops, each a ``torch.library.custom_op`` so that ``torch.compile`` sees one opaque
node instead of tracing a sort:

* ``lpjepa::sliced_wasserstein``: one view, from features, target and directions; the
  target's sorted projections may be passed in when several views share them.
* ``lpjepa::projected_sliced_wasserstein``: values already projected, (V, K, B) for V
  views against (T, K, B) target projections (T = 1 shared, or V); the sort and residual
  only. The global-batch loss under ``torch.distributed`` runs it on the gathered
  projections; ``project`` is the matmul before it.

All arithmetic is float32 (float64 when an input is float64), whatever the input dtype.
"""
from typing import Optional, Tuple

import numpy as np
import torch


def compute_dtype(*tensors):
    """float64 if any input is float64, else float32: the precision the loss runs in."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def sort_rows(x):
    """Each row of a (K, B) float matrix sorted ascending (a new tensor).

    On the CPU numpy's vectorised sort runs 10-30x faster than torch.sort (measured
    by benchmarks/), so CPU tensors go through it without a copy; NaN sorts last in
    both, so a NaN input still gives a NaN loss.
    """
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.detach().numpy(), axis=1))
    return torch.sort(x, dim=1).values


def argsort_rows(x):
    """(K, B) int64 indices that sort each row of a (K, B) float matrix ascending."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.argsort(x.detach().numpy(), axis=1))
    return torch.sort(x, dim=1).indices


def _sorted_with_order(proj_t, need_order):
    """(each row of proj_t (K, B) sorted, the order that sorts it or None)."""
    if not need_order:
        return sort_rows(proj_t), None
    order = argsort_rows(proj_t)
    return torch.gather(proj_t, 1, order), order


def sorted_projections(x, projections, dtype=None):
    """Projections of the rows of x sorted along the batch: (K, B) from x (B, D), projections (K, D).

    Computed in ``dtype`` (default: ``compute_dtype(x, projections)``); the layout is
    direction-major so each sort runs over contiguous memory.
    """
    dtype = compute_dtype(x, projections) if dtype is None else dtype
    # Outside autocast, or a CPU bf16 autocast hands numpy's sort a bf16 matrix it cannot read.
    with torch.autocast(x.device.type, enabled=False):
        return sort_rows(projections.to(dtype) @ x.to(dtype).T)


def residual_in_batch_order(proj, quantiles, out=None):
    """(residual, order) for projected values proj (R, B) and sorted quantiles (R, B).

    residual[r, b] = proj[r, b] - quantiles[r, rank of b in row r]: each quantile is
    placed at the row holding its rank, so the residual comes out in the batch's
    original order without sorting proj's values. The residual takes the quantiles'
    scattered buffer (``out`` when given), so proj is left as it is and no third (R, B)
    buffer is made.
    """
    order = argsort_rows(proj)
    quantile_of_rank = torch.empty_like(proj) if out is None else out
    quantile_of_rank.scatter_(1, order, quantiles.to(proj.dtype))
    return torch.sub(proj, quantile_of_rank, out=quantile_of_rank), order


def mean_square(residual):
    """The loss from a residual of any shape: the mean of its squares, as a 0-dim tensor."""
    flat = residual.reshape(-1)
    return torch.dot(flat, flat) / residual.numel()


def loss_gradient_scale(grad_loss, residual):
    """d loss / d residual = scale * residual for ``mean_square``: scale = 2 / numel times grad_loss."""
    return grad_loss.to(residual.dtype) * (2.0 / residual.numel())


# --- The per-view op -----------------------------------------------------------------------


@torch.library.custom_op("lpjepa::sliced_wasserstein", mutates_args=())
def sliced_wasserstein_forward(
    z: torch.Tensor,
    target: torch.Tensor,
    projections: torch.Tensor,
    target_sorted: Optional[torch.Tensor],
    need_target_residual: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch-backend forward of the sliced-Wasserstein loss of one view.

    z, target: (B, D); projections: (K, D); target_sorted: optional (K, B), the
    target's sorted projections when several views share one target. Returns, in the
    compute dtype, the 0-dim loss, residual_z (K, B) (see the module doc) and
    residual_target (K, B), the target's residual with the sign of its gradient, or
    an empty tensor unless ``need_target_residual``.
    """
    dtype = compute_dtype(z, target, projections)
    with torch.autocast(z.device.type, enabled=False):
        P = projections.to(dtype)
        proj_z = P @ z.to(dtype).T  # (K, B)
        order_t = None
        if target_sorted is None:
            target_sorted, order_t = _sorted_with_order(P @ target.to(dtype).T, need_target_residual)
        residual_z, order_z = residual_in_batch_order(proj_z, target_sorted)
        del proj_z, target_sorted
        loss = mean_square(residual_z)
        if order_t is None:
            return loss, residual_z, residual_z.new_empty(0)
        diff_in_rank_order = torch.gather(residual_z, 1, order_z)
        residual_t = torch.empty_like(residual_z).scatter_(1, order_t, diff_in_rank_order).neg_()
        return loss, residual_z, residual_t


@sliced_wasserstein_forward.register_fake
def _(z, target, projections, target_sorted, need_target_residual):
    dtype = compute_dtype(z, target, projections)
    residual_shape = (projections.shape[0], z.shape[0])
    return (
        z.new_empty((), dtype=dtype),
        z.new_empty(residual_shape, dtype=dtype),
        z.new_empty(residual_shape if need_target_residual else (0,), dtype=dtype),
    )


def save_residuals(ctx, z, target, projections, need_target_residual, residual_z, residual_t):
    """setup_context of a per-view sliced-Wasserstein op returning (loss, residual_z, residual_t)."""
    ctx.mark_non_differentiable(residual_z, residual_t)
    ctx.need_target_residual = need_target_residual
    ctx.save_for_backward(residual_z, residual_t, projections, z, target)


def residual_gradients(ctx, grad_loss):
    """(grad_z, grad_target, grad_projections) from what ``save_residuals`` kept: one matmul each.

    d loss / d z = 2 / (B K) * residual_z^T @ P, likewise for the target; P's gradient
    collects both sides. None where ctx.needs_input_grad is False; in each input's dtype.
    """
    residual_z, residual_t, projections, z, target = ctx.saved_tensors
    grad_z = grad_target = grad_projections = None
    with torch.autocast(residual_z.device.type, enabled=False):
        scale = loss_gradient_scale(grad_loss, residual_z)
        P = projections.to(residual_z.dtype)
        if ctx.needs_input_grad[0]:
            grad_z = (residual_z.T @ P).mul_(scale).to(z.dtype)
        if ctx.needs_input_grad[1] and ctx.need_target_residual:
            grad_target = (residual_t.T @ P).mul_(scale).to(target.dtype)
        if ctx.needs_input_grad[2]:
            grad_projections = residual_z @ z.to(residual_z.dtype)
            if ctx.need_target_residual:
                grad_projections += residual_t @ target.to(residual_t.dtype)
            grad_projections = grad_projections.mul_(scale).to(projections.dtype)
    return grad_z, grad_target, grad_projections


def needs_target_residual(target, projections):
    """Whether the backward needs the target's residual: for the target's gradient or P's."""
    return torch.is_grad_enabled() and (target.requires_grad or projections.requires_grad)


def _setup_context(ctx, inputs, output):
    z, target, projections, _, need_target_residual = inputs
    save_residuals(ctx, z, target, projections, need_target_residual, *output[1:])


def _backward(ctx, grad_loss, _grad_residual_z, _grad_residual_t):
    return (*residual_gradients(ctx, grad_loss), None, None)


sliced_wasserstein_forward.register_autograd(_backward, setup_context=_setup_context)


def sliced_wasserstein(z, target, projections, target_sorted=None):
    """The loss of one view on the torch backend (0-dim, in the compute dtype).

    A shared ``target_sorted`` (K, B) is only for a target and directions that need no
    gradient: the target's residual cannot be rebuilt from sorted values.
    """
    need_target_residual = target_sorted is None and needs_target_residual(target, projections)
    return sliced_wasserstein_forward(z, target, projections, target_sorted, need_target_residual)[0]


# --- The op on projected values ------------------------------------------------------------


def project(x, projections, dtype=None):
    """(S, K, B) projections of x (S, B, D) onto projections (K, D) or (S, K, D), in ``dtype`` (default: the compute dtype).

    A single source (S = 1) with (V, K, D) directions is projected onto each set (S = V).
    """
    dtype = compute_dtype(x, projections) if dtype is None else dtype
    return torch.matmul(projections.to(dtype), x.to(dtype).transpose(1, 2))


@torch.library.custom_op("lpjepa::projected_sliced_wasserstein", mutates_args=())
def projected_sliced_wasserstein_forward(
    proj: torch.Tensor, proj_t: torch.Tensor, need_target_residual: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, residual, residual_target) of view projections (V, K, B) against target projections (T, K, B).

    T = 1: one target shared by the views, sorted once per direction; T = V: a target
    per view. The loss is the mean over all V * K * B entries of the squared residual
    (the mean of the views' losses); residual (V, K, B) as in the module doc;
    residual_target (T, K, B), the targets' residual with the sign of their gradient
    (summed over the views for a shared target), or empty unless asked for. In proj's
    dtype.
    """
    with torch.autocast(proj.device.type, enabled=False):
        proj_t = proj_t.to(proj.dtype)
        shared = proj_t.shape[0] == 1
        residual = torch.empty_like(proj)
        residual_t = torch.zeros_like(proj_t) if need_target_residual else proj.new_empty(0)
        if shared:
            t_sorted, t_order = _sorted_with_order(proj_t[0], need_target_residual)
        for v in range(proj.shape[0]):
            if not shared:
                t_sorted, t_order = _sorted_with_order(proj_t[v], need_target_residual)
            _, order = residual_in_batch_order(proj[v], t_sorted, out=residual[v])
            if need_target_residual:
                # Each row's order is a permutation, so the sum over views is deterministic.
                residual_t[0 if shared else v].scatter_add_(1, t_order, -torch.gather(residual[v], 1, order))
        return mean_square(residual), residual, residual_t


@projected_sliced_wasserstein_forward.register_fake
def _(proj, proj_t, need_target_residual):
    return proj.new_empty(()), proj.new_empty(proj.shape), proj.new_empty(proj_t.shape if need_target_residual else (0,))


def save_projected_residuals(ctx, inputs, output):
    """setup_context of a projected sliced-Wasserstein op returning (loss, residual, residual_target)."""
    _, residual, residual_t = output
    ctx.mark_non_differentiable(residual, residual_t)
    ctx.save_for_backward(residual, residual_t)


def projected_gradients(ctx, grad_loss, _grad_residual, _grad_residual_t):
    """(grad_proj, grad_proj_t, None): 2 / numel * residual, for either backend's projected op."""
    residual, residual_t = ctx.saved_tensors
    scale = loss_gradient_scale(grad_loss, residual)
    grad_t = residual_t * scale if ctx.needs_input_grad[1] and residual_t.numel() else None
    return residual * scale, grad_t, None


projected_sliced_wasserstein_forward.register_autograd(projected_gradients, setup_context=save_projected_residuals)


def projected_sliced_wasserstein(proj, proj_t):
    """The loss of view projections (V, K, B) against target projections (T, K, B); see the op."""
    need_target_residual = torch.is_grad_enabled() and proj_t.requires_grad
    return projected_sliced_wasserstein_forward(proj, proj_t, need_target_residual)[0]
