"""The collectives and shared seeds of the global-batch RDMReg under ``torch.distributed``.

Sorting is global: the sliced-Wasserstein term of a batch split over N processes is not
the average of N local terms. With a process group, ``RDMReg`` and
``rectified_lpjepa_loss`` compute on every rank the loss a single process would compute
on the concatenated batch (rank 0's rows first), with the same directions and targets.

The pieces, in the order one call uses them:

1. ``batch_sizes``: the local batch sizes are all-gathered (N int64). Uneven local
   batches are handled, not refused: smaller ones are zero-padded to the largest for the
   gather and the padding is cut away before the sort, so the loss is exactly the loss
   of the concatenated batch. (Reading the sizes on the host syncs it with the device
   once per call.)
2. ``SeedStream``: projections and targets are drawn on every rank from a generator
   seeded with ``step_seed(seed, step)``. The base seed is given by the user or drawn
   once by the group's rank 0 and broadcast at the first call (one int64); the step
   counter advances by one per call on every rank, with no communication. Every rank
   draws the whole global target, (global batch, dim), not a slice: it is not
   differentiated, drawing it costs no traffic, and the draw is then the single-process
   draw, so the distributed loss at step n equals
   ``RDMReg(process_group=None)(*global_views, generator=step_generator(seed, n, device))``.
3. ``gather_batch``: an all-gather along the batch, inside the loss's op (between its
   projection and its sort), whose backward keeps this rank's rows. What is gathered is
   whichever moves fewer bytes per row: the projected features (K values in the compute
   dtype, fp32/fp64) or the features (D values in their own dtype, e.g. bf16). With the
   seed's K = 256 and D = 512 that is the projections, half the bytes in fp32; ties go to
   the projections, which also spare each rank projecting the other ranks' rows.
4. The sort and residual over the global batch on the gathered projections
   (``lpjepa.loss._global_loss``, with the op of ``lpjepa.ops.sliced_wasserstein``).

This module holds the collectives and the seed stream only; the loss itself is computed
by ``lpjepa.loss``.

Gradient convention. Every rank computes the same global loss L, and the op's backward
gives each rank only the gradient of its own rows (the global residual is identical on
every rank, so it is sliced, never all-reduced). The rows of rank r then
carry dL/dz_r, and the sum over ranks of the parameter gradients is the single-process
gradient. DistributedDataParallel averages gradients over ranks, so by default
(``scale_grad_by_world_size=True``) that local backward is multiplied by the world size N:
DDP's average is then exactly the single-process gradient of the whole objective. The
invariance MSE follows the same rule (its value is the global mean, its local gradient N
times the rows' share, which for equal local batches is the gradient of the local mean),
so both terms agree. Set ``scale_grad_by_world_size=False`` to get each rank's exact slice
of the single-process gradient instead (for code that sums gradients itself).
"""
import time

import torch
import torch.distributed as dist

GATHER_CHOICES = ("auto", "projections", "features")
_MASK64 = (1 << 64) - 1
# How long each rank releases the GIL after the closing barrier, so the backend's worker
# threads can drop the collectives they still hold (see destroy_process_group). Dropping one
# takes microseconds; 50 ms is a wide margin and is paid once per run.
_WORKER_RELEASE_S = 0.05


def _initialized():
    return dist.is_available() and dist.is_initialized()


def resolve_process_group(process_group):
    """The group to compute the global loss over, or None for the single-process loss.

    'auto' (the default everywhere): the world when ``torch.distributed`` is
    initialized, None otherwise. None: no communication, the local loss. A
    ``ProcessGroup``: that group.
    """
    if isinstance(process_group, str):
        if process_group != "auto":
            raise ValueError(
                f"process_group must be 'auto', None or a torch.distributed ProcessGroup; got {process_group!r}"
            )
        return dist.group.WORLD if _initialized() else None
    if process_group is None:
        return None
    if not _initialized():
        raise ValueError(
            "process_group was given but torch.distributed is not initialized; call "
            "torch.distributed.init_process_group first, or pass process_group=None for the local loss."
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup; got {type(process_group).__name__}")
    return process_group


def check_gather(gather):
    if gather not in GATHER_CHOICES:
        raise ValueError(f"gather must be one of {GATHER_CHOICES}; got gather={gather!r}")
    return gather


def grad_scale(group, scale_grad_by_world_size):
    """The factor the local backward is multiplied by: N for DDP's averaging, else 1."""
    return dist.get_world_size(group) if scale_grad_by_world_size else 1


# --- Seeds all ranks agree on ----------------------------------------------------------


def step_seed(seed, step):
    """A 63-bit seed for step ``step`` of base seed ``seed`` (splitmix64 of the pair)."""
    x = (int(seed) + (int(step) + 1) * 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


def step_generator(seed, step, device):
    """The generator every rank draws step ``step``'s projections and target from."""
    generator = torch.Generator(device=device)
    generator.manual_seed(step_seed(seed, step))
    return generator


def broadcast_seed(group, device):
    """A base seed drawn by the group's rank 0 from torch's default CPU generator, sent to all."""
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64) if dist.get_rank(group) == 0 else torch.zeros(1, dtype=torch.int64)
    seed = seed.to(device)
    dist.broadcast(seed, src=dist.get_global_rank(group, 0), group=group)
    return int(seed.item())


class SeedStream:
    """A base seed and a step counter: one generator per call, the same on every rank.

    ``seed``: an int, or None to have the group's rank 0 draw one (from torch's default
    generator, so ``torch.manual_seed`` on rank 0 makes it reproducible) and broadcast it
    at the first draw. ``step`` counts the draws; save and restore both attributes to
    resume a run with the same directions. Every rank must draw in the same calls, which
    the collectives of the loss require anyway.
    """

    def __init__(self, seed=None):
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None; got {type(seed).__name__}")
        self.seed = seed
        self.step = 0

    def next_generator(self, device, group):
        if self.seed is None:
            self.seed = broadcast_seed(group, device)
        generator = step_generator(self.seed, self.step, device)
        self.step += 1
        return generator

    def __repr__(self):
        return f"SeedStream(seed={self.seed}, step={self.step})"


_default_streams = {}


def default_seed_stream(group):
    """The stream ``rectified_lpjepa_loss`` draws from for ``group`` (one per group per process)."""
    if group not in _default_streams:
        _default_streams[group] = SeedStream()
    return _default_streams[group]


def destroy_process_group(group=None):
    """``torch.distributed.destroy_process_group``, safe as a script's last call; a no-op when
    torch.distributed is not initialized.

    Every collective issued inside ``backward()`` (DDP's gradient all-reduce, this
    package's gathers) holds the backward's Python context. The backend's worker thread
    lets go of it only after the waiting rank has moved on, and needs the GIL to do so; if
    the interpreter is already exiting, that thread is stopped inside a C++ destructor and
    the process aborts ("terminate called without an active exception", SIGABRT). On
    torch 2.14 this ended about one run in five of a two-rank gloo script whose last
    step was a DDP backward, because DDP keeps the group (and its worker threads) alive
    past ``destroy_process_group``. Here every rank first meets the others at a barrier,
    then releases the GIL briefly so the worker threads finish, then destroys the group.
    Call it on every rank of ``group``, after the last collective (it is one itself).
    """
    if not _initialized():
        return
    dist.barrier(group=group)
    time.sleep(_WORKER_RELEASE_S)
    if group is None:
        _default_streams.clear()
    else:
        _default_streams.pop(group, None)
    dist.destroy_process_group(group)


# --- Differentiable collectives ---------------------------------------------------------

# torch 2.14 renamed all_gather_into_tensor to all_gather_single and warns on the old name.
_ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _all_gather_single(out, x, group):
    _ALL_GATHER_SINGLE(out, x, group=group)


class _AllReduceSum(torch.autograd.Function):
    """The sum over ranks; backward: the incoming gradient (d sum / d own term = 1), times scale."""

    @staticmethod
    def forward(ctx, x, group, scale):
        out = x.clone()
        dist.all_reduce(out, group=group)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        return (grad * ctx.scale if ctx.scale != 1 else grad), None, None


def batch_sizes(local_size, group, device):
    """Every rank's local batch size, in rank order (one all-gather of N int64)."""
    size = torch.tensor([local_size], dtype=torch.int64, device=device)
    sizes = size.new_empty(dist.get_world_size(group))
    _all_gather_single(sizes, size, group)
    return sizes.tolist()


def gather_batch(x, sizes, group, dim):
    """``x`` concatenated over the ranks of ``group`` along its batch dimension ``dim`` (no autograd).

    ``sizes`` are the local batch sizes (``batch_sizes``); uneven ones are zero-padded to
    the largest for the collective and cut back after it, so the result has sum(sizes)
    rows along ``dim`` in rank order. The loss's op gathers inside its forward and keeps
    this rank's rows of the residual for its backward, so no gradient flows through here.
    """
    rank = dist.get_rank(group)
    if x.shape[dim] != sizes[rank]:
        raise RuntimeError(f"rank {rank} has {x.shape[dim]} rows but announced {sizes[rank]}")
    largest = max(sizes)
    x = x.detach()
    if x.shape[dim] < largest:
        pad_shape = list(x.shape)
        pad_shape[dim] = largest - x.shape[dim]
        x = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
    x = x.contiguous()
    world = dist.get_world_size(group)
    gathered = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
    _all_gather_single(gathered, x, group)
    gathered = gathered.view((world,) + tuple(x.shape))
    return torch.cat([gathered[r].narrow(dim, 0, n) for r, n in enumerate(sizes)], dim=dim)


def global_mean(local_sum, local_count, group, scale=1):
    """sum over ranks of ``local_sum`` / sum over ranks of ``local_count`` (one all-reduce).

    Differentiable in ``local_sum``, whose gradient is multiplied by ``scale``.
    """
    stats = torch.stack([local_sum, local_sum.new_tensor(float(local_count))])
    total = _AllReduceSum.apply(stats, group, scale)
    return total[0] / total[1]


def from_first_rank(compute, shape, dtype, device, group):
    """``compute()`` on the group's rank 0, broadcast to every rank (a (shape) tensor of dtype on device).

    For a value every rank could compute from the same inputs, but whose bits must agree
    everywhere (an SVD may differ in its last bits between processes): the other ranks
    only receive it.
    """
    if dist.get_rank(group) == 0:
        out = compute().contiguous()
    else:
        out = torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(out, src=dist.get_global_rank(group, 0), group=group)
    return out


# --- What to gather ---------------------------------------------------------------------


def gathers_features(gather, num_projections, dim, compute_dtype, feature_dtype):
    """True to gather the features, False to gather their projections (see the module doc)."""
    if gather != "auto":
        return gather == "features"
    return num_projections * compute_dtype.itemsize > dim * feature_dtype.itemsize
