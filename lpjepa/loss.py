"""The RDMReg loss, the public API: ``rdmreg_loss``, ``RDMReg``, ``rectified_lpjepa_loss`` and
``RectifiedLpJEPALoss``.

``rdmreg_loss`` is a drop-in for the seed's function; ``RDMReg`` draws its own targets
and projections; ``rectified_lpjepa_loss`` adds the invariance term, and
``RectifiedLpJEPALoss`` is that objective as a module shaped like Lightly's losses
(``gather_distributed``, ``forward`` returning the loss). They validate their
inputs, draw what is not given, and call the ops (``lpjepa.ops``) on the backend chosen
for the call: the torch ops, or the Triton kernels on CUDA. Under ``torch.distributed``
the same draw feeds the global-batch computation (``_global_loss``), which uses the
collectives and seed stream of ``lpjepa.distributed``.

The family of the paper and its official code is one set of arguments: the target
(``rectify``: rectified or dense, ``sigma``: its scale convention, ``target_draw``: one
for all views or one per view) and the directions (``directions``: 'gaussian',
'orthogonal', 'svd', 'svd-bottom-half'; see ``lpjepa.ops.directions``). A shared target
is a (B, D) tensor, per-view targets a (V, B, D) stack; shared directions are (K, D),
per-view ones (V, K, D).
"""
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _checks, distributed
from ._checks import DIRECTION_SCHEMES, SIGMA_CONVENTIONS, TARGET_DRAWS  # noqa: F401 (the family's choices)
from .ops import directions as direction_ops
from .ops import rgg_sample as rgg_sample_op
from .ops import sliced_wasserstein as sliced_wasserstein_op
from .ops.backend import check_backend, run_op, use_triton
from .rgg import resolve_sigma
from . import sampling


def _global_loss(views, target, projections, backend, group, sizes, gather, scale):
    """The loss of the global batch, the local views concatenated over ``group`` in rank order.

    views: this rank's (b, D) views; target: the global (sum of sizes, D) target, or
    (V, sum of sizes, D) per view, and projections (K, D) or (V, K, D), the same on every
    rank. Whichever of the projected rows or the features moves fewer bytes is
    all-gathered (``distributed.gathers_features``) inside the op, between its projection
    and its sort; each rank's backward receives the gradient of its own rows, times
    ``scale``.
    """
    first = views[0]
    num_projections, dim = projections.shape[-2], target.shape[-1]
    projected_dtype = sliced_wasserstein_op.compute_dtype(*views, target, projections)
    features = distributed.gathers_features(gather, num_projections, dim, projected_dtype, first.dtype)
    rank = torch.distributed.get_rank(group)
    start = sum(sizes[:rank])
    spec = sliced_wasserstein_op.Gather(
        features, lambda tensor, dim: distributed.gather_batch(tensor, sizes, group, dim),
        slice(start, start + sizes[rank]), scale,
    )
    # Every rank fails or succeeds alike on the same kernels, so all of them fall back together.
    return sliced_wasserstein_op.sliced_wasserstein(views, target, projections, backend, gather=spec)


def _sliced_wasserstein(views, target, projections, backend):
    """The one-process loss: the op's Function eagerly, its ``torch.library`` ops while torch.compile traces."""
    if torch.compiler.is_compiling():
        # An import statement, which Dynamo runs rather than traces: the module registers its ops on import.
        from .ops import compiled

        return compiled.traced(views, target, projections, backend)
    return sliced_wasserstein_op.sliced_wasserstein(views, target, projections, backend)


def _none():
    """``run_op``'s torch body where the torch backend draws nothing here (``RDMReg.draw_together``)."""
    return None


def draw_directions(directions, num_projections, views, generator=None, group=None, sizes=None):
    """The directions of one call: (K, D) for 'gaussian' and 'orthogonal', (V, K, D) for the SVD schemes.

    views: the (b, D) views the SVD schemes take their singular vectors from (one set
    per view, of the view's centred batch, detached: no gradient flows through any
    direction). Under a process group (``sizes``: the local batch sizes) that batch is
    the global one, gathered detached, and its SVD is computed on the group's rank 0 and
    broadcast, so every rank projects onto the same directions. Random directions come
    from ``generator`` (every rank's seed stream draws alike). 'gaussian' is the seed's
    draw exactly.
    """
    first = views[0]
    dim, device = first.shape[1], first.device
    if directions == "gaussian":
        return direction_ops.random_projections(num_projections, dim, device, generator=generator)
    if directions == "orthogonal":
        return direction_ops.orthogonal_projections(num_projections, dim, device, generator=generator)
    dtype = sliced_wasserstein_op.compute_dtype(*views)
    with torch.autocast(device.type, enabled=False):
        batch = torch.stack([view.detach().to(dtype) for view in views])
        if group is None:
            singular = direction_ops.centred_right_singular_vectors(batch)
        else:
            batch = distributed.gather_batch(batch, sizes, group, dim=1)
            shape = (len(views), min(batch.shape[1], dim), dim)
            singular = distributed.from_first_rank(
                lambda: direction_ops.centred_right_singular_vectors(batch), shape, dtype, device, group
            )
    bottom_half = directions == "svd-bottom-half"
    return direction_ops.svd_projections(singular, num_projections, bottom_half, generator=generator)


def rdmreg_loss(
    z, target_samples, num_projections=256, *, projections=None, generator=None, backend="auto", directions="gaussian"
):
    """Sliced-Wasserstein RDMReg loss; a drop-in for the seed's ``rdmreg_loss``.

    z, target_samples: (B, D) floating tensors on one device (fp32, fp16, bf16 or
    fp64). The torch backend computes in fp32 (fp64 for fp64 inputs); the Triton
    backend projects in the features' precision, as torch's own matmuls would (the
    target and directions rounded to fp16 / bf16 features' dtype; TF32 when torch allows
    it), and sorts in fp32 (docs/kernels.md, "Precision"). B = 1 gives the seed's value, the
    mean squared difference of the single projected pair. projections: optional (K, D)
    directions; when omitted, ``num_projections`` are drawn on z's device (from
    ``generator`` if given) by the ``directions`` scheme: 'gaussian' (the default)
    exactly as the seed draws them, so the same seed gives the seed's value;
    'orthogonal', 'svd' or 'svd-bottom-half' (``draw_directions``; the SVD is of z's
    batch). Returns a 0-dim float32 (or float64) tensor: the mean over batch and
    directions of the squared difference of the sorted projections. Differentiable in z
    (and target_samples and projections if they require grad). NaN anywhere in z gives
    a NaN loss.

    backend: 'auto' (Triton kernels on CUDA, torch elsewhere), 'torch' or 'triton'.
    """
    check_backend(backend)
    _checks.check_choice("directions", directions, _checks.DIRECTION_SCHEMES)
    _checks.check_loss_inputs(z, target_samples, projections)
    if projections is None:
        num_projections = _checks.check_num_projections(num_projections)
        _checks.check_generator(generator, z.device)
        _checks.check_svd_rows(directions, z.shape[0])
        projections = draw_directions(directions, num_projections, (z,), generator)
        projections = projections[0] if projections.dim() == 3 else projections
    return _sliced_wasserstein((z,), target_samples, projections, backend)


class RDMReg(nn.Module):
    """The RDMReg regularizer as a module that draws its own targets and projections.

    ``forward(*views)`` takes one or more (B, D) feature tensors of the same shape,
    draws one RGG target batch ReLU(mu + sigma * GN_p) and one set of
    ``num_projections`` unit directions per call, shares both across the views, and
    returns the mean of the views' sliced-Wasserstein losses (the seed's
    ``(rdmreg_loss(z1, t) + rdmreg_loss(z2, t)) / 2`` for two views, but with one set
    of directions, so the target is projected and sorted once).

    The loss family (defaults: the seed's):

    * ``sigma``: 'gn' (or None; unit variance before the ReLU, the seed's),
      'unit-rectified' (unit variance after it) or a number (``lpjepa.rgg.resolve_sigma``);
    * ``rectify``: False matches the dense mu + sigma * GN_p instead (the LpJEPA baseline);
    * ``target_draw``: 'shared' (one target for all views) or 'per-view' (a fresh target per
      view, as the official code draws them); ``targets`` is its former name, still taken;
    * ``directions``: 'gaussian', 'orthogonal', 'svd' or 'svd-bottom-half'
      (``draw_directions``); the SVD schemes give each view its own directions.

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
    exact slice of the single-process gradient. Uneven local batches are handled: the
    local sizes are all-gathered at each call (one small collective, which waits for the
    device); ``even_batches=True`` says every rank passes as many rows as this one (a
    loader with ``drop_last``) and skips it.
    Details: ``lpjepa.distributed``.
    """

    def __init__(
        self,
        p=1.0,
        mu=0.0,
        num_projections=256,
        sigma="gn",
        backend="auto",
        *,
        process_group="auto",
        seed=None,
        gather="auto",
        scale_grad_by_world_size=True,
        rectify=True,
        directions="gaussian",
        target_draw=None,
        even_batches=False,
        targets=None,
    ):
        super().__init__()
        self.p = _checks.check_p(p)
        self.mu = _checks.check_finite("mu", mu)
        self.sigma = _checks.check_sigma(sigma)
        self.target_sigma = resolve_sigma(self.sigma, self.p, self.mu)
        self.num_projections = _checks.check_num_projections(num_projections)
        check_backend(backend)
        self.backend = backend
        self.process_group = process_group  # resolved at each call: init_process_group may come later
        self.seed_stream = distributed.SeedStream(seed)
        self.gather = distributed.check_gather(gather)
        self.scale_grad_by_world_size = bool(scale_grad_by_world_size)
        self.rectify = bool(rectify)
        self.directions = _checks.check_choice("directions", directions, _checks.DIRECTION_SCHEMES)
        target_draw = _checks.check_alias("target_draw", target_draw, "targets", targets, "shared")
        self.target_draw = _checks.check_choice("target_draw", target_draw, _checks.TARGET_DRAWS)
        self.even_batches = bool(even_batches)

    def extra_repr(self):
        return (
            f"p={self.p}, mu={self.mu}, num_projections={self.num_projections}, sigma={self.sigma!r}, "
            f"rectify={self.rectify}, directions={self.directions!r}, target_draw={self.target_draw!r}"
        )

    def draw_targets(self, num_views, rows, dim, device, generator=None):
        """(rows, dim) shared, or (num_views, rows, dim) per view, drawn one after the other."""
        def draw():  # the arguments were checked at construction
            return sampling.draw(
                (rows, dim), p=self.p, mu=self.mu, sigma=self.target_sigma, dtype=torch.get_default_dtype(),
                device=device, generator=generator, backend=self.backend, rectify=self.rectify,
            )

        return draw() if self.target_draw == "shared" else torch.stack([draw() for _ in range(num_views)])

    def draw_together(self, views, rows, generator=None):
        """(target, directions) from one launch of the Triton sampler, or None where this call does not take it.

        Taken for Gaussian directions when the loss runs on its Triton body (the choice of
        ``sliced_wasserstein``'s ``run_op``) and so does the sampler: the target ((rows, D),
        or (V, rows, D) per view) and the (K, D) directions come in the dtype the Triton
        projection reads (``triton_operand_dtype``), so the op casts neither. The law is the
        two draws' (i.i.d. target elements, directions uniform on the sphere), the numbers
        the sampler's Philox stream's (under torch.compile too: an opaque op). None (the two
        drawn apart, as on the torch backend): other schemes, the torch body, or a sampler
        that fell back.
        """
        if self.directions != "gaussian":
            return None
        first = views[0]
        device = first.device
        # The dtype sliced_wasserstein will decide on: its inputs', with the default dtype's target and directions.
        dtype = sliced_wasserstein_op.compute_dtype(*views)
        if torch.get_default_dtype() == torch.float64:
            dtype = torch.float64
        if not use_triton("sliced_wasserstein", self.backend, device, dtype):
            return None
        operand = sliced_wasserstein_op.triton_operand_dtype(first)
        dim = first.shape[1]
        shape = (rows, dim) if self.target_draw == "shared" else (len(views), rows, dim)
        return run_op(
            "rgg_sample", self.backend, device, None,
            lambda: rgg_sample_op.triton_draw(shape, self.num_projections, dim, p=self.p, mu=self.mu,
                                              sigma=self.target_sigma, dtype=operand, directions_dtype=operand,
                                              device=device, generator=generator, rectify=self.rectify),
            _none)

    def forward(self, *views, target=None, projections=None, generator=None):
        """views: (B, D) tensors, or one list / tuple of them, or one (V, B, D) stack (the same value).

        Optional ``target`` and ``projections`` fix the randomness.
        target: (B, D), or (V, B, D) one per view; projections: (K, D), or (V, K, D) one
        set per view. Under torch.distributed the views are the local (b, D) rows and the
        target, if given, is global (the sum of the ranks' b rows), the same on every rank.
        The target is drawn first, then the directions, from one generator; on the Triton
        backend, with neither given and Gaussian directions, both come from one launch of
        the sampler (``draw_together``).
        """
        views = _checks.rdmreg_views(views)
        first = views[0]
        rows = first.shape[0]  # this process's; the global batch's under a process group
        group = distributed.resolve_process_group(self.process_group)
        if group is None:
            sizes = None
            if rows < 1:  # before anything is drawn for it
                raise ValueError("the views need at least 1 row; got an empty batch")
        else:
            if self.even_batches:  # every rank's batch is this one's: no collective, no host sync
                sizes = [rows] * torch.distributed.get_world_size(group)
            else:
                sizes = distributed.batch_sizes(rows, group, first.device)
            rows = sum(sizes)
        if target is None or projections is None:
            if generator is None and group is not None:
                generator = self.seed_stream.next_generator(first.device, group)
            if generator is not None:
                _checks.check_generator(generator, first.device)
        drawn = None
        if target is None and projections is None:
            drawn = self.draw_together(views, rows, generator)
            if drawn is not None:
                target, drawn = drawn
        if target is None:
            target = self.draw_targets(len(views), rows, first.shape[1], first.device, generator)
        if drawn is None or group is not None:  # a draw_together pair is the views' shape on their device
            global_rows = None if group is None else rows
            _checks.check_loss_inputs(
                first, target, projections, target_name="target", global_rows=global_rows, num_views=len(views)
            )
        if drawn is not None:
            projections = drawn
        elif projections is None:
            _checks.check_svd_rows(self.directions, rows)
            projections = draw_directions(self.directions, self.num_projections, views, generator, group, sizes)
        if group is None:
            return _sliced_wasserstein(views, target, projections, self.backend)
        scale = distributed.grad_scale(group, self.scale_grad_by_world_size)
        return _global_loss(views, target, projections, self.backend, group, sizes, self.gather, scale)


class LossParts(NamedTuple):
    """The Rectified LpJEPA objective and its two weighted-before-summing parts."""

    loss: torch.Tensor
    invariance: torch.Tensor
    regularizer: torch.Tensor


def rectified_lpjepa_loss(
    z1,
    z2=None,
    *,
    lamb_inv=25.0,
    lamb_reg=125.0,
    p=1.0,
    mu=0.0,
    num_projections=256,
    sigma="gn",
    rectify=True,
    directions="gaussian",
    target_draw=None,
    target=None,
    projections=None,
    generator=None,
    backend="auto",
    process_group="auto",
    scale_grad_by_world_size=True,
    even_batches=False,
    targets=None,
):
    """The full objective: lamb_inv * MSE(z1, z2) + lamb_reg * RDMReg(z1, z2).

    z1, z2: (B, D) projector outputs of two views; or z1 alone, a list / tuple of the two
    or a (2, B, D) stack, as Lightly's collate and JEPA losses hold them. Defaults are the seed's (Table 1
    weights, p = 1, mu = 0, 256 projections, sigma 'gn', a rectified target shared by
    the views, Gaussian directions); ``sigma``, ``rectify``, ``directions`` and
    ``target_draw`` as in ``RDMReg``. Returns ``LossParts(loss, invariance, regularizer)``
    in the loss's compute dtype (float32; float64 for float64 inputs), so a training loop reads::

        parts = rectified_lpjepa_loss(model(x1), model(x2))
        parts.loss.backward()

    Under torch.distributed (``process_group`` as in ``RDMReg``) z1, z2 are the local
    rows and every part is the global-batch value, the same on every rank: the
    invariance is the MSE over the global batch (one scalar all-reduce) and the
    regularizer draws from one seed stream per process group. Gradients follow
    ``scale_grad_by_world_size`` for both terms (see ``lpjepa.distributed``);
    ``even_batches`` as in ``RDMReg``.
    """
    z1, z2 = _checks.two_views(z1, z2, ("z1", "z2"))
    group = distributed.resolve_process_group(process_group)
    rdmreg = RDMReg(
        p, mu, num_projections, sigma, backend, process_group=group, scale_grad_by_world_size=scale_grad_by_world_size,
        rectify=rectify, directions=directions, target_draw=target_draw, even_batches=even_batches, targets=targets,
    )
    if group is not None:
        rdmreg.seed_stream = distributed.default_seed_stream(group)
    return _objective(rdmreg, group, z1, z2, lamb_inv, lamb_reg, target, projections, generator)


def _objective(rdmreg, group, z1, z2, lamb_inv, lamb_reg, target=None, projections=None, generator=None):
    """``LossParts`` of lamb_inv * MSE(z1, z2) + lamb_reg * rdmreg(z1, z2), over ``group``'s global batch if any.

    rdmreg: the ``RDMReg`` whose process group is ``group`` (None: the local loss); its
    ``scale_grad_by_world_size`` applies to the invariance too.
    """
    regularizer = rdmreg(z1, z2, target=target, projections=projections, generator=generator)
    with torch.autocast(z1.device.type, enabled=False):
        dtype = sliced_wasserstein_op.compute_dtype(z1, z2)
        if group is None:
            invariance = F.mse_loss(z1.to(dtype), z2.to(dtype))
        else:
            squared_error = (z1.to(dtype) - z2.to(dtype)).square().sum()
            scale = distributed.grad_scale(group, rdmreg.scale_grad_by_world_size)
            invariance = distributed.global_mean(squared_error, z1.numel(), group, scale)
    loss = lamb_inv * invariance + lamb_reg * regularizer
    return LossParts(loss, invariance, regularizer)


class RectifiedLpJEPALoss(nn.Module):
    """The Rectified LpJEPA objective as a loss module: ``criterion(z_a, z_b)`` returns the loss.

    For Lightly users, this is the RDMReg objective in the shape of Lightly's losses: named
    method + "Loss" like ``VICRegLoss``, its forward takes the two views' (B, D) projector
    outputs (or, with ``z_b`` omitted, ``z_a`` as a list / tuple of the two, as Lightly's
    collate gives them, or a (2, B, D) stack, as its JEPA losses take them) and returns one 0-dim tensor, lamb_inv * MSE(z_a, z_b) + lamb_reg *
    RDMReg(z_a, z_b), in the loss's compute dtype (float32; float64 for float64 inputs).
    ``forward_components`` returns ``LossParts(loss, invariance, regularizer)`` instead. It
    is ``rectified_lpjepa_loss`` (the same defaults: the seed's) holding its options and,
    across calls, its ``RDMReg`` (``self.rdmreg``) and that module's seed stream.

    Keywords as in ``rectified_lpjepa_loss`` and ``RDMReg``; ``num_slices`` is another name
    for ``num_projections`` (default 256; giving both with different values is an error).

    ``gather_distributed`` (Lightly's name and meaning): False (the default) never
    communicates; under DDP each rank then computes the loss of its own local batch, with
    targets and directions drawn from its own torch generator. True computes on every rank
    the loss of the global batch (the ranks' batches concatenated in rank order), exactly
    as one process would on the whole batch, with targets and directions drawn alike on
    every rank from ``self.rdmreg.seed_stream`` (a fresh draw per call). The local backward
    is then scaled by the world size, so that DDP's gradient averaging yields exactly the
    single-process gradient (not 1/world size of it). As in Lightly's losses, True without an
    initialized process group (one process, or a call before ``init_process_group``) computes
    the local loss, the same as False, so that one script runs unchanged on one GPU and on
    many; only a torch build without ``torch.distributed`` (``torch.distributed.is_available()``
    False) makes True an error, a ValueError at construction. ``even_batches=True`` says every rank passes as
    many rows as this one and skips the per-call gather of the batch sizes (``RDMReg``).
    """

    def __init__(
        self,
        lamb_inv=25.0,
        lamb_reg=125.0,
        p=1.0,
        mu=0.0,
        num_projections=None,
        num_slices=None,
        sigma="gn",
        rectify=True,
        directions="gaussian",
        target_draw=None,
        backend="auto",
        gather_distributed=False,
        even_batches=False,
        targets=None,
    ):
        super().__init__()
        self.lamb_inv = _checks.check_finite("lamb_inv", lamb_inv)
        self.lamb_reg = _checks.check_finite("lamb_reg", lamb_reg)
        num_projections = _checks.check_alias("num_projections", num_projections, "num_slices", num_slices, 256)
        self.gather_distributed = _checks.check_flag("gather_distributed", gather_distributed)
        if gather_distributed and not torch.distributed.is_available():
            raise ValueError(
                "gather_distributed=True, but this torch build has no torch.distributed; "
                "pass gather_distributed=False or install a torch build with distributed support."
            )
        self.rdmreg = RDMReg(
            p, mu, num_projections, sigma, backend, process_group="auto" if gather_distributed else None,
            rectify=_checks.check_flag("rectify", rectify), directions=directions, target_draw=target_draw, targets=targets,
            even_batches=_checks.check_flag("even_batches", even_batches),
        )

    @property
    def num_projections(self):
        return self.rdmreg.num_projections

    num_slices = num_projections

    def extra_repr(self):
        return f"lamb_inv={self.lamb_inv}, lamb_reg={self.lamb_reg}, gather_distributed={self.gather_distributed}"

    def forward(self, z_a, z_b=None, *, target=None, projections=None, generator=None):
        """The loss: a 0-dim tensor. z_a, z_b: (B, D) views (or z_a alone: a list of 2 or a (2, B, D) stack).

        The keywords as in ``forward_components``."""
        return self.forward_components(z_a, z_b, target=target, projections=projections, generator=generator).loss

    def forward_components(self, z_a, z_b=None, *, target=None, projections=None, generator=None):
        """``LossParts(loss, invariance, regularizer)`` of the two (B, D) views z_a, z_b.

        With ``z_b`` omitted, ``z_a`` holds both: a list or tuple of two (B, D) views or a
        (2, B, D) stack (the same value as the views unpacked).

        Optional ``target`` ((B, D), or (2, B, D) per view), ``projections`` ((K, D) or
        (2, K, D)) and ``generator`` fix the randomness, as in ``rectified_lpjepa_loss``;
        with ``gather_distributed=True`` the views are this rank's rows and a given target
        is the global batch's, the same on every rank.
        """
        z_a, z_b = _checks.two_views(z_a, z_b)
        # gather_distributed without an initialized process group: 'auto' resolves to None, the local loss.
        group = distributed.resolve_process_group(self.rdmreg.process_group)
        return _objective(self.rdmreg, group, z_a, z_b, self.lamb_inv, self.lamb_reg, target, projections, generator)
