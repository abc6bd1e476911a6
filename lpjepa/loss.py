"""The RDMReg loss: the sliced-Wasserstein match of features to RGG samples.

``rdmreg_loss`` is a drop-in for the seed's function; ``RDMReg`` draws its own targets
and projections; ``rectified_lpjepa_loss`` adds the invariance term.

The torch backend is a ``torch.library`` custom op with its own autograd formula
rather than a graph through ``torch.sort`` (so ``torch.compile`` sees one opaque op):
the forward sorts each projection once with its indices and keeps the residual (each
projected feature minus the target quantile of its rank, in the batch's original
order); the backward is one matmul, residual^T @ projections, scaled. All arithmetic
is float32 (float64 when an input is float64), whatever the input dtype.
"""
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _checks, distributed
from ._dispatch import triton_ops
from .reference import random_projections
from .sampling import sample_rgg


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


def sorted_projections(x, projections, dtype=None):
    """Projections of the rows of x sorted along the batch: (K, B) from x (B, D), projections (K, D).

    Computed in ``dtype`` (default: ``compute_dtype(x, projections)``); the layout is
    direction-major so each sort runs over contiguous memory.
    """
    dtype = compute_dtype(x, projections) if dtype is None else dtype
    return sort_rows(projections.to(dtype) @ x.to(dtype).T)


def residual_in_batch_order(proj, quantiles):
    """(residual, order) for projected values proj (R, B) and sorted quantiles (R, B).

    residual[r, b] = proj[r, b] - quantiles[r, rank of b in row r]: each quantile is
    placed at the row holding its rank, so the residual comes out in the batch's
    original order without sorting proj's values. The residual takes the quantiles'
    scattered buffer, so proj is left as it is and no third (R, B) buffer is made.
    """
    order = argsort_rows(proj)
    quantile_of_rank = torch.empty_like(proj).scatter_(1, order, quantiles.to(proj.dtype))
    return torch.sub(proj, quantile_of_rank, out=quantile_of_rank), order


@torch.library.custom_op("lpjepa::sliced_wasserstein", mutates_args=())
def sliced_wasserstein_forward(
    z: torch.Tensor,
    target: torch.Tensor,
    projections: torch.Tensor,
    target_sorted: Optional[torch.Tensor],
    need_target_residual: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch-backend forward of the sliced-Wasserstein loss, an opaque op for torch.compile.

    z, target: (B, D); projections: (K, D); target_sorted: optional (K, B), the
    target's sorted projections when several views share one target. Returns, in the
    compute dtype, the 0-dim loss (mean over directions and batch of the squared
    difference of sorted projections), residual_z (K, B) (each projected feature
    minus the target quantile of its rank, in the batch's original order) and
    residual_target (K, B), the target's residual with the sign of its gradient, or
    an empty tensor unless ``need_target_residual``.
    """
    dtype = compute_dtype(z, target, projections)
    with torch.autocast(z.device.type, enabled=False):
        P = projections.to(dtype)
        proj_z = P @ z.to(dtype).T  # (K, B)
        order_t = None
        if target_sorted is None:
            proj_t = P @ target.to(dtype).T
            if need_target_residual:
                order_t = argsort_rows(proj_t)
                target_sorted = torch.gather(proj_t, 1, order_t)
            else:
                target_sorted = sort_rows(proj_t)
            del proj_t
        residual_z, order_z = residual_in_batch_order(proj_z, target_sorted)
        del proj_z, target_sorted
        loss = torch.dot(residual_z.view(-1), residual_z.view(-1)) / residual_z.numel()
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
    """setup_context of a sliced-Wasserstein op returning (loss, residual_z, residual_t)."""
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
        scale = grad_loss.to(residual_z.dtype) * (2.0 / residual_z.numel())
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


def sliced_wasserstein_backward(ctx, grad_loss, _grad_residual_z, _grad_residual_t):
    """The gradient is one matmul per input: 2 / (B K) * residual^T @ projections."""
    return (*residual_gradients(ctx, grad_loss), None, None)


sliced_wasserstein_forward.register_autograd(sliced_wasserstein_backward, setup_context=_setup_context)


def _sliced_wasserstein(z, target, projections, backend, target_sorted=None):
    """The loss on one view, on the backend that ``backend`` resolves to for z's device."""
    ops = triton_ops(backend, z.device)
    if ops is not None:
        return ops.sliced_wasserstein(z, target, projections)
    # A shared target_sorted is only passed when neither target nor P needs a gradient.
    need_target_residual = target_sorted is None and needs_target_residual(target, projections)
    return sliced_wasserstein_forward(z, target, projections, target_sorted, need_target_residual)[0]


class ProjectedSlicedWasserstein(torch.autograd.Function):
    """``sliced_wasserstein_forward`` on values already projected: the sort and residual only.

    Inputs: proj (R, B), the projections of R / K stacked views of a batch of B rows,
    and target_sorted (K, B), the target's sorted projections (row r of proj is matched
    with row r % K). Returns the mean over all R * B entries of the squared residual
    (for several views, the mean of their losses), in proj's dtype; the gradient w.r.t.
    proj is 2 / (R * B) * residual, in the batch's original order. target_sorted gets
    none. Under torch.distributed proj is the gathered global batch (lpjepa.distributed).
    """

    @staticmethod
    def forward(ctx, proj, target_sorted):
        with torch.autocast(proj.device.type, enabled=False):
            views = proj.shape[0] // target_sorted.shape[0]
            residual, _ = residual_in_batch_order(proj, target_sorted.repeat(views, 1))
            num = residual.numel()
            loss = torch.dot(residual.view(-1), residual.view(-1)) / num
        ctx.num = num
        ctx.save_for_backward(residual)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (residual,) = ctx.saved_tensors
        return residual * (grad_loss.to(residual.dtype) * (2.0 / ctx.num)), None


def _projected_sliced_wasserstein(proj, target_sorted, backend):
    """The seam for the sort-and-residual op on projected values: (R, B), (K, B) -> loss."""
    ops = triton_ops(backend, proj.device)
    kernel = getattr(ops, "projected_sliced_wasserstein", None)
    if kernel is not None:
        return kernel(proj, target_sorted)
    # No Triton kernel for projected values (yet): on 'triton'/'auto' with CUDA tensors this
    # runs torch.sort on the GPU, with the same value and gradient.
    return ProjectedSlicedWasserstein.apply(proj, target_sorted)


def rdmreg_loss(z, target_samples, num_projections=256, *, projections=None, generator=None, backend="auto"):
    """Sliced-Wasserstein RDMReg loss; a drop-in for the seed's ``rdmreg_loss``.

    z, target_samples: (B, D) floating tensors on one device (fp32, fp16, bf16 or
    fp64; computed in fp32, or fp64 for fp64 inputs). projections: optional (K, D)
    directions; when omitted, ``num_projections`` Gaussian directions normalised to unit
    length are drawn on z's device (from ``generator`` if given), exactly as the seed
    draws them, so the same seed gives the seed's value. Returns a 0-dim float32
    (or float64) tensor: the mean over batch and directions of the squared difference
    of the sorted projections. Differentiable in z (and target_samples and projections
    if they require grad). NaN anywhere in z gives a NaN loss.

    backend: 'auto' (Triton kernels on CUDA, torch elsewhere), 'torch' or 'triton'.
    """
    _checks.check_backend(backend)
    _checks.check_loss_inputs(z, target_samples, projections)
    if projections is None:
        num_projections = _checks.check_num_projections(num_projections)
        _checks.check_generator(generator, z.device)
        projections = random_projections(num_projections, z.shape[1], z.device, generator=generator)
    return _sliced_wasserstein(z, target_samples, projections, backend)


class RDMReg(nn.Module):
    """The RDMReg regularizer as a module that draws its own targets and projections.

    ``forward(*views)`` takes one or more (B, D) feature tensors of the same shape,
    draws one RGG target batch ReLU(mu + sigma * GN_p) and one set of
    ``num_projections`` unit directions per call, shares both across the views, and
    returns the mean of the views' sliced-Wasserstein losses (the seed's
    ``(rdmreg_loss(z1, t) + rdmreg_loss(z2, t)) / 2`` for two views, but with one set
    of directions, so the target is projected and sorted once).

    Under torch.distributed (``process_group``: 'auto' is the world when
    ``torch.distributed`` is initialized and nothing otherwise; None never communicates;
    or a ProcessGroup), every rank passes its local views and gets the loss of the
    global batch, the local batches concatenated in rank order, exactly as one process
    would compute it. The targets and directions are drawn alike on every rank from
    ``seed`` (None: drawn by rank 0 and broadcast once) and a step counter, kept in
    ``self.seed_stream``. ``gather`` ('auto', 'projections', 'features') says what is
    all-gathered ('auto': whichever moves fewer bytes). ``scale_grad_by_world_size``
    (default True) multiplies the local backward by the world size so that DDP's
    gradient averaging yields the single-process gradient; False gives each rank its
    exact slice of the single-process gradient. Uneven local batches are handled.
    Details: ``lpjepa.distributed``.
    """

    def __init__(
        self,
        p=1.0,
        mu=0.0,
        num_projections=256,
        sigma=None,
        backend="auto",
        *,
        process_group="auto",
        seed=None,
        gather="auto",
        scale_grad_by_world_size=True,
    ):
        super().__init__()
        self.p = _checks.check_p(p)
        self.mu = _checks.check_finite("mu", mu)
        self.sigma = _checks.check_sigma(sigma)
        self.num_projections = _checks.check_num_projections(num_projections)
        _checks.check_backend(backend)
        self.backend = backend
        self.process_group = process_group  # resolved at each call: init_process_group may come later
        self.seed_stream = distributed.SeedStream(seed)
        self.gather = distributed.check_gather(gather)
        self.scale_grad_by_world_size = bool(scale_grad_by_world_size)

    def extra_repr(self):
        return f"p={self.p}, mu={self.mu}, num_projections={self.num_projections}, sigma={self.sigma}"

    def forward(self, *views, target=None, projections=None, generator=None):
        """views: (B, D) tensors. Optional ``target`` (B, D) and ``projections`` (K, D) fix the randomness.

        Under torch.distributed the views are the local (b, D) rows and ``target``, if
        given, is the global (sum of the ranks' b, D) target, the same on every rank.
        """
        if not views:
            raise ValueError("RDMReg needs at least one view: call it as rdmreg(z1) or rdmreg(z1, z2)")
        first = views[0]
        _checks.check_float_tensor("views[0]", first)
        for i, view in enumerate(views[1:], start=1):
            _checks.check_float_tensor(f"views[{i}]", view)
            if view.shape != first.shape:
                raise ValueError(f"every view must have shape {tuple(first.shape)}; views[{i}] has {tuple(view.shape)}")
        group = distributed.resolve_process_group(self.process_group)
        if group is not None:
            return distributed.global_rdmreg(self, views, group, target=target, projections=projections, generator=generator)
        if target is None:
            target = sample_rgg(
                first.shape, self.p, self.mu, first.device, sigma=self.sigma, generator=generator, backend=self.backend
            )
        _checks.check_loss_inputs(first, target, projections)
        if projections is None:
            _checks.check_generator(generator, first.device)
            projections = random_projections(self.num_projections, first.shape[1], first.device, generator=generator)
        target_sorted = None
        shared = len(views) > 1 and not needs_target_residual(target, projections)
        if shared and triton_ops(self.backend, first.device) is None:
            target_sorted = sorted_projections(target, projections, compute_dtype(first, target, projections))
        losses = [
            _sliced_wasserstein(view, target, projections, self.backend, target_sorted=target_sorted) for view in views
        ]
        return torch.stack(losses).mean()


class LossParts(NamedTuple):
    """The Rectified LpJEPA objective and its two weighted-before-summing parts."""

    loss: torch.Tensor
    invariance: torch.Tensor
    regularizer: torch.Tensor


def rectified_lpjepa_loss(
    z1,
    z2,
    *,
    lamb_inv=25.0,
    lamb_reg=125.0,
    p=1.0,
    mu=0.0,
    num_projections=256,
    sigma=None,
    target=None,
    projections=None,
    generator=None,
    backend="auto",
    process_group="auto",
    scale_grad_by_world_size=True,
):
    """The full objective: lamb_inv * MSE(z1, z2) + lamb_reg * RDMReg(z1, z2).

    z1, z2: (B, D) projector outputs of two views. Defaults are the seed's (Table 1
    weights, p = 1, mu = 0, 256 projections). Returns ``LossParts(loss, invariance,
    regularizer)`` with float32 tensors, so a training loop reads::

        parts = rectified_lpjepa_loss(model(x1), model(x2))
        parts.loss.backward()

    Under torch.distributed (``process_group`` as in ``RDMReg``) z1, z2 are the local
    rows and every part is the global-batch value, the same on every rank: the
    invariance is the MSE over the global batch (one scalar all-reduce) and the
    regularizer draws from one seed stream per process group. Gradients follow
    ``scale_grad_by_world_size`` for both terms (see ``lpjepa.distributed``).
    """
    group = distributed.resolve_process_group(process_group)
    rdmreg = RDMReg(
        p, mu, num_projections, sigma, backend, process_group=group, scale_grad_by_world_size=scale_grad_by_world_size
    )
    if group is not None:
        rdmreg.seed_stream = distributed.default_seed_stream(group)
    regularizer = rdmreg(z1, z2, target=target, projections=projections, generator=generator)
    with torch.autocast(z1.device.type, enabled=False):
        dtype = compute_dtype(z1, z2)
        if group is None:
            invariance = F.mse_loss(z1.to(dtype), z2.to(dtype))
        else:
            squared_error = (z1.to(dtype) - z2.to(dtype)).square().sum()
            scale = distributed.grad_scale(group, scale_grad_by_world_size)
            invariance = distributed.global_mean(squared_error, z1.numel(), group, scale)
    loss = lamb_inv * invariance + lamb_reg * regularizer
    return LossParts(loss, invariance, regularizer)
