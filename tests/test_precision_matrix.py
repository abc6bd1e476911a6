"""Every public entry point under every precision a user trains in, against the fp64 reference.

``rdmreg_loss``, ``RDMReg``, ``rectified_lpjepa_loss``, ``RectifiedLpJEPALoss`` and ``sample_rgg`` over
fp32, fp16, bf16 and fp64 inputs, each without autocast and under ``torch.autocast`` in fp16 and in
bf16 (what Lightning's ``precision="16-mixed"`` / ``"bf16-mixed"`` wrap a step in). Each cell of
(input dtype, autocast, entry point) runs a set of configurations that covers 1 to 3 views, shared
and per-view targets, Gaussian and SVD directions, fixed and drawn randomness (every pair of these
meets), and batches 3, 17 and 64 at dims 8 and 16, rather than their full cross product
(thousands of cases).

The loss is compared with ``lpjepa.reference`` in fp64 on the very values the call used: the
inputs as rounded to their dtype, and the target and directions either passed in or replayed from
the same generator with the public draws (``sample_rgg``, ``lpjepa.ops.directions``). Gradients
must be finite, in the input's dtype, and equal fp64 autograd of the reference up to the
tolerance of the working precision (relative to the gradient's norm, so tiny entries cannot pass
by being tiny). On the CPU the matrix runs on the torch backend; on CUDA (``cuda`` marker) on both
backends.
"""
import contextlib
import itertools
import os

import pytest
import torch
import torch.nn.functional as F

import lpjepa
from lpjepa import reference
from lpjepa.ops import directions as direction_ops
from conftest import requires_cuda, tolerance

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
AUTOCASTS = {"none": None, "autocast-fp16": torch.float16, "autocast-bf16": torch.bfloat16}
NUM_PROJECTIONS = 16
SHAPES = [(3, 8), (17, 16), (64, 8), (17, 8), (64, 16)]  # an odd count: no shape sticks to one scheme
LAMB_INV, LAMB_REG = 25.0, 125.0
# Loosest first: the tolerance a result earns is that of the least precise dtype it went through.
_PRECISION_ORDER = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def _configs(view_counts, target_modes, all_fixed_modes=False, shape_offset=0):
    """(views, targets, directions, fixed, rows, dim) configurations, shapes cycled.

    Every combination of views, targets and directions; ``fixed`` (target and directions passed in,
    or drawn from a generator) either crossed with them (``all_fixed_modes``) or set by the parity
    of the others, a half fraction in which each of them still meets both fixed and drawn.
    ``shape_offset``: where in SHAPES the cycle starts (the two objectives cover different pairs).
    """
    configs = []
    for views, (t, targets), (d, directions) in itertools.product(
        view_counts, enumerate(target_modes), enumerate(("gaussian", "svd"))
    ):
        fixed_modes = (True, False) if all_fixed_modes else ((views + t + d) % 2 == 0,)
        for fixed in fixed_modes:
            configs.append((views, targets, directions, fixed, *SHAPES[(shape_offset + len(configs)) % len(SHAPES)]))
    return configs


ENTRY_CONFIGS = {
    "rdmreg_loss": _configs((1,), ("shared",), all_fixed_modes=True),
    "RDMReg": _configs((1, 2, 3), ("shared", "per-view")),
    "rectified_lpjepa_loss": _configs((2,), ("shared", "per-view")),
    "RectifiedLpJEPALoss": _configs((2,), ("shared", "per-view"), shape_offset=3),
}


def _autocast(device, dtype):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device, dtype)


def _working_dtype(dtype, autocast_dtype, backend):
    """The dtype whose tolerance a result earns. The torch backend computes in fp32 (fp64) whatever the
    inputs; the Triton backend projects in the features' precision, and under autocast perhaps in its."""
    if backend == "torch":
        return dtype
    candidates = [dtype] + ([autocast_dtype] if autocast_dtype is not None and dtype != torch.float64 else [])
    return min(candidates, key=_PRECISION_ORDER.index)


def _views(count, rows, dim, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, dim, generator=gen)
    views = [(base + 0.5 * torch.randn(rows, dim, generator=gen)).to(dtype) for _ in range(count)]
    return [v.to(device) for v in views]


def _target(count, rows, dim, targets, device, generator, backend, dtype=None):
    """What RDMReg draws: one (rows, dim) target, or one per view, from ``generator`` in turn."""
    def draw():
        return lpjepa.sample_rgg((rows, dim), device=device, generator=generator, backend=backend, dtype=dtype)

    return draw() if targets == "shared" else torch.stack([draw() for _ in range(count)])


def _directions(views, directions, generator):
    """What the loss draws for ``directions``: (K, D) Gaussian, or (V, K, D) SVD ones of each view."""
    dim, device = views[0].shape[1], views[0].device
    if directions == "gaussian":
        return direction_ops.random_projections(NUM_PROJECTIONS, dim, device, generator=generator)
    dtype = torch.float64 if views[0].dtype == torch.float64 else torch.float32
    singular = direction_ops.centred_right_singular_vectors(torch.stack([v.detach().to(dtype) for v in views]))
    return direction_ops.svd_projections(singular, NUM_PROJECTIONS, generator=generator)


def _of_view(tensor, v):
    return tensor[v] if tensor.dim() == 3 else tensor


def _reference_value(entry, leaves, target, projections):
    """The seed's loss (and objective) in fp64 from the values the call used."""
    regularizer = sum(
        reference.rdmreg_loss(z, _of_view(target, v).double(), projections=_of_view(projections, v).double())
        for v, z in enumerate(leaves)
    ) / len(leaves)
    if entry in ("rectified_lpjepa_loss", "RectifiedLpJEPALoss"):
        return LAMB_INV * F.mse_loss(*leaves) + LAMB_REG * regularizer
    return regularizer


def _without_ties(gradient, null_direction):
    """The part of a (B, D) gradient that does not depend on how ties are broken along ``null_direction``.

    With B <= D a view's last singular vector is orthogonal to its centred batch: every row projects
    onto it at the same value, so which row takes which target quantile there, and with it how that
    direction's gradient is shared among the rows, depends on rounding (any split is a subgradient).
    Only the sum over the rows is defined; each row keeps the mean share.
    """
    along = gradient @ null_direction
    return gradient - torch.outer(along - along.mean(), null_direction)


def _call(entry, leaves, options, target, projections, generator):
    """``entry`` on ``leaves`` with the loss family in ``options``; fixed randomness where given."""
    fixed = dict(projections=projections, generator=generator)
    if entry == "rdmreg_loss":
        if projections is not None and projections.dim() == 3:  # one view's SVD directions: (K, D)
            fixed["projections"] = projections[0]
        return lpjepa.rdmreg_loss(leaves[0], target, NUM_PROJECTIONS, directions=options["directions"],
                                  backend=options["backend"], **fixed)
    if entry == "RDMReg":
        return lpjepa.RDMReg(num_projections=NUM_PROJECTIONS, **options)(*leaves, target=target, **fixed)
    if entry == "rectified_lpjepa_loss":
        return lpjepa.rectified_lpjepa_loss(*leaves, num_projections=NUM_PROJECTIONS, lamb_inv=LAMB_INV,
                                            lamb_reg=LAMB_REG, target=target, process_group=None, **options,
                                            **fixed).loss
    return lpjepa.RectifiedLpJEPALoss(LAMB_INV, LAMB_REG, num_projections=NUM_PROJECTIONS, **options)(
        *leaves, target=target, **fixed
    )


def check_cell(entry, dtype, autocast_dtype, device, backend):
    """Every configuration of ``entry`` in one (input dtype, autocast) cell: value, gradient dtype and value."""
    device = torch.device(device)
    work = _working_dtype(dtype, autocast_dtype, backend)
    atol, rtol = tolerance(work)
    for index, (count, targets, directions, fixed, rows, dim) in enumerate(ENTRY_CONFIGS[entry]):
        where = f"{entry} views={count} targets={targets} directions={directions} fixed={fixed} B={rows} D={dim}"
        views = _views(count, rows, dim, dtype, device, seed=index)
        seed_gen = torch.Generator(device=device).manual_seed(100 + index)
        if fixed or entry == "rdmreg_loss":  # rdmreg_loss always takes its target
            target = _target(count, rows, dim, targets, device, seed_gen, backend, dtype=dtype)
        else:
            target = None
        projections = _directions(views, directions, seed_gen) if fixed else None
        generator = None if fixed else torch.Generator(device=device).manual_seed(7 + index)

        leaves = [v.clone().requires_grad_() for v in views]
        options = dict(directions=directions, target_draw=targets, backend=backend)
        with _autocast(device.type, autocast_dtype):
            loss = _call(entry, leaves, options, target, projections, generator)
            loss.backward()

        if not fixed:  # replay the call's draws: its target first (unless given), then its directions
            replay = torch.Generator(device=device).manual_seed(7 + index)
            if target is None:
                target = _target(count, rows, dim, targets, device, replay, backend)
            projections = _directions(views, directions, replay)
        if backend == "triton" and dtype in (torch.float16, torch.bfloat16):
            # The Triton backend projects in the features' precision: these roundings are what it used.
            target, projections = target.to(dtype), projections.to(dtype)
        reference_leaves = [v.detach().double().requires_grad_() for v in views]
        expected = _reference_value(entry, reference_leaves, target, projections)
        expected.backward()

        assert loss.dim() == 0 and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), where
        torch.testing.assert_close(loss.double(), expected, atol=atol, rtol=rtol, msg=lambda m: f"{where}: {m}")
        for v, (leaf, theirs) in enumerate(zip(leaves, reference_leaves)):
            assert leaf.grad is not None and leaf.grad.dtype == dtype, f"{where}: view {v}'s gradient dtype"
            assert torch.isfinite(leaf.grad).all(), f"{where}: view {v}'s gradient is not finite"
            ours, want = leaf.grad.double(), theirs.grad
            if directions == "svd" and rows <= dim:
                null = _of_view(projections, v)[rows - 1].double().to(device)
                ours, want = _without_ties(ours, null), _without_ties(want, null)
            scale = want.norm()
            assert scale > 0, f"{where}: a zero reference gradient tells nothing"
            error = ((ours - want).norm() / scale).item()
            assert error <= rtol + atol, f"{where}: view {v}'s gradient is off by {error:.3g} (relative)"


def check_sampler_cell(dtype, autocast_dtype, device, backend):
    """sample_rgg in ``dtype``: the fp32 law's draw rounded (fp64: its own), unchanged by autocast, finite, >= 0."""
    device = torch.device(device)
    shape = (64, 16)

    def draw(dtype):
        gen = torch.Generator(device=device).manual_seed(3)
        return lpjepa.sample_rgg(shape, device=device, dtype=dtype, generator=gen, backend=backend)

    with _autocast(device.type, autocast_dtype):
        samples = draw(dtype)
    assert samples.dtype == dtype and samples.shape == shape and samples.device.type == device.type
    assert torch.isfinite(samples).all() and (samples >= 0).all()
    assert torch.equal(samples, draw(dtype)), "autocast changed the draw"
    if dtype != torch.float64:
        assert torch.equal(samples, draw(torch.float32).to(dtype)), "a half-precision draw is not the fp32 one rounded"
    # The law itself is tested against scipy elsewhere; here the half of the samples the ReLU zeroes (mu = 0)
    # and the mean sigma_gn(1) * E[max(X, 0)] = sigma_gn(1) / 2 of the reference's scale, over 4 * 1024 draws.
    many = torch.cat([lpjepa.sample_rgg(shape, device=device, dtype=dtype, backend=backend,
                                        generator=torch.Generator(device=device).manual_seed(s)) for s in range(4)])
    zero_fraction = (many == 0).double().mean().item()
    mean = many.double().mean().item()
    assert abs(zero_fraction - 0.5) < 0.05, zero_fraction  # 6.4 standard errors
    assert abs(mean - reference.sigma_gn(1.0) / 2) < 0.06, mean  # > 6 standard errors


@pytest.mark.parametrize("autocast", AUTOCASTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("entry", ENTRY_CONFIGS)
def test_every_entry_point_under_every_precision_on_the_cpu(entry, dtype, autocast):
    check_cell(entry, DTYPES[dtype], AUTOCASTS[autocast], "cpu", "torch")


@pytest.mark.parametrize("autocast", AUTOCASTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_rgg_under_every_precision_on_the_cpu(dtype, autocast):
    check_sampler_cell(DTYPES[dtype], AUTOCASTS[autocast], "cpu", "torch")


def test_the_check_fails_on_a_wrong_loss(patch):
    """A loss 1% off (the reference moved instead, the one place a test can move it) must fail the check."""
    real = reference.rdmreg_loss
    patch.setattr(reference, "rdmreg_loss", lambda *args, **kwargs: 1.01 * real(*args, **kwargs))
    with pytest.raises(AssertionError):
        check_cell("RDMReg", torch.float32, None, "cpu", "torch")


@requires_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("autocast", AUTOCASTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("entry", ENTRY_CONFIGS)
def test_every_entry_point_under_every_precision_on_cuda(entry, dtype, autocast, backend):
    check_cell(entry, DTYPES[dtype], AUTOCASTS[autocast], "cuda", backend)


@requires_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("autocast", AUTOCASTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_rgg_under_every_precision_on_cuda(dtype, autocast, backend):
    check_sampler_cell(DTYPES[dtype], AUTOCASTS[autocast], "cuda", backend)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter (the CUDA tests run it)")
@pytest.mark.parametrize("dtype,autocast", [(torch.float16, torch.bfloat16), (torch.float32, torch.float16)])
def test_the_triton_backend_under_an_autocast_of_another_dtype_on_the_interpreter(dtype, autocast):
    """fp16 views under a bf16 autocast once raised in torch.stack (autocast's promotion knows no mixed halves)."""
    views = _views(2, 5, 4, dtype, torch.device("cpu"), seed=0)
    target = lpjepa.sample_rgg((5, 4), generator=torch.Generator().manual_seed(1))
    projections = direction_ops.random_projections(4, 4, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", autocast):
        ours = lpjepa.RDMReg(num_projections=4, backend="triton")(*views, target=target, projections=projections)
    expected = _reference_value("RDMReg", [v.double() for v in views], target.to(dtype), projections.to(dtype))
    torch.testing.assert_close(ours.double(), expected, **dict(zip(("atol", "rtol"), tolerance(torch.float16))))
