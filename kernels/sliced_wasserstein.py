"""Sliced-Wasserstein forward of the RDMReg loss: Triton kernels and their launchers.

For V views of B features (V, B, D), T target batches (T, B, D) (T = 1: one target shared
by the views; T = V: a target per view) and K unit directions P (K, D), the loss is the
mean over views of the seed's ``rdmreg_loss``::

    loss = mean over v, k, b of (sort(P z_v^T)[k, b] - sort(P t_v^T)[k, b]) ** 2

computed in two steps, each with two implementations (a *path*) that a caller picks:

1. **Projection**, ``project_plan``: (S, B, D) rows and (K, D) directions -> (S, K, B)
   fp32 projections, direction-major so that each later sort reads one contiguous row.
   ``'triton'``: ``_project_kernel``, a tiled ``tl.dot`` (tensor cores: fp16 / bf16 inputs,
   and fp32 inputs as TF32 when ``allow_tf32``; IEEE fp32 on the FMA units otherwise)
   accumulating in fp32. ``'cublas'``: torch's batched matmul with an fp32 output.
2. **Sort and residual**, ``sort_residual_plan``: (V, K, B) view projections against
   (T, K, B) target projections -> the loss, and the residuals the backward needs, in
   the batch's original row order::

       residual[v, k, b] = proj[v, k, b] - sorted(proj_t[v or 0, k])[rank of b in proj[v, k]]

   so that d loss / d proj = 2 / (V K B) * residual. ``'registers'``:
   ``_sort_residual_kernel``, one program per ``ROWS`` directions that sorts each
   direction's target once in registers and every view against it (``tl.sort`` on int64
   keys: an order-preserving int32 image of the fp32 value in the high word, the row
   index in the low word, so the sort is an argsort), for B up to ``register_sort_max_batch()``
   (half that with the target's residual).
   ``'torch_sort'``: ``torch.sort`` (stable, with indices) and ``_residual_kernel``, any B.

Either way each program writes one partial sum of squares, which ``_mean_of_partials_kernel``
reduces in a fixed order (one program), so the same inputs give a bit-identical loss.
The batch is padded to a power of two with keys that sort after every real value (NaN
included), and padded positions never reach the loss or the residuals. Ties are broken
by row index (registers) or stably (torch_sort); the loss does not depend on it.

Which path is fastest depends on the GPU and the shape; ``lpjepa.ops.path_choice`` times
them on first use, and ``default_paths`` is the choice without a measurement.
"""
import functools

import torch
import triton
import triton.language as tl

from .launch import KERNEL_DTYPES, KernelLaunch, cdiv, check_kernel_dtype, device_arch, has_tensor_core_dot, next_power_of_2

PROJECTION_PATHS = ("triton", "cublas")
SORT_PATHS = ("registers", "torch_sort")

# Keys of the (ROWS, B_PAD) sort block per thread: enough work per thread to hide latency,
# few enough registers never to spill under the 128-register cap of 16 warps. With the
# target's residual the sorted target, its rows and its summed residual stay live across
# the views, so a thread holds half as many keys. Checked by
# `python -m benchmarks.compile_report` on sm_75 to sm_120.
_SORT_KEYS_PER_THREAD = 8
_SORT_KEYS_PER_THREAD_WITH_TARGET_RESIDUAL = 4
_SORT_MAX_WARPS = 16

# Programs the sort grid aims for before packing several directions into one program:
# two per SM of an H100 (132 SMs), so that every SM has work from the seed's K = 256 up.
_SORT_MIN_PROGRAMS = 264

# tl.dot needs every dimension >= 16.
_MIN_DOT = 16

# High word of the key of a padded row: above the image of every float, +NaN included.
_PAD_HIGH = tl.constexpr(0x7FFFFFFF)


# --- Projection -------------------------------------------------------------------------


@triton.jit
def _output_tile(pid, n_outer, n_inner, BLOCK_OUTER: tl.constexpr, BLOCK_INNER: tl.constexpr):
    """(outer indices, inner indices, their masks) of program ``pid``'s block of a (n_outer, n_inner) output.

    Programs walk the inner blocks of one outer block before the next, so consecutive
    programs share the outer block's operand tile.
    """
    tiles_inner = tl.cdiv(n_inner, BLOCK_INNER)
    outer = (pid // tiles_inner) * BLOCK_OUTER + tl.arange(0, BLOCK_OUTER)
    inner = (pid % tiles_inner) * BLOCK_INNER + tl.arange(0, BLOCK_INNER)
    return outer, inner, outer < n_outer, inner < n_inner


@triton.jit
def _project_kernel(
    x_ptr,  # (S, B, D) fp32 / fp16 / bf16, any strides; or the first (B, D) source when SOURCE_POINTERS > 1
    x1_ptr,  # the second (B, D) source when SOURCE_POINTERS > 1, else None
    x2_ptr,  # the third (B, D) source when SOURCE_POINTERS == 3, else None
    p_ptr,  # (S, K, D) in x's dtype, any strides (stride 0 along S: one set of directions for every source)
    out_ptr,  # (S, K, B) fp32 contiguous, written
    B, D, K,
    stride_xs, stride_xb, stride_xd, stride_ps, stride_pk, stride_pd,
    BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    SOURCE_POINTERS: tl.constexpr,  # 1: one stacked x; 2 or 3: that many (B, D) tensors of one dtype and strides
):
    """out[s, k, b] = P[s, k] . x[s, b] for one (BLOCK_K, BLOCK_B) tile of one source s."""
    source = tl.program_id(1).to(tl.int64)
    # Consecutive programs share a block of directions, so its P tile stays in L2.
    dirs, rows, dir_ok, row_ok = _output_tile(tl.program_id(0), K, B, BLOCK_K, BLOCK_B)
    # Separate sources spare the caller a stacked copy of the views and the target (a launch per step).
    if SOURCE_POINTERS == 1:
        x_source = x_ptr + source * stride_xs
    else:
        x_source = x_ptr
        if source == 1:
            x_source = x1_ptr
        if SOURCE_POINTERS == 3:
            if source == 2:
                x_source = x2_ptr
    x_rows = x_source + rows[:, None].to(tl.int64) * stride_xb
    p_rows = p_ptr + source * stride_ps + dirs[:, None].to(tl.int64) * stride_pk
    acc = tl.zeros((BLOCK_K, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        p = tl.load(p_rows + cols[None, :] * stride_pd, mask=dir_ok[:, None] & col_ok[None, :], other=0.0)
        x = tl.load(x_rows + cols[None, :] * stride_xd, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(p, tl.trans(x), acc, input_precision=INPUT_PRECISION)
    out = out_ptr + source * K * B + dirs[:, None].to(tl.int64) * B + rows[None, :]
    tl.store(out, acc, mask=dir_ok[:, None] & row_ok[None, :])


def input_precision(dtype, allow_tf32, arch=None):
    """The tl.dot input precision for operands of ``dtype``: TF32 only for fp32 with ``allow_tf32``, from sm_80 on.

    Turing (sm_75) has no TF32: there, as in cuBLAS, fp32 is IEEE whatever torch allows.
    """
    return "tf32" if dtype == torch.float32 and allow_tf32 and has_tensor_core_dot(arch) else "ieee"


@functools.lru_cache(maxsize=None)
def project_config(sources, batch, dim, num_projections, dtype, allow_tf32, arch=None):
    """Meta-parameters of _project_kernel: dict(BLOCK_K, BLOCK_B, BLOCK_D, INPUT_PRECISION, num_warps, num_stages).

    arch: the GPU's compute capability (``device_arch``); None takes the sm_80+ tiles.
    From sm_80: tensor-core tiles of 128 x 128 (64 x 64 when 128 x 128 would leave fewer
    programs than half an H100's SMs, or when the batch or K is small), a D step of 64
    fp16 / bf16 or 32 fp32 (TF32) elements, 8 warps, 3 pipeline stages. IEEE fp32 runs on
    the FMA units, whose operand registers grow with every dimension of the tile: 64 x 64
    x 16 on 4 warps. Below sm_80 Triton emits no tensor-core instruction for any dtype, so
    every dtype takes an FMA tile, 64 x 64 x 16 on 8 warps: the largest that does not spill
    on sm_75 with fp16 / bf16 operands (128 registers; the sm_80 tiles spill 364 B to 16 KB
    there; ``compile_report --arch 75``). cuBLAS, the default there, uses the tensor cores.
    """
    _, block_k, block_b, block_d, precision, num_warps = _dot_tiles(
        sources, num_projections, batch, dim, dtype, allow_tf32, arch, 32 if dtype == torch.float32 else 64)
    return dict(BLOCK_K=block_k, BLOCK_B=block_b, BLOCK_D=block_d, INPUT_PRECISION=precision,
                num_warps=num_warps, num_stages=3)


def _dot_tiles(sources, rows, cols, reduction, dtype, allow_tf32, arch, tensor_core_step):
    """The tiles of a tl.dot kernel writing (sources, rows, cols) blocks summed over ``reduction``.

    Returns (the square tile's side before clipping, block over rows, block over cols,
    step over the reduction, tl.dot input precision, num_warps): the choices
    ``project_config`` and ``project_backward_config`` share. From sm_80 with tensor-core
    operands: 128 x 128, or 64 x 64 when 128 x 128 leaves fewer programs than half an
    H100's SMs or a side is small; ``tensor_core_step`` along the reduction; 8 warps (with
    4, sm_80's 64 x 64 tile spills: compile_report). IEEE fp32 on the FMA units: 64 x 64 x
    16 on 4 warps. Below sm_80 every dtype: 64 x 64 x 16 on 8 warps. Each block is then
    clipped to the next power of two of its size (tl.dot needs 16 at least).
    """
    precision = input_precision(dtype, allow_tf32, arch)
    if not has_tensor_core_dot(arch):
        side, step, num_warps = 64, _MIN_DOT, 8
    elif dtype == torch.float32 and precision == "ieee":
        side, step, num_warps = 64, _MIN_DOT, 4
    else:
        side = 128
        tiles = cdiv(rows, 128) * cdiv(cols, 128) * sources
        if tiles < _SORT_MIN_PROGRAMS // 2 or min(rows, cols) <= 64:
            side = 64
        step, num_warps = tensor_core_step, 8
    return (side, min(side, max(_MIN_DOT, next_power_of_2(rows))), min(side, max(_MIN_DOT, next_power_of_2(cols))),
            min(step, max(_MIN_DOT, next_power_of_2(reduction))), precision, num_warps)


# The most (B, D) sources the projection kernel reads through pointers of their own: two views and a target.
MAX_SOURCE_POINTERS = 3


def source_shape(x):
    """(S, B, D) of the projection's input: a stacked (S, B, D) tensor, or a tuple of S (B, D) tensors."""
    if isinstance(x, tuple):
        return (len(x), *x[0].shape)
    return tuple(x.shape)


def _check_projection_inputs(x, projections):
    if isinstance(x, tuple):
        first = x[0]
        if not 2 <= len(x) <= MAX_SOURCE_POINTERS or any(
            t.dim() != 2 or t.shape != first.shape or t.stride() != first.stride() or t.dtype != first.dtype
            or t.device != first.device for t in x
        ):
            raise ValueError(
                f"separate sources must be 2 to {MAX_SOURCE_POINTERS} (B, D) tensors of one shape, strides, dtype "
                f"and device; got {[(tuple(t.shape), t.stride(), t.dtype) for t in x]}: stack them instead"
            )
        x = first[None]
    shared = projections.dim() == 2
    if x.dim() != 3 or projections.dim() not in (2, 3) or projections.shape[-1] != x.shape[2] or (
        not shared and projections.shape[0] != x.shape[0]
    ):
        raise ValueError(
            f"x must be (S, B, D) and projections (K, D) or (S, K, D); got {tuple(x.shape)} and {tuple(projections.shape)}"
        )
    if min(x.shape) < 1 or projections.shape[-2] < 1:
        raise ValueError("S, B, D and K must all be >= 1")
    check_kernel_dtype("x", x)
    if projections.dtype != x.dtype or projections.device != x.device:
        raise ValueError(f"projections must be {x.dtype} on {x.device} like x; got {projections.dtype} on {projections.device}")


def _as_per_source(x, projections):
    """(S, K, D) directions: a shared (K, D) set expanded without a copy (stride 0 along S)."""
    return projections.expand(x.shape[0], -1, -1) if projections.dim() == 2 else projections


def bf16_as_fp32(dtype, arch):
    """Whether bf16 operands are computed as fp32 ones: below sm_80, which has no bf16 arithmetic.

    bf16 -> fp32 is exact and so is the product of two bf16 values in fp32, so fp32
    operands give the sum the tensor cores would accumulate in fp32, on the FMA units,
    instead of an emulated bf16 matmul.
    """
    return dtype == torch.bfloat16 and not has_tensor_core_dot(arch)


def _cublas_projection(x, projections, arch=None):
    """(S, K, B) fp32 = P[s] @ x[s]^T by torch: TF32 per torch's setting for fp32, fp32 output for fp16 / bf16.

    bf16 below sm_80 (``bf16_as_fp32``) and every dtype off CUDA multiply fp32 copies.
    """
    P = _as_per_source(x, projections)
    if x.dtype == torch.float32:
        return torch.bmm(P, x.transpose(1, 2))
    if bf16_as_fp32(x.dtype, arch):
        return torch.bmm(P.float(), x.float().transpose(1, 2))
    if x.device.type == "cuda" or x.device.type == "meta":
        return torch.bmm(P, x.transpose(1, 2), out_dtype=torch.float32)
    # No fp16 -> fp32 bmm off CUDA: the fp16 / bf16 products are exact in fp32, so this is
    # the same sum (the Triton interpreter's tests use it as the cuBLAS path's stand-in).
    return torch.bmm(P.float(), x.float().transpose(1, 2))


@functools.lru_cache(maxsize=None)
def _project_meta(sources, batch, dim, num_projections, dtype, allow_tf32, arch, source_pointers):
    """(grid, meta) of one projection launch: ``project_config`` and the kernel's source layout."""
    cfg = project_config(sources, batch, dim, num_projections, dtype, allow_tf32, arch)
    grid = (cdiv(num_projections, cfg["BLOCK_K"]) * cdiv(batch, cfg["BLOCK_B"]), sources)
    return grid, dict(cfg, SOURCE_POINTERS=source_pointers)


def project_plan(x, projections, *, path="triton", allow_tf32=False, arch=None, check=True):
    """The (S, K, B) fp32 projections of ``x`` onto ``projections``, and the launches that fill them.

    x: a (S, B, D) tensor, or a tuple of S = 2 or 3 (B, D) tensors of one shape, strides and
    dtype (``MAX_SOURCE_POINTERS``), which the kernel reads where they lie: the loss's two
    views and its target need no stacked copy. projections: (K, D), shared by the S
    sources, or (S, K, D), a set per source. Both in one dtype (fp32, fp16 or bf16; the
    caller rounds the directions to the features' dtype, as autocast does). path: 'triton'
    (the kernel) or 'cublas' (torch's matmul, computed here; no launch). arch: the compute
    capability whose tiles to take (``project_config``); None: x's device's
    (``device_arch``). Works on ``meta`` tensors, for the compile report. ``check=False``
    skips the checks of the inputs, for a caller that made them (the loss's op, at every
    step). Returns ``(out, [KernelLaunch, ...])``.
    """
    if check:
        _check_projection_inputs(x, projections)
        if path not in PROJECTION_PATHS:
            raise ValueError(f"path must be one of {PROJECTION_PATHS}; got {path!r}")
    separate = isinstance(x, tuple)
    first = x[0] if separate else x
    sources, batch, dim = source_shape(x)
    num_projections = projections.shape[-2]
    arch = device_arch(first.device) if arch is None else arch
    if path == "cublas":
        return _cublas_projection(torch.stack(x) if separate else x, projections, arch), []
    # size= as a keyword: a positional shape tuple costs torch's argument parser 0.4 us more a call (measured).
    out = torch.empty(size=(sources, num_projections, batch), dtype=torch.float32, device=first.device)
    grid, meta = _project_meta(sources, batch, dim, num_projections, first.dtype, allow_tf32, arch,
                               sources if separate else 1)
    # Shared (K, D) directions are read with a zero stride along the sources: no expanded view to make.
    p_strides = projections.stride() if projections.dim() == 3 else (0, *projections.stride())
    if separate:
        pointers = (x[0], x[1], x[2] if sources == 3 else None)
        x_strides = (0, *first.stride())
    else:  # no tensor passed twice: a traced launch (torch.compile) takes every tensor argument as its own buffer
        pointers = (x, None, None)
        x_strides = x.stride()
    args = (*pointers, projections, out, batch, dim, num_projections, *x_strides, *p_strides)
    return out, [KernelLaunch(_project_kernel, grid, args, meta)]


# --- Sort and residual ------------------------------------------------------------------


@triton.jit
def _orderable(x):
    """fp32 -> int32 whose signed order is the float order (-0 < +0, -NaN first, +NaN last).

    Negative floats have their magnitude bits flipped; the map is its own inverse.
    """
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _from_orderable(key32):
    """Inverse of _orderable."""
    return (key32 ^ ((key32 >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _argsort_rows(values, cols, valid):
    """Sorts each row of a (ROWS, B_PAD) fp32 block; returns (sorted values, the column each came from).

    Padded columns (valid False) sort last. The key is (orderable value, column), so
    ties go to the lower column.
    """
    high = tl.where(valid, _orderable(values), _PAD_HIGH)
    keys = tl.sort((high.to(tl.int64) << 32) | cols[None, :].to(tl.int64))
    # int64 -> int32 truncation keeps the low word, the column.
    return _from_orderable((keys >> 32).to(tl.int32)), keys.to(tl.int32)


@triton.jit
def _sort_target(t_ptrs, cols, valid, NEED_TARGET_RESIDUAL: tl.constexpr):
    """(sorted values, source columns) of a block of target projections; the columns only when needed."""
    proj_t = tl.load(t_ptrs, mask=valid, other=0.0)
    if NEED_TARGET_RESIDUAL:
        t_sorted, t_cols = _argsort_rows(proj_t, cols, valid)
    else:
        t_sorted = _from_orderable(tl.sort(tl.where(valid, _orderable(proj_t), _PAD_HIGH)))
        t_cols = cols[None, :]  # unused
    return t_sorted, t_cols


@triton.jit
def _sort_residual_kernel(
    proj_ptr,  # (V, K, B) fp32 contiguous: the views' projections
    proj_t_ptr,  # (T, K, B) fp32 contiguous: the targets' projections, T = 1 (shared) or V
    res_ptr,  # (V, K, B) fp32, written
    res_t_ptr,  # (T, K, B) fp32, written when NEED_TARGET_RESIDUAL
    partial_ptr,  # (cdiv(K, ROWS),) fp32: each program's sum of squared residuals
    B, K, V,
    residual_scale,  # fp32: the residuals are stored times this (the loss's own sum is not)
    ROWS: tl.constexpr,
    B_PAD: tl.constexpr,
    SHARED_TARGET: tl.constexpr,
    NEED_TARGET_RESIDUAL: tl.constexpr,
):
    pid = tl.program_id(0)
    dirs = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, B_PAD)
    # Sorted position < B holds a real row on both sides: padding sorts last.
    valid = (dirs < K)[:, None] & (cols < B)[None, :]
    row_starts = dirs[:, None].to(tl.int64) * B
    plane = tl.cast(K, tl.int64) * B
    sum_sq = tl.zeros((), dtype=tl.float32)
    if SHARED_TARGET:
        # One sort of the target serves every view.
        t_sorted, t_cols = _sort_target(proj_t_ptr + row_starts + cols[None, :], cols, valid, NEED_TARGET_RESIDUAL)
        t_residual = tl.zeros((ROWS, B_PAD), dtype=tl.float32)
    for v in range(V):
        if not SHARED_TARGET:
            t_sorted, t_cols = _sort_target(proj_t_ptr + v * plane + row_starts + cols[None, :], cols, valid,
                                            NEED_TARGET_RESIDUAL)
        proj = tl.load(proj_ptr + v * plane + row_starts + cols[None, :], mask=valid, other=0.0)
        z_sorted, z_cols = _argsort_rows(proj, cols, valid)
        diff = tl.where(valid, z_sorted - t_sorted, 0.0)
        tl.store(res_ptr + v * plane + row_starts + z_cols, diff * residual_scale, mask=valid)
        if NEED_TARGET_RESIDUAL:
            if SHARED_TARGET:
                t_residual -= diff
            else:
                tl.store(res_t_ptr + v * plane + row_starts + t_cols, -diff * residual_scale, mask=valid)
        sum_sq += tl.sum(tl.sum(diff * diff, axis=1), axis=0)
    if NEED_TARGET_RESIDUAL and SHARED_TARGET:
        tl.store(res_t_ptr + row_starts + t_cols, t_residual * residual_scale, mask=valid)
    tl.store(partial_ptr + pid, sum_sq)


@triton.jit
def _residual_kernel(
    sorted_ptr, cols_ptr,  # (V, K, B) fp32, (V, K, B) int64: the views' projections sorted along B
    t_sorted_ptr, t_cols_ptr,  # (T, K, B) fp32, (T, K, B) int64 (the columns read when NEED_TARGET_RESIDUAL)
    res_ptr, res_t_ptr,  # (V, K, B), (T, K, B) fp32, written
    partial_ptr,  # (cdiv(K, BLOCK_K) * cdiv(B, BLOCK_B),) fp32
    B, K, V,
    residual_scale,  # fp32: the residuals are stored times this (the loss's own sum is not)
    BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr,
    SHARED_TARGET: tl.constexpr,
    NEED_TARGET_RESIDUAL: tl.constexpr,
):
    """The torch_sort path's residuals: sorted positions of a (BLOCK_K, BLOCK_B) tile, every view."""
    pid_k = tl.program_id(0)
    pid_b = tl.program_id(1)
    dirs = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    pos = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    valid = (dirs < K)[:, None] & (pos < B)[None, :]
    row_starts = dirs[:, None].to(tl.int64) * B
    offs = row_starts + pos[None, :]
    plane = tl.cast(K, tl.int64) * B
    sum_sq = tl.zeros((), dtype=tl.float32)
    if SHARED_TARGET:
        t_sorted = tl.load(t_sorted_ptr + offs, mask=valid, other=0.0)
        t_residual = tl.zeros((BLOCK_K, BLOCK_B), dtype=tl.float32)
    for v in range(V):
        if not SHARED_TARGET:
            t_sorted = tl.load(t_sorted_ptr + v * plane + offs, mask=valid, other=0.0)
        diff = tl.load(sorted_ptr + v * plane + offs, mask=valid, other=0.0) - t_sorted
        z_cols = tl.load(cols_ptr + v * plane + offs, mask=valid, other=0)
        tl.store(res_ptr + v * plane + row_starts + z_cols, diff * residual_scale, mask=valid)
        if NEED_TARGET_RESIDUAL:
            if SHARED_TARGET:
                t_residual -= diff
            else:
                t_cols = tl.load(t_cols_ptr + v * plane + offs, mask=valid, other=0)
                tl.store(res_t_ptr + v * plane + row_starts + t_cols, -diff * residual_scale, mask=valid)
        sum_sq += tl.sum(tl.sum(diff * diff, axis=1), axis=0)
    if NEED_TARGET_RESIDUAL and SHARED_TARGET:
        t_cols = tl.load(t_cols_ptr + offs, mask=valid, other=0)
        tl.store(res_t_ptr + row_starts + t_cols, t_residual * residual_scale, mask=valid)
    tl.store(partial_ptr + pid_k * tl.num_programs(1) + pid_b, sum_sq)


@triton.jit
def _mean_of_partials_kernel(partial_ptr, out_ptr, n_partials, count, BLOCK: tl.constexpr):
    """out[()] = sum(partials) / count, summed in one fixed order (one program)."""
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n_partials, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + offs, mask=offs < n_partials, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0) / count)


def _sort_keys_per_thread(need_target_residual):
    return _SORT_KEYS_PER_THREAD_WITH_TARGET_RESIDUAL if need_target_residual else _SORT_KEYS_PER_THREAD


def register_sort_max_batch(need_target_residual=False):
    """The largest batch the register sort takes (larger ones take torch.sort): 16 warps of 32 threads,
    each holding its share of keys."""
    return 32 * _SORT_MAX_WARPS * _sort_keys_per_thread(need_target_residual)


def sort_paths_for(batch, need_target_residual=False):
    """The sort paths that take a batch of ``batch`` rows: both while the register sort fits, else 'torch_sort'."""
    return SORT_PATHS if batch <= register_sort_max_batch(need_target_residual) else ("torch_sort",)


@functools.lru_cache(maxsize=None)
def sort_config(batch, num_projections, need_target_residual=False):
    """Meta-parameters of _sort_residual_kernel: dict(ROWS, B_PAD, num_warps).

    One direction per program while that leaves fewer than ``_SORT_MIN_PROGRAMS``
    programs (the seed's K = 256 gives 256); with more directions, small batches pack
    several directions into a program, as many as 16 warps hold. Warps give each thread
    its share of keys (1 to 16 warps).
    """
    keys = _sort_keys_per_thread(need_target_residual)
    block_max = register_sort_max_batch(need_target_residual)
    b_pad = max(_MIN_DOT, next_power_of_2(batch))
    rows = max(1, block_max // b_pad)
    while rows > 1 and cdiv(num_projections, rows) < _SORT_MIN_PROGRAMS:
        rows //= 2
    num_warps = max(1, min(_SORT_MAX_WARPS, rows * b_pad // (32 * keys)))
    return dict(ROWS=rows, B_PAD=b_pad, num_warps=num_warps)


@functools.lru_cache(maxsize=None)
def residual_config(batch, num_projections):
    """Meta-parameters of _residual_kernel: dict(BLOCK_K, BLOCK_B, num_warps).

    Blocks of up to 2048 elements on 8 warps, 8 a thread: with 4 warps (16 a thread) the
    target-residual variant spills on sm_100 (``compile_report``).
    """
    block_b = max(16, min(1024, next_power_of_2(batch)))
    block_k = max(1, min(16, 2048 // block_b))
    return dict(BLOCK_K=block_k, BLOCK_B=block_b, num_warps=8 if block_k * block_b >= 2048 else 4)


_MEAN_META = dict(BLOCK=256, num_warps=4)


def _mean_launch(partials, count, loss):
    return KernelLaunch(_mean_of_partials_kernel, (1,), (partials, loss, partials.numel(), float(count)), _MEAN_META)


@functools.lru_cache(maxsize=None)
def _register_sort_meta(batch, num_projections, need_target_residual, shared, rows=None):
    """(grid, meta) of a register sort launch: ``sort_config`` with ``rows`` if given, and the kernel's flags."""
    cfg = sort_config(batch, num_projections, need_target_residual)
    meta = dict(cfg, ROWS=cfg["ROWS"] if rows is None else rows, SHARED_TARGET=shared,
                NEED_TARGET_RESIDUAL=need_target_residual)
    return (cdiv(num_projections, meta["ROWS"]),), meta


def _check_sort_inputs(proj, proj_t):
    if proj.dim() != 3 or proj_t.dim() != 3 or proj_t.shape[1:] != proj.shape[1:]:
        raise ValueError(f"proj must be (V, K, B) and proj_t (T, K, B); got {tuple(proj.shape)} and {tuple(proj_t.shape)}")
    if proj_t.shape[0] not in (1, proj.shape[0]) or min(proj.shape) < 1:
        raise ValueError(f"proj_t must hold 1 or V = {proj.shape[0]} targets and V, K, B >= 1; got {tuple(proj_t.shape)}")
    if proj.shape[2] >= 2**31:
        raise ValueError("the sort key holds the row index in 32 bits: B must be < 2**31")
    for name, t in (("proj", proj), ("proj_t", proj_t)):
        if t.dtype != torch.float32 or not t.is_contiguous() or t.device != proj.device:
            raise ValueError(f"{name} must be a contiguous fp32 tensor on {proj.device}")


def sort_residual_plan(proj, proj_t, *, need_target_residual=False, path="registers", rows=None, check=True,
                       unused=None, residual_scale=1.0, in_place=False):
    """The loss and residuals of ``proj`` (V, K, B) against ``proj_t`` (T, K, B), and the launches that fill them.

    Both fp32 and contiguous (what ``project_plan`` writes). path: 'registers' (B up to
    ``register_sort_max_batch(need_target_residual)``) or 'torch_sort' (any B; torch.sort runs here). Returns
    ``((loss, residual, residual_target), [KernelLaunch, ...])``: loss a 0-dim fp32 tensor,
    the mean over V, K, B of the squared residual; residual (V, K, B) fp32 in the views'
    row order; residual_target (T, K, B) fp32 in the targets' row order with the sign of
    its gradient (for a shared target, summed over the views), or None unless asked for.
    rows: directions per register-sort program (default: ``sort_config``'s choice). Works
    on ``meta`` tensors too. ``check=False`` skips the checks of the inputs (the loss's op
    made them); ``unused``: a one-element fp32 tensor on the device to pass where the
    target's residual is not asked for (default: a new one; an eager caller may keep one).
    ``residual_scale``: both residuals are returned times this (the loss's op passes
    2 / numel, so that they are the loss's gradient in the projections); the loss is not.
    ``in_place``: the residual is written over ``proj`` (a caller that owns it saves a (V,
    K, B) buffer: each program reads its rows whole before it writes them, and the
    torch_sort path reads sorted copies). Not for a traced launch, whose outputs may not
    alias its inputs.
    """
    if check:
        _check_sort_inputs(proj, proj_t)
        if path not in SORT_PATHS:
            raise ValueError(f"path must be one of {SORT_PATHS}; got {path!r}")
    views, num_projections, batch = proj.shape
    if check and path == "registers" and batch > register_sort_max_batch(need_target_residual):
        raise ValueError(
            f"the register sort takes B <= {register_sort_max_batch(need_target_residual)}"
            f"{' with the target residual' if need_target_residual else ''}; got B = {batch}: use path='torch_sort'"
        )
    device = proj.device
    shared = proj_t.shape[0] == 1
    loss = torch.empty(size=(), dtype=torch.float32, device=device)  # size= keyword: see project_plan
    residual = proj if in_place else torch.empty_like(proj)
    residual_t = torch.empty_like(proj_t) if need_target_residual else None
    # Never written unless needed. A buffer of its own, not residual: under torch.compile
    # two kernel arguments aliasing one tensor confuse the functionalized launch.
    if not need_target_residual:
        residual_t_arg = torch.empty(1, dtype=torch.float32, device=device) if unused is None else unused
    else:
        residual_t_arg = residual_t
    if path == "registers":
        grid, meta = _register_sort_meta(batch, num_projections, need_target_residual, shared, rows)
        partials = torch.empty(grid[0], dtype=torch.float32, device=device)
        args = (proj, proj_t, residual, residual_t_arg, partials, batch, num_projections, views, float(residual_scale))
        main = KernelLaunch(_sort_residual_kernel, grid, args, meta)
    else:
        # Stable, so ties keep their order and repeated calls give the same residual.
        z_sorted, z_cols = torch.sort(proj, dim=2, stable=True)
        t_sorted, t_cols = torch.sort(proj_t, dim=2, stable=True)
        cfg = residual_config(batch, num_projections)
        grid = (cdiv(num_projections, cfg["BLOCK_K"]), cdiv(batch, cfg["BLOCK_B"]))
        partials = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=device)
        args = (z_sorted, z_cols, t_sorted, t_cols, residual, residual_t_arg, partials, batch, num_projections, views,
                float(residual_scale))
        main = KernelLaunch(_residual_kernel, grid, args,
                            dict(cfg, SHARED_TARGET=shared, NEED_TARGET_RESIDUAL=need_target_residual))
    launches = [main, _mean_launch(partials, views * num_projections * batch, loss)]
    return (loss, residual, residual_t), launches


def default_paths(batch, need_target_residual=False, arch=None):
    """(projection path, sort path) without a measurement: the Triton kernels wherever the register sort fits.

    Below sm_80 (arch, ``device_arch``; None: sm_80+) the projection is cuBLAS: Triton's
    tl.dot runs on the FMA units there, cuBLAS on the tensor cores (fp16) or as fast.
    """
    projection = "triton" if has_tensor_core_dot(arch) else "cublas"
    return projection, sort_paths_for(batch, need_target_residual)[0]


def sliced_wasserstein_forward(views, targets, projections, *, need_target_residual=False, allow_tf32=False,
                               paths=None):
    """The loss of ``views`` (V, B, D) against ``targets`` (T, B, D) along ``projections`` (K, D), eagerly.

    A convenience over ``project_plan`` and ``sort_residual_plan`` for tests and
    benchmarks: everything in one dtype, ``paths`` = (projection path, sort path)
    (default ``default_paths(B)`` for views' device). Returns ``(loss, residual, residual_target)`` as
    ``sort_residual_plan`` does.
    """
    project_path, sort_path = paths or default_paths(views.shape[1], need_target_residual, device_arch(views.device))
    proj, launches = project_plan(views, projections, path=project_path, allow_tf32=allow_tf32)
    proj_t, target_launches = project_plan(targets, projections, path=project_path, allow_tf32=allow_tf32)
    for launch in launches + target_launches:
        launch()
    outputs, launches = sort_residual_plan(proj, proj_t, need_target_residual=need_target_residual, path=sort_path)
    for launch in launches:
        launch()
    return outputs


# --- Projection backward ----------------------------------------------------------------


@triton.jit
def _project_backward_kernel(
    res_ptr,  # (S, K, B) fp32, any strides: the projections' gradient before the loss's gradient
    p_ptr,  # (S, K, D) fp32 / fp16 / bf16, any strides (stride 0 along S: one set of directions for every source)
    scale_ptr,  # one element: the loss's gradient, read here so that the host never syncs on it
    out_ptr,  # (S, B, D) contiguous, written in its own dtype
    B, D, K,
    stride_rs, stride_rk, stride_rb, stride_ps, stride_pk, stride_pd,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """out[s, b, d] = scale * sum_k residual[s, k, b] P[s, k, d] for one (BLOCK_B, BLOCK_D) tile of one source s.

    The residual is rounded to P's dtype before the product, as the torch formula rounds
    the gradient to the operand dtype; the sum is fp32 and rounded once, at the store.
    """
    source = tl.program_id(1).to(tl.int64)
    # Consecutive programs share a block of rows, so its residual tile stays in L2.
    rows, cols, row_ok, col_ok = _output_tile(tl.program_id(0), B, D, BLOCK_B, BLOCK_D)
    r_rows = res_ptr + source * stride_rs + rows[None, :].to(tl.int64) * stride_rb
    p_cols = p_ptr + source * stride_ps + cols[None, :].to(tl.int64) * stride_pd
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        dirs = k0 + tl.arange(0, BLOCK_K)
        dir_ok = dirs < K
        # (BLOCK_K, BLOCK_B): B is the residual's contiguous dimension.
        r = tl.load(r_rows + dirs[:, None].to(tl.int64) * stride_rk, mask=dir_ok[:, None] & row_ok[None, :], other=0.0)
        p = tl.load(p_cols + dirs[:, None].to(tl.int64) * stride_pk, mask=dir_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(r.to(p.dtype)), p, acc, input_precision=INPUT_PRECISION)
    acc = acc * tl.load(scale_ptr).to(tl.float32)
    out = out_ptr + source * B * D + rows[:, None].to(tl.int64) * D + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@functools.lru_cache(maxsize=None)
def project_backward_config(sources, batch, dim, num_projections, dtype, allow_tf32, arch=None):
    """Meta-parameters of _project_backward_kernel: dict(BLOCK_B, BLOCK_D, BLOCK_K, INPUT_PRECISION, num_warps,
    num_stages).

    dtype: the directions' (the operands'). The tiles of ``project_config`` with the
    reduction over K instead of D: from sm_80 tensor-core tiles of 128 x 128 (64 x 64 when
    128 x 128 leaves fewer programs than half an H100's SMs, or the batch or D is small),
    a K step of 32 for every dtype (the residual's fp32 tile is staged in shared memory
    before its rounding, so fp16 / bf16 cannot take the forward's 64: 3 stages of it would
    pass sm_86's 99 KB), 8 warps, 3 stages (2 for the 128 x 128 fp16 / bf16 tile, whose
    staged fp32 tile and its rounding spill 4 B at sm_120's 128 registers with 3). IEEE fp32
    on the FMA units: 64 x 64 x 16 on 4 warps. Below sm_80 every dtype runs on the FMA
    units: 64 x 64 x 16 on 8 warps. Checked by ``compile_report`` on sm_75 to sm_120: no spill.
    """
    side, block_b, block_d, block_k, precision, num_warps = _dot_tiles(
        sources, batch, dim, num_projections, dtype, allow_tf32, arch, 32)
    num_stages = 2 if side == 128 and dtype != torch.float32 else 3
    return dict(BLOCK_B=block_b, BLOCK_D=block_d, BLOCK_K=block_k, INPUT_PRECISION=precision,
                num_warps=num_warps, num_stages=num_stages)


def _check_project_backward_inputs(residual, directions, scale, out_dtype):
    if residual.dim() != 3 or directions.dim() not in (2, 3) or directions.shape[-2] != residual.shape[1] or (
        directions.dim() == 3 and directions.shape[0] != residual.shape[0]
    ):
        raise ValueError(f"residual must be (S, K, B) and directions (K, D) or (S, K, D); "
                         f"got {tuple(residual.shape)} and {tuple(directions.shape)}")
    if min(residual.shape) < 1 or directions.shape[-1] < 1:
        raise ValueError("S, K, B and D must all be >= 1")
    if residual.dtype != torch.float32:
        raise ValueError(f"residual must be fp32; got {residual.dtype}")
    check_kernel_dtype("directions", directions)
    if out_dtype not in KERNEL_DTYPES:
        raise ValueError(f"out_dtype must be one of {KERNEL_DTYPES}; got {out_dtype}")
    if scale.numel() != 1 or not scale.is_floating_point():
        raise ValueError(f"scale must be a one-element floating tensor; got {scale.dtype} of shape {tuple(scale.shape)}")
    for name, t in (("directions", directions), ("scale", scale)):
        if t.device != residual.device:
            raise ValueError(f"{name} must be on {residual.device} like residual; got {t.device}")


@functools.lru_cache(maxsize=None)
def _project_backward_meta(sources, batch, dim, num_projections, dtype, allow_tf32, arch):
    """(grid, meta) of one backward launch: ``project_backward_config`` and its grid."""
    cfg = project_backward_config(sources, batch, dim, num_projections, dtype, allow_tf32, arch)
    return (cdiv(batch, cfg["BLOCK_B"]) * cdiv(dim, cfg["BLOCK_D"]), sources), cfg


def project_backward_plan(residual, directions, scale, *, out_dtype, allow_tf32=False, arch=None, check=True):
    """The gradient of ``x`` (S, B, D) of projections (S, K, B) = directions @ x^T, and the launch that fills it.

    residual: (S, K, B) fp32 (any strides), the projections' gradient up to ``scale``, a
    one-element floating tensor on the device (the loss's gradient; read by the kernel, so
    no host sync). directions: (K, D), shared by the sources, or (S, K, D), in the
    operands' dtype (fp32, fp16 or bf16); the residual is rounded to it before the product,
    which accumulates in fp32 (TF32 for fp32 when ``allow_tf32``, from sm_80). Returns
    ``(grad_x, [KernelLaunch])``: grad_x (S, B, D) contiguous in ``out_dtype``::

        grad_x[s, b, d] = scale * sum_k residual[s, k, b] * directions[(s,) k, d]

    arch: the compute capability whose tiles to take (``project_backward_config``); None:
    the residual's device's. Works on ``meta`` tensors. ``check=False`` skips the checks of
    the inputs (the loss's op made them).
    """
    if check:
        _check_project_backward_inputs(residual, directions, scale, out_dtype)
    sources, num_projections, batch = residual.shape
    dim = directions.shape[-1]
    arch = device_arch(residual.device) if arch is None else arch
    grad_x = torch.empty(size=(sources, batch, dim), dtype=out_dtype, device=residual.device)  # see project_plan
    grid, cfg = _project_backward_meta(sources, batch, dim, num_projections, directions.dtype, allow_tf32, arch)
    # Shared (K, D) directions are read with a zero stride along the sources, as in project_plan.
    p_strides = directions.stride() if directions.dim() == 3 else (0, *directions.stride())
    args = (residual, directions, scale, grad_x, batch, dim, num_projections, *residual.stride(), *p_strides)
    return grad_x, [KernelLaunch(_project_backward_kernel, grid, args, cfg)]
