"""Rectified Generalized Gaussian sampler: one Triton kernel and its launcher.

Draws ``ReLU(mu + sigma * X)`` (or the dense ``mu + sigma * X``, ``rectify=False``: the
``RECTIFY`` constexpr) with ``X ~ GN_p(0, 1)`` in the parameterisation of the
seed's ``sample_rgg``: ``X = S * (p * G) ** (1 / p)``, ``S`` a fair random sign and
``G ~ Gamma(1/p, 1)``; equivalently ``scipy.stats.gennorm(beta=p, scale=p ** (1 / p))``.

Every element ``i`` of the output owns the Philox counters ``(offset + i, round, stream)``
under the key ``seed``, so the stream of a launch is a pure function of
``(seed, offset)`` and a launch consumes exactly ``numel`` counters of the first two
words (see :func:`rgg_philox_increment`). The last word, ``stream``, is ``STREAM_TAG`` or
``STREAM_TAG + 1``: torch's own CUDA random ops use the same key with their thread index
in the last two words (always below 2**32, so their last word is 0), and the tag keeps
the two families of counters apart. The exponent ``p`` picks the method:

* ``p == 1`` (Laplace): ``X = S * E`` with ``E = -log(U)`` exponential; one Philox call.
* ``p == 2`` (Gaussian): ``X ~ N(0, 1)`` by Box-Muller; one Philox call.
* any other ``p > 0``: ``G`` by Marsaglia-Tsang rejection at shape ``a = 1/p`` when
  ``a >= 1``, else at shape ``a + 1`` followed by the boost ``G = G' * U ** (1/a)``.
  All arithmetic after the draw is done in logs, ``sigma * |X| =
  exp(log(sigma) + (log(p) + log(G)) / p)``, so tiny ``p`` (huge powers) and large
  ``p`` (``U ** p`` underflow) stay finite where the true value is representable.

The same launch can also draw the loss's Gaussian directions (``rgg_launch(...,
directions=...)``): a (K, D) tensor of unit rows, each a vector of D standard normals
divided by its Euclidean norm, so uniform on the sphere (the seed's law; not torch.randn's
numbers). The programs past the target's own each own ``DIR_ROWS`` rows. Element ``(k, j)``
owns the counter ``(offset + k * D + j, 0, STREAM_TAG + 2)``: a last word of its own, so
it never meets the target's two streams (last words ``STREAM_TAG``, ``STREAM_TAG + 1``) or
torch's (0), and one generator advance of ``max(numel, K * D)`` counters
(:func:`rgg_philox_increment`) covers both. A row longer than ``DIR_BLOCK`` is read in
chunks: a first pass sums the squares in fp32, a second regenerates the same normals
(counter-based: nothing is stored in between) and stores them divided by the norm, in the
directions' dtype; a row of one chunk is drawn once. The target's stream does not change
with the directions.

Counter layout of one launch (first two words: the 64-bit counter ``offset + index``)::

    target element i, Gamma round r : (offset + i, r, STREAM_TAG)      (p = 1, 2: r = 0)
    target element i, sign and boost: (offset + i, 0, STREAM_TAG + 1)  (Gamma path only)
    direction element (k, j)        : (offset + k * D + j, 0, STREAM_TAG + 2)

Uniforms are ``(k + 0.5) * 2**-32`` for a 32-bit word ``k``: never 0, so every
``log(U)`` is finite (the exponential tail is cut at ``33 * ln 2 ~ 22.9``, a mass of
1e-10, the resolution limit of 32-bit uniforms).

The rejection loop runs until every lane of a block has accepted, at most
``GAMMA_MAX_ROUNDS`` rounds. Each round accepts with probability >= 0.95 (the shape is
always >= 1 there), so a lane is still pending after 20 rounds with probability
< 0.05 ** 20 ~ 1e-26. Such a lane is never given an unaccepted value: it is written as
NaN, which the caller can detect (``torch.isnan(sample).any()``).
"""
import functools
import math

import torch
import triton
import triton.language as tl

from .launch import KernelLaunch, cdiv, check_kernel_dtype, next_power_of_2

# Methods, chosen from p by the launcher; tl.constexpr so the kernel can compare with them.
LAPLACE = tl.constexpr(0)
GAUSSIAN = tl.constexpr(1)
GAMMA = tl.constexpr(2)

GAMMA_MAX_ROUNDS = 20

# The last Philox counter word of this kernel's streams ("lpje"; the target's sign stream is
# STREAM_TAG + 1, the directions' STREAM_TAG + 2): never 0, the value torch's CUDA random
# ops put there, so their counters and this kernel's never coincide.
STREAM_TAG = tl.constexpr(0x6C706A65)
DIRECTIONS_TAG = tl.constexpr(STREAM_TAG.value + 2)

# Elements of one directions tile (DIR_ROWS x DIR_BLOCK) and the longest chunk of a row.
DIRECTIONS_TILE = 1024
DIRECTIONS_MAX_BLOCK = 1024

# A 32-bit word k maps to the uniform (k + 0.5) * 2**-32; the low 31 bits of a word to
# an angle fraction k * 2**-31 in [0, 1).
_TWO_POW_MINUS_32 = tl.constexpr(2.0**-32)
_TWO_POW_MINUS_31 = tl.constexpr(2.0**-31)
_HALF_PI = tl.constexpr(math.pi / 2)


@triton.jit
def _uniform(bits):
    """uint32 block -> fp32 uniforms in [2**-33, 1]: never 0, so log() is finite."""
    return (bits.to(tl.float32) + 0.5) * _TWO_POW_MINUS_32


@triton.jit
def _cos_quarter_turn(v):
    """cos(pi/2 * v) for v in [0, 1], by its Taylor series (error < 6e-9 on that range).

    tl.cos would bring libdevice's large-argument reduction, whose local array costs a
    stack frame (and a spill on sm_80) in every kernel that draws normals.
    """
    x2 = (_HALF_PI * v) * (_HALF_PI * v)
    poly = 1.0 / 479001600.0
    poly = -1.0 / 3628800.0 + x2 * poly
    poly = 1.0 / 40320.0 + x2 * poly
    poly = -1.0 / 720.0 + x2 * poly
    poly = 1.0 / 24.0 + x2 * poly
    poly = -0.5 + x2 * poly
    return 1.0 + x2 * poly


@triton.jit
def _box_muller(bits_radius, bits_angle):
    """Two uint32 blocks -> one N(0, 1) block: Box-Muller, r * cos(theta).

    cos(theta) for theta uniform on [0, 2 pi) has the law of +-cos(phi), phi uniform on
    [0, pi/2): the top bit of bits_angle gives the sign, its other 31 bits give phi.
    """
    radius = tl.sqrt(-2.0 * tl.log(_uniform(bits_radius)))
    quarter = (bits_angle & 0x7FFFFFFF).to(tl.float32) * _TWO_POW_MINUS_31
    cosine = _cos_quarter_turn(quarter)
    return tl.where((bits_angle >> 31) != 0, -radius * cosine, radius * cosine)


@triton.jit(do_not_specialize=["seed", "offset"])
def _rgg_kernel(
    out_ptr,  # (n_elements,) fp32 / fp16 / bf16, written
    n_elements,
    seed,  # Philox key
    offset,  # first Philox counter of this launch
    mu,
    sigma,  # LAPLACE / GAUSSIAN: the scale itself
    log_sigma,  # GAMMA: log(sigma), -inf when sigma == 0
    log_p,
    inv_p,
    mt_d,  # Marsaglia-Tsang d = shape - 1/3 (shape = 1/p, or 1/p + 1 when boosting)
    mt_c,  # Marsaglia-Tsang c = 1 / sqrt(9 d)
    boost_inv_shape,  # p when boosting (shape 1/p < 1), else 0
    dir_ptr,  # (n_directions, dim) fp32 / fp16 / bf16, written when DIRECTIONS
    n_directions,
    dim,
    target_programs,  # the programs drawing the target: the rest draw directions
    METHOD: tl.constexpr,
    RECTIFY: tl.constexpr,  # False: the dense target mu + sigma * X, no ReLU
    MAX_ROUNDS: tl.constexpr,
    BLOCK: tl.constexpr,
    DIRECTIONS: tl.constexpr,  # False: the target alone (dir_ptr and the three ints unused)
    DIR_ROWS: tl.constexpr,
    DIR_BLOCK: tl.constexpr,
    DIR_ONE_CHUNK: tl.constexpr,  # dim <= DIR_BLOCK: each row drawn once, kept in registers
):
    pid = tl.program_id(0)
    if DIRECTIONS:
        if pid >= target_programs:
            _directions_tile(dir_ptr, n_directions, dim, seed, offset, pid - target_programs,
                             DIR_ROWS, DIR_BLOCK, DIR_ONE_CHUNK)
        else:
            _target_block(out_ptr, n_elements, seed, offset, mu, sigma, log_sigma, log_p, inv_p, mt_d, mt_c,
                          boost_inv_shape, pid, METHOD, RECTIFY, MAX_ROUNDS, BLOCK)
    else:
        _target_block(out_ptr, n_elements, seed, offset, mu, sigma, log_sigma, log_p, inv_p, mt_d, mt_c,
                      boost_inv_shape, pid, METHOD, RECTIFY, MAX_ROUNDS, BLOCK)


@triton.jit
def _direction_normals(seed, offset, rows, cols, n_directions, dim):
    """N(0, 1) draws of the directions' (rows, cols) tile (0 outside): counters (offset + row * dim + col, 0, tag)."""
    mask = (rows < n_directions) & (cols < dim)
    counter = offset + rows * dim + cols
    c_lo = (counter & 0xFFFFFFFF).to(tl.uint32)
    c_hi = (counter >> 32).to(tl.uint32)
    zero = c_lo * 0
    w_a, w_b, _, _ = tl.philox(seed, c_lo, c_hi, zero, zero + DIRECTIONS_TAG)
    return tl.where(mask, _box_muller(w_a, w_b), 0.0), mask


@triton.jit
def _directions_tile(dir_ptr, n_directions, dim, seed, offset, tile, DIR_ROWS: tl.constexpr,
                     DIR_BLOCK: tl.constexpr, DIR_ONE_CHUNK: tl.constexpr):
    """Rows tile * DIR_ROWS onward of the directions: D normals each, divided by their fp32 norm."""
    rows = (tile.to(tl.int64) * DIR_ROWS + tl.arange(0, DIR_ROWS))[:, None]
    lanes = tl.arange(0, DIR_BLOCK)[None, :]
    # Rows past the end hold zeros: a norm of 1 there keeps 0 / 0 out of lanes that are never stored.
    past_end = rows >= n_directions
    if DIR_ONE_CHUNK:
        normal, mask = _direction_normals(seed, offset, rows, lanes, n_directions, dim)
        norm = tl.where(past_end, 1.0, tl.sqrt_rn(tl.sum(normal * normal, axis=1))[:, None])
        tl.store(dir_ptr + rows * dim + lanes, (normal / norm).to(dir_ptr.dtype.element_ty), mask=mask)
    else:
        # Two passes over the row: the norm, then the same counters again for the stores.
        squares = tl.zeros([DIR_ROWS, DIR_BLOCK], dtype=tl.float32)
        for start in range(0, dim, DIR_BLOCK):
            normal, _ = _direction_normals(seed, offset, rows, start + lanes, n_directions, dim)
            squares += normal * normal
        norm = tl.where(past_end, 1.0, tl.sqrt_rn(tl.sum(squares, axis=1))[:, None])
        for start in range(0, dim, DIR_BLOCK):
            cols = start + lanes
            normal, mask = _direction_normals(seed, offset, rows, cols, n_directions, dim)
            tl.store(dir_ptr + rows * dim + cols, (normal / norm).to(dir_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _target_block(out_ptr, n_elements, seed, offset, mu, sigma, log_sigma, log_p, inv_p, mt_d, mt_c,
                  boost_inv_shape, pid, METHOD: tl.constexpr, RECTIFY: tl.constexpr, MAX_ROUNDS: tl.constexpr,
                  BLOCK: tl.constexpr):
    """Elements pid * BLOCK onward of the target (the kernel's arguments of the same names)."""
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = idx < n_elements
    counter = offset + idx
    c_lo = (counter & 0xFFFFFFFF).to(tl.uint32)
    c_hi = (counter >> 32).to(tl.uint32)
    zero = c_lo * 0

    if METHOD == LAPLACE:
        w_sign, w_exp, _, _ = tl.philox(seed, c_lo, c_hi, zero, zero + STREAM_TAG)
        magnitude = -tl.log(_uniform(w_exp))
        x = tl.where((w_sign >> 31) != 0, -magnitude, magnitude)
        value = mu + sigma * x
    elif METHOD == GAUSSIAN:
        w_a, w_b, _, _ = tl.philox(seed, c_lo, c_hi, zero, zero + STREAM_TAG)
        value = mu + sigma * _box_muller(w_a, w_b)
    else:
        # Marsaglia-Tsang: round r of lane i uses counters (offset + i, r, STREAM_TAG).
        log_d = tl.log(mt_d)
        log_g = tl.zeros([BLOCK], dtype=tl.float32)
        accepted = idx >= n_elements  # lanes past the end never need a draw
        n_pending = tl.sum((~accepted).to(tl.int32), axis=0)
        round_ = tl.full([], 0, dtype=tl.int32)
        while (n_pending > 0) & (round_ < MAX_ROUNDS):
            w_a, w_b, w_u, _ = tl.philox(seed, c_lo, c_hi, zero + round_.to(tl.uint32), zero + STREAM_TAG)
            normal = _box_muller(w_a, w_b)
            t = 1.0 + mt_c * normal
            v = t * t * t
            log_v = tl.log(tl.where(v > 0, v, 1.0))
            bound = 0.5 * normal * normal + mt_d - mt_d * v + mt_d * log_v
            ok = (v > 0) & (tl.log(_uniform(w_u)) < bound)
            log_g = tl.where(ok & ~accepted, log_d + log_v, log_g)
            accepted = accepted | ok
            n_pending = tl.sum((~accepted).to(tl.int32), axis=0)
            round_ += 1
        # Sign and boost uniform come from a separate stream: counters (offset + i, 0, STREAM_TAG + 1).
        w_sign, w_boost, _, _ = tl.philox(seed, c_lo, c_hi, zero, zero + (STREAM_TAG + 1))
        log_g += tl.log(_uniform(w_boost)) * boost_inv_shape
        magnitude = tl.exp(log_sigma + (log_p + log_g) * inv_p)
        value = mu + tl.where((w_sign >> 31) != 0, -magnitude, magnitude)
        value = tl.where(accepted, value, float("nan"))

    if RECTIFY:
        # ReLU written so that NaN (the unaccepted-lane flag) survives it.
        value = tl.where(value < 0, 0.0, value)
    tl.store(out_ptr + idx, value.to(out_ptr.dtype.element_ty), mask=in_range)


def rgg_method(p):
    """The sampling method (LAPLACE, GAUSSIAN or GAMMA, as an int) the kernel uses for p."""
    if p == 1.0:
        return LAPLACE.value
    if p == 2.0:
        return GAUSSIAN.value
    return GAMMA.value


def rgg_launch_config(n_elements, method):
    """(BLOCK, num_warps) of the sampler for a flat output of n_elements.

    Shared by :func:`rgg_sample` and the compile report. The Gamma path runs its
    rejection loop until the whole block has accepted, so it takes a smaller block
    (fewer lanes to wait for) than the one-shot Laplace and Gaussian paths.
    """
    cap = 1024 if method != GAMMA else 512
    block = max(128, min(cap, next_power_of_2(max(int(n_elements), 1))))
    num_warps = 4 if block >= 512 else 2
    return block, num_warps


def directions_launch_config(n_directions, dim):
    """(DIR_ROWS, DIR_BLOCK, num_warps) of the directions' programs: DIR_ROWS rows of DIR_BLOCK columns each.

    A row of up to ``DIRECTIONS_MAX_BLOCK`` columns is one chunk (drawn once); a longer one
    is walked in chunks of that size. Short rows are stacked, up to ``DIRECTIONS_TILE``
    elements a program, so that a small D does not leave each program a handful of lanes.
    """
    block = min(DIRECTIONS_MAX_BLOCK, next_power_of_2(max(int(dim), 1)))
    rows = max(1, min(DIRECTIONS_TILE // block, next_power_of_2(max(int(n_directions), 1))))
    num_warps = 4 if rows * block >= 512 else 2
    return rows, block, num_warps


def rgg_philox_increment(n_elements, n_direction_elements=0):
    """Philox counters one launch consumes (its generator increment): n_elements for the target alone.

    The directions' K * D elements (``n_direction_elements``) use the same first counter words
    under their own last word, so a launch drawing both advances by the larger count.
    """
    return max(int(n_elements), int(n_direction_elements))


def philox_seed_offset(increment, device, generator=None):
    """(seed, offset) for a Philox launch of ``increment`` counters; advances the generator.

    The generator is ``generator`` or the default generator of ``device``'s type, so
    ``torch.manual_seed`` (or seeding the passed generator) makes runs reproducible and
    two calls never share counters.

    * CUDA: the generator's seed (``initial_seed``) is returned as is, and its Philox
      offset (``get_offset``) is advanced by ``increment`` rounded up to a multiple of 4, as
      torch's own Philox ops do: three calls into the generator, no state tensor. This
      kernel's counters carry ``STREAM_TAG`` in their last word, where torch's ops have 0,
      so the two never draw from the same counter: independent streams, not one shared
      sequence. Not usable while a CUDA graph is being captured (the offset is read on the
      host).
    * CPU (the Triton interpreter): the generator is an mt19937, which has no counter
      to advance; a fresh 63-bit seed is drawn from it (which advances it) and the
      offset is 0. Two calls therefore use different keys, colliding with probability
      2**-63.
    """
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device}, the output on {device}")
    if device.type == "cuda":
        if generator is None:
            index = device.index if device.index is not None else torch.cuda.current_device()
            generator = torch.cuda.default_generators[index]
        offset = generator.get_offset()
        generator.set_offset(offset + (int(increment) + 3) // 4 * 4)
        return generator.initial_seed(), offset
    if device.type == "cpu":
        if generator is None:
            generator = torch.default_generator
        seed = int(torch.randint(0, 2**63 - 1, (), generator=generator, dtype=torch.int64))
        return seed, 0
    raise ValueError(f"no Philox seed source for device type {device.type!r}")


def rgg_launch(out, *, p, mu, sigma, seed, offset, rectify=True, directions=None, check=True):
    """The sampler launch that fills ``out`` (contiguous fp32/fp16/bf16) from Philox (seed, offset).

    ``rectify=False`` skips the ReLU: the dense target ``mu + sigma * X``.
    ``directions``: an optional contiguous (K, D) fp32/fp16/bf16 tensor on ``out``'s device,
    filled by the same launch with unit Gaussian directions (see the module doc); the
    target's values do not depend on it. The generator advance for both is
    ``rgg_philox_increment(out.numel(), directions.numel())``.

    p > 0, mu and sigma >= 0 finite are the caller's to check (``lpjepa.sample_rgg`` does);
    only what the kernel's stores rely on is checked here (``check=False``: by a caller that
    allocated both tensors itself).
    """
    if check:
        check_kernel_dtype("out", out)
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
        if directions is not None:
            check_kernel_dtype("directions", directions)
            if directions.dim() != 2 or not directions.is_contiguous() or directions.device != out.device:
                raise ValueError(f"directions must be a contiguous (K, D) tensor on {out.device}")
    n_elements = out.numel()
    n_directions, dim = (0, 0) if directions is None else directions.shape
    grid, constants, tail, meta = _rgg_plan(n_elements, float(p), float(mu), float(sigma), bool(rectify),
                                            n_directions, dim)
    # Without directions dir_ptr is never read: out stands in for it.
    dir_arg = out if directions is None else directions
    return KernelLaunch(_rgg_kernel, grid, (out, n_elements, seed, offset, *constants, dir_arg, *tail), meta)


@functools.lru_cache(maxsize=256)
def _rgg_plan(n_elements, p, mu, sigma, rectify, n_directions, dim):
    """(grid, constants, tail, meta) of one draw: the same at every step of a run.

    constants: the kernel's arguments from ``mu`` to ``boost_inv_shape``; tail: those after
    ``dir_ptr`` (n_directions, dim, target_programs). n_directions = 0: no directions.
    """
    method = rgg_method(p)
    shape_a = 1.0 / p
    boost = shape_a < 1.0
    mt_d = (shape_a + 1.0 if boost else shape_a) - 1.0 / 3.0
    block, num_warps = rgg_launch_config(n_elements, method)
    constants = (
        mu,
        sigma,
        math.log(sigma) if sigma > 0 else float("-inf"),
        math.log(p),
        1.0 / p,
        mt_d,
        1.0 / math.sqrt(9.0 * mt_d),
        p if boost else 0.0,
    )
    target_programs = cdiv(n_elements, block)
    meta = dict(METHOD=method, RECTIFY=rectify, MAX_ROUNDS=GAMMA_MAX_ROUNDS, BLOCK=block, num_warps=num_warps,
                DIRECTIONS=False, DIR_ROWS=1, DIR_BLOCK=1, DIR_ONE_CHUNK=True)
    if n_directions == 0:
        return (target_programs,), constants, (0, 0, target_programs), meta
    rows, dir_block, dir_warps = directions_launch_config(n_directions, dim)
    # One num_warps for the launch: the larger of the two kinds of program.
    meta.update(DIRECTIONS=True, DIR_ROWS=rows, DIR_BLOCK=dir_block, DIR_ONE_CHUNK=dim <= dir_block,
                num_warps=max(num_warps, dir_warps))
    grid = (target_programs + cdiv(n_directions, rows),)
    return grid, constants, (n_directions, dim, target_programs), meta


def rgg_sample(
    shape,
    *,
    p,
    mu,
    sigma,
    dtype=torch.float32,
    device=None,
    seed=None,
    offset=None,
    rectify=True,
):
    """Samples ``ReLU(mu + sigma * X)``, ``X ~ GN_p(0, 1)``, with the Triton kernel.

    Args:
        shape: output shape (an int or a tuple; flattened for the kernel).
        p: exponent, any finite p > 0 (1: Laplace, 2: Gaussian, else via Gamma(1/p)).
        mu: shift before the ReLU (finite float).
        sigma: scale (finite float >= 0).
        dtype: output dtype, fp32, fp16 or bf16; computed in fp32, cast on store.
        device: output device (default: CUDA when available, else CPU, i.e. the
            Triton interpreter).
        seed, offset: Philox key and first counter. Both None (the default) takes them
            from the device's default generator with :func:`philox_seed_offset`, which
            advances it by ``rgg_philox_increment(numel)``. A caller with its own
            generator calls ``philox_seed_offset(rgg_philox_increment(numel), device,
            generator)`` and passes them.

    Returns:
        Tensor of ``shape`` and ``dtype``. An element whose Gamma draw did not accept
        within ``GAMMA_MAX_ROUNDS`` rounds is NaN (probability < 1e-26 per element).
    """
    if (seed is None) != (offset is None):
        raise ValueError("pass both seed and offset, or neither")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    out = torch.empty((shape,) if isinstance(shape, int) else tuple(shape), dtype=dtype, device=device)
    if seed is None:
        seed, offset = philox_seed_offset(rgg_philox_increment(out.numel()), device)
    if out.numel() > 0:
        rgg_launch(out, p=p, mu=mu, sigma=sigma, seed=seed, offset=offset, rectify=rectify)()
    return out
