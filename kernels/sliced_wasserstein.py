"""Sliced-Wasserstein forward of the RDMReg loss: Triton kernels and their launcher.

For features ``z`` (B, D), target samples ``target`` (B, D) and unit directions
``projections`` (K, D) the loss is the seed's ``rdmreg_loss``::

    loss = mean over b, k of (sort(z @ P.T)[:, k] - sort(target @ P.T)[:, k]) ** 2

and the launcher also returns the residuals the backward needs, scattered back to the
batch's original row order:

    residual_z[k, b] = proj_z[b, k] - sorted(proj_target[:, k])[rank of b in proj_z[:, k]]

so that ``d loss / d z = (2 / (B * K)) * residual_z.T @ projections`` (one matmul).

Two paths, chosen by :func:`swd_forward` from the batch size:

* fused (``B <= fused_max_batch``, default ``FUSED_MAX_BATCH``): one program per ``BLOCK_K`` = 16 directions. It
  projects the targets and the features over D in chunks with ``tl.dot`` (fp32, IEEE)
  into a program-private scratch buffer (L2-resident), then for each of its directions
  sorts both projections along the batch in registers (``tl.sort`` on int64 keys: an
  order-preserving int32 image of the fp32 value in the high word, the row index in
  the low word, so the sort is an argsort), and writes the residuals and one partial
  sum of squares.
* fallback (larger B): projections by torch matmul, ``torch.sort`` (stable, with
  indices) along the batch, then a Triton kernel for the residuals and partial sums.
  The matmul follows torch's fp32 matmul precision setting (TF32 if the caller
  enabled it); the fused path is always IEEE fp32.

The fused path runs cdiv(K, 16) programs (16 for K = 256), fewer than the SMs of an
A100/H100; whether it beats the fallback at a given B is for a GPU benchmark to say
(``python -m benchmarks.swd_paths``), and ``fused_max_batch`` is where to act on the answer.

Either way the partial sums are reduced in a fixed order by a one-program kernel, so
the same inputs give a bit-identical loss. Everything is computed in fp32 whatever the
input dtype. The batch is padded to a power of two with keys that sort after every real
value (NaN included), and padded positions never reach the loss or the residuals.
Ties are broken by row index (fused) or stably (fallback); the loss does not depend
on it.
"""
import torch
import triton
import triton.language as tl

from .launch import KernelLaunch, check_kernel_dtype

# Largest batch the fused kernel sorts in registers, one direction at a time: the default
# of every launcher's ``fused_max_batch``. At B_PAD = 2048 the int64 keys of both sorts
# fit 8 warps without spilling on sm_80 and sm_90 (`python -m lpjepa.kernels.compile_report`);
# B_PAD = 4096 needs 16 warps, whose 128-register cap spills.
FUSED_MAX_BATCH = 2048

# tl.dot needs every dimension >= 16; this is also the narrowest direction block.
_MIN_DOT = 16

# High word of the key of a padded row: above the image of every float, +NaN included.
_PAD_HIGH = tl.constexpr(0x7FFFFFFF)


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
def _argsort(values, rows, row_ok):
    """Sorts a (B_PAD,) fp32 block; returns (sorted values, the row each came from).

    Padded rows (row_ok False) sort last. The key is (orderable value, row), so ties
    go to the lower row.
    """
    high = tl.where(row_ok, _orderable(values), _PAD_HIGH)
    keys = tl.sort((high.to(tl.int64) << 32) | rows.to(tl.int64))
    # int64 -> int32 truncation keeps the low word, the row.
    return _from_orderable((keys >> 32).to(tl.int32)), keys.to(tl.int32)


@triton.jit
def _project_to_scratch(x_ptr, stride_xb, stride_xd, p_ptr, stride_pk, stride_pd, dirs, dir_ok, scratch, B, D,
                        B_PAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """scratch[j, b] = P[dirs[j]] . x[b] for b < B, as a (BLOCK_K, B_PAD) fp32 row-major block."""
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        acc = tl.zeros((BLOCK_K, BLOCK_B), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            p = tl.load(p_ptr + dirs[:, None] * stride_pk + cols[None, :] * stride_pd,
                        mask=dir_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            # Rows loaded transposed, (BLOCK_D, BLOCK_B), so products come out direction-major.
            x = tl.load(x_ptr + rows[None, :] * stride_xb + cols[:, None] * stride_xd,
                        mask=row_ok[None, :] & col_ok[:, None], other=0.0).to(tl.float32)
            acc = tl.dot(p, x, acc, input_precision="ieee")
        tl.store(scratch + tl.arange(0, BLOCK_K)[:, None] * B_PAD + rows[None, :], acc, mask=row_ok[None, :])


@triton.jit
def _swd_fused_kernel(
    z_ptr, t_ptr, p_ptr,  # (B, D), (B, D), (K, D); fp32 / fp16 / bf16, any strides
    res_z_ptr,  # (K, B) fp32 contiguous, written
    res_t_ptr,  # (K, B) fp32 contiguous, written when NEED_TARGET_RESIDUAL
    partial_ptr,  # (cdiv(K, BLOCK_K),) fp32: each program's sum of squared residuals
    scratch_ptr,  # (cdiv(K, BLOCK_K), 2, BLOCK_K, B_PAD) fp32: projections, program-private
    B, D, K,
    stride_zb, stride_zd, stride_tb, stride_td, stride_pk, stride_pd,
    B_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NEED_TARGET_RESIDUAL: tl.constexpr,
):
    pid = tl.program_id(0)
    dirs = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    dir_ok = dirs < K
    t_scratch = scratch_ptr + pid.to(tl.int64) * (2 * BLOCK_K * B_PAD)
    z_scratch = t_scratch + BLOCK_K * B_PAD

    # Phase 1: project into the program's scratch (L2-resident), targets then features,
    # one accumulator at a time to keep registers for the FMA dot. Sorting the whole
    # (BLOCK_K, B_PAD) tile in registers would spill beyond B_PAD = 256; one direction
    # at a time sorts up to FUSED_MAX_BATCH.
    _project_to_scratch(t_ptr, stride_tb, stride_td, p_ptr, stride_pk, stride_pd, dirs, dir_ok, t_scratch, B, D,
                        B_PAD, BLOCK_K, BLOCK_B, BLOCK_D)
    _project_to_scratch(z_ptr, stride_zb, stride_zd, p_ptr, stride_pk, stride_pd, dirs, dir_ok, z_scratch, B, D,
                        B_PAD, BLOCK_K, BLOCK_B, BLOCK_D)
    # Phase 2 reads scratch written by other threads of this program.
    tl.debug_barrier()

    # Phase 2: per direction, sort both projections along the batch and match ranks.
    rows = tl.arange(0, B_PAD)
    row_ok = rows < B
    sum_sq = tl.zeros((B_PAD,), dtype=tl.float32)
    for j in range(0, tl.minimum(BLOCK_K, K - pid * BLOCK_K)):
        # Sorted position r < B holds a real row on both sides: padding sorts last.
        valid = row_ok
        proj_t = tl.load(t_scratch + j * B_PAD + rows, mask=row_ok, other=0.0)
        if NEED_TARGET_RESIDUAL:
            t_sorted, t_rows = _argsort(proj_t, rows, row_ok)
        else:
            t_sorted = _from_orderable(tl.sort(tl.where(row_ok, _orderable(proj_t), _PAD_HIGH)))
        proj_z = tl.load(z_scratch + j * B_PAD + rows, mask=row_ok, other=0.0)
        z_sorted, z_rows = _argsort(proj_z, rows, row_ok)
        residual = tl.where(valid, z_sorted - t_sorted, 0.0)
        out_row = (pid * BLOCK_K + j).to(tl.int64) * B
        tl.store(res_z_ptr + out_row + z_rows, residual, mask=valid)
        if NEED_TARGET_RESIDUAL:
            tl.store(res_t_ptr + out_row + t_rows, -residual, mask=valid)
        sum_sq += residual * residual
    tl.store(partial_ptr + pid, tl.sum(sum_sq, axis=0))


@triton.jit
def _swd_residual_kernel(
    z_sorted_ptr, z_cols_ptr,  # (K, B) fp32, (K, B) int64: z projections sorted along B
    t_sorted_ptr, t_cols_ptr,  # (K, B) fp32, (K, B) int64 (read when NEED_TARGET_RESIDUAL)
    res_z_ptr, res_t_ptr,  # (K, B) fp32, written
    partial_ptr,  # (cdiv(K, BLOCK_K) * cdiv(B, BLOCK_B),) fp32
    B, K,
    BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr,
    NEED_TARGET_RESIDUAL: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_b = tl.program_id(1)
    dirs = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    pos = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    valid = (dirs < K)[:, None] & (pos < B)[None, :]
    out_rows = dirs.to(tl.int64)[:, None] * B
    offs = out_rows + pos[None, :]

    z_sorted = tl.load(z_sorted_ptr + offs, mask=valid, other=0.0)
    t_sorted = tl.load(t_sorted_ptr + offs, mask=valid, other=0.0)
    residual = z_sorted - t_sorted
    z_cols = tl.load(z_cols_ptr + offs, mask=valid, other=0)
    tl.store(res_z_ptr + out_rows + z_cols, residual, mask=valid)
    if NEED_TARGET_RESIDUAL:
        t_cols = tl.load(t_cols_ptr + offs, mask=valid, other=0)
        tl.store(res_t_ptr + out_rows + t_cols, -residual, mask=valid)
    tl.store(partial_ptr + pid_k * tl.num_programs(1) + pid_b,
             tl.sum(tl.sum(residual * residual, axis=1), axis=0))


@triton.jit
def _mean_of_partials_kernel(partial_ptr, out_ptr, n_partials, count, BLOCK: tl.constexpr):
    """out[()] = sum(partials) / count, summed in one fixed order (one program)."""
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n_partials, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + offs, mask=offs < n_partials, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0) / count)


def swd_use_fused(batch, fused_max_batch=FUSED_MAX_BATCH):
    """Whether swd_forward takes the fused path for this batch size."""
    return batch <= fused_max_batch


def swd_fused_config(batch, dim):
    """Meta-parameters of _swd_fused_kernel: dict(B_PAD, BLOCK_K, BLOCK_B, BLOCK_D, num_warps, num_stages).

    Shared by swd_forward and the compile report. BLOCK_K and BLOCK_D stay at the
    tl.dot minimum of 16: the fp32 (IEEE) dot runs on FMA units, whose operand
    registers grow with BLOCK_D, and K = 256 still makes 16 programs. 8 warps hold
    B_PAD = 2048 int64 sort keys (8 a thread) without spilling; 16 warps would cap
    registers at 128 a thread, which B_PAD = 4096 overflows.
    """
    b_pad = max(_MIN_DOT, triton.next_power_of_2(batch))
    return dict(B_PAD=b_pad, BLOCK_K=_MIN_DOT, BLOCK_B=min(128, b_pad), BLOCK_D=_MIN_DOT, num_warps=8, num_stages=2)


def swd_residual_config(batch, num_projections):
    """Meta-parameters of _swd_residual_kernel: dict(BLOCK_K, BLOCK_B, num_warps)."""
    block_b = max(16, min(1024, triton.next_power_of_2(batch)))
    block_k = max(1, min(16, 2048 // block_b))
    return dict(BLOCK_K=block_k, BLOCK_B=block_b, num_warps=4)


_MEAN_BLOCK = 256


def _mean_launch(partials, count, loss):
    return KernelLaunch(_mean_of_partials_kernel, (1,), (partials, loss, partials.numel(), float(count)),
                        dict(BLOCK=_MEAN_BLOCK, num_warps=4))


def _check_inputs(z, target, projections):
    """What the kernels' memory accesses rely on; the meaning of the inputs is checked by lpjepa."""
    if z.dim() != 2 or target.shape != z.shape or projections.dim() != 2 or projections.shape[1] != z.shape[1]:
        raise ValueError(
            f"z and target must both be (B, D) and projections (K, D); got {tuple(z.shape)}, "
            f"{tuple(target.shape)} and {tuple(projections.shape)}"
        )
    if min(z.shape[0], z.shape[1], projections.shape[0]) < 1:
        raise ValueError("B, D and K must all be >= 1")
    if z.shape[0] >= 2**31:
        raise ValueError("the sort key holds the row index in 32 bits: B must be < 2**31")
    for name, tensor in (("z", z), ("target", target), ("projections", projections)):
        check_kernel_dtype(name, tensor)
        if tensor.device != z.device:
            raise ValueError(f"{name} is on {tensor.device}, z on {z.device}")


def swd_forward_plan(z, target, projections, *, need_target_residual=False, fused_max_batch=FUSED_MAX_BATCH):
    """The outputs of :func:`swd_forward`, allocated, and the kernel launches that fill them.

    Works on ``meta`` tensors too (the fallback's matmul and torch.sort included), which
    is how the compile report sees the launches the dispatcher really makes. Batches of
    up to ``fused_max_batch`` rows take the fused path (0 always takes the fallback).
    Returns ``((loss, residual_z, residual_target), [KernelLaunch, ...])``.
    """
    _check_inputs(z, target, projections)
    batch, dim = z.shape
    num_projections = projections.shape[0]
    device = z.device
    loss = torch.empty((), dtype=torch.float32, device=device)
    residual_z = torch.empty((num_projections, batch), dtype=torch.float32, device=device)
    residual_t = torch.empty_like(residual_z) if need_target_residual else None
    # Never written unless needed. A buffer of its own, not residual_z: under torch.compile
    # two kernel arguments aliasing one tensor confuse the functionalized launch.
    residual_t_arg = residual_t if need_target_residual else torch.empty(1, dtype=torch.float32, device=device)

    if swd_use_fused(batch, fused_max_batch):
        cfg = swd_fused_config(batch, dim)
        n_programs = triton.cdiv(num_projections, cfg["BLOCK_K"])
        partials = torch.empty(n_programs, dtype=torch.float32, device=device)
        scratch = torch.empty(n_programs * 2 * cfg["BLOCK_K"] * cfg["B_PAD"], dtype=torch.float32, device=device)
        main = KernelLaunch(
            _swd_fused_kernel,
            (n_programs,),
            (z, target, projections, residual_z, residual_t_arg, partials, scratch,
             batch, dim, num_projections,
             z.stride(0), z.stride(1), target.stride(0), target.stride(1),
             projections.stride(0), projections.stride(1)),
            dict(NEED_TARGET_RESIDUAL=need_target_residual, **cfg),
        )
    else:
        p32 = projections.float()
        # (K, B) directly, so the sort runs along contiguous rows; stable for determinism.
        z_sorted, z_cols = torch.sort(p32 @ z.float().T, dim=1, stable=True)
        t_sorted, t_cols = torch.sort(p32 @ target.float().T, dim=1, stable=True)
        cfg = swd_residual_config(batch, num_projections)
        grid = (triton.cdiv(num_projections, cfg["BLOCK_K"]), triton.cdiv(batch, cfg["BLOCK_B"]))
        partials = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=device)
        main = KernelLaunch(
            _swd_residual_kernel,
            grid,
            (z_sorted, z_cols, t_sorted, t_cols, residual_z, residual_t_arg, partials, batch, num_projections),
            dict(NEED_TARGET_RESIDUAL=need_target_residual, **cfg),
        )
    launches = [main, _mean_launch(partials, batch * num_projections, loss)]
    return (loss, residual_z, residual_t), launches


def swd_forward(z, target, projections, *, need_target_residual=False, fused_max_batch=FUSED_MAX_BATCH):
    """Sliced-Wasserstein loss and residuals (see the module docstring).

    Args:
        z: (B, D) features, fp32 / fp16 / bf16, any strides.
        target: (B, D) target samples, same constraints (dtypes may differ).
        projections: (K, D) directions (unit norm expected, not checked).
        need_target_residual: also return the residual of ``target``.
        fused_max_batch: the largest batch the fused kernel takes (default FUSED_MAX_BATCH).

    Returns:
        ``(loss, residual_z, residual_target)``: ``loss`` a 0-dim fp32 tensor, the mean
        of squared residuals over B and K; ``residual_z`` (K, B) fp32 contiguous, in
        z's row order; ``residual_target`` (K, B) fp32 in target's row order with the
        sign flipped (``sorted_target - sorted_z``), or None unless asked for.

    Batches of up to ``fused_max_batch`` rows run the fused kernel (one launch plus the
    reduction); larger ones the fallback: two fp32 matmuls, two stable ``torch.sort``
    with indices, the Triton residual kernel and the reduction.
    """
    outputs, launches = swd_forward_plan(
        z, target, projections, need_target_residual=need_target_residual, fused_max_batch=fused_max_batch
    )
    for launch in launches:
        launch()
    return outputs
