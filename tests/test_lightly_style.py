"""``RectifiedLpJEPALoss``, the objective as a Lightly-style loss module.

It must be ``rectified_lpjepa_loss`` exactly (same draws, same value, same gradient), the
seed's objective where the randomness is fixed, refuse bad arguments by name, and, with
``gather_distributed=True`` under DDP, give every rank the global-batch loss and, after
DDP's gradient averaging, the single-process gradient (2 gloo ranks on the CPU).
"""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import lpjepa
from lpjepa import distributed, reference
from conftest import assert_no_rank_failed, spawn_ranks, tolerance
from test_distributed import WORLD, _all_equal_across_ranks, _rows

FP64 = dict(zip(("atol", "rtol"), tolerance(torch.float64)))
FP32 = dict(zip(("atol", "rtol"), tolerance(torch.float32)))
FAMILY = [
    {},
    dict(p=1.5, mu=-0.3, sigma="unit-rectified", directions="orthogonal", target_draw="per-view"),
    dict(p=2.0, rectify=False, directions="svd", lamb_inv=1.0, lamb_reg=3.0),
    dict(directions="svd-bottom-half", target_draw="per-view", sigma=0.7),
]


def _views(rows, dim, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    z_a = torch.randn(rows, dim, generator=gen, dtype=dtype)
    return z_a, z_a + 0.3 * torch.randn(rows, dim, generator=gen, dtype=dtype)


def _leaves(*tensors):
    return [t.clone().requires_grad_() for t in tensors]


# --- One process ------------------------------------------------------------------------


@pytest.mark.parametrize("options", FAMILY, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "seed")
@pytest.mark.parametrize("rows,dim", [(3, 5), (32, 16), (257, 7)])
def test_the_module_is_the_function_exactly(options, rows, dim):
    """Same generator: the same draws, so bit-equal parts and gradients in fp64."""
    z_a, z_b = _views(rows, dim, seed=rows)
    ours_leaves, theirs_leaves = _leaves(z_a, z_b), _leaves(z_a, z_b)
    criterion = lpjepa.RectifiedLpJEPALoss(num_projections=12, **options)
    ours = criterion.forward_components(*ours_leaves, generator=torch.Generator().manual_seed(5))
    theirs = lpjepa.rectified_lpjepa_loss(
        *theirs_leaves, num_projections=12, generator=torch.Generator().manual_seed(5), **options
    )
    for name, a, b in zip(lpjepa.LossParts._fields, ours, theirs):
        assert a.dtype == torch.float64 and torch.equal(a, b), f"{name}: {a} != {b}"
    ours.loss.backward()
    theirs.loss.backward()
    for a, b in zip(ours_leaves, theirs_leaves):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("rows,dim", [(3, 4), (255, 9), (64, 32)])
def test_the_module_with_fixed_target_and_directions_is_the_seeds_objective(rows, dim):
    z_a, z_b = _views(rows, dim, seed=1)
    gen = torch.Generator().manual_seed(2)
    target = torch.rand(rows, dim, generator=gen, dtype=torch.float64)
    projections = reference.random_projections(11, dim, dtype=torch.float64, generator=gen)
    ours_leaves, seed_leaves = _leaves(z_a, z_b), _leaves(z_a, z_b)
    criterion = lpjepa.RectifiedLpJEPALoss(lamb_inv=2.0, lamb_reg=7.0)
    loss = criterion(*ours_leaves, target=target, projections=projections)
    regularizer = sum(reference.rdmreg_loss(v, target, projections=projections) for v in seed_leaves) / 2
    seed = 2.0 * F.mse_loss(*seed_leaves) + 7.0 * regularizer
    torch.testing.assert_close(loss, seed, **FP64)
    loss.backward()
    seed.backward()
    for ours, theirs in zip(ours_leaves, seed_leaves):
        torch.testing.assert_close(ours.grad, theirs.grad, **FP64)


def test_the_modules_own_draws_are_the_seeds_draws():
    """From a generator: the target first (the seed's prior), then the seed's Gaussian directions."""
    z_a, z_b = _views(40, 6, seed=3)
    parts = lpjepa.RectifiedLpJEPALoss(p=1.5, mu=-0.2, num_slices=9).forward_components(
        z_a, z_b, generator=torch.Generator().manual_seed(4)
    )
    gen = torch.Generator().manual_seed(4)
    target = lpjepa.sample_rgg(z_a.shape, 1.5, -0.2, generator=gen, backend="torch").double()
    projections = reference.random_projections(9, 6, generator=gen).double()
    regularizer = sum(reference.rdmreg_loss(v, target, projections=projections) for v in (z_a, z_b)) / 2
    # The module projects its shared fp32 target once in fp32; the seed projects it per view in fp64.
    torch.testing.assert_close(parts.regularizer, regularizer, **FP32)
    torch.testing.assert_close(parts.invariance, F.mse_loss(z_a, z_b), **FP64)
    torch.testing.assert_close(parts.loss, 25.0 * parts.invariance + 125.0 * parts.regularizer, **FP64)


def test_forward_returns_the_loss_and_each_call_draws_afresh():
    z_a, z_b = _views(16, 8, seed=5, dtype=torch.float32)
    criterion = lpjepa.RectifiedLpJEPALoss(num_projections=16)
    torch.manual_seed(0)
    first, second = criterion(z_a, z_b), criterion(z_a, z_b)
    torch.manual_seed(0)
    again = criterion.forward_components(z_a, z_b)
    assert first.dim() == 0 and first.dtype == torch.float32
    assert first != second and torch.equal(first, again.loss)
    assert list(criterion.parameters()) == [] and criterion.state_dict() == {}
    assert "gather_distributed=False" in repr(criterion) and "num_projections=16" in repr(criterion)


def test_num_slices_is_num_projections():
    z_a, z_b = _views(20, 6, seed=6)
    values = []
    for options in (dict(num_projections=7), dict(num_slices=7), dict(num_projections=7, num_slices=7)):
        criterion = lpjepa.RectifiedLpJEPALoss(**options)
        assert criterion.num_projections == criterion.num_slices == 7
        values.append(criterion(z_a, z_b, generator=torch.Generator().manual_seed(1)))
    assert values[0] == values[1] == values[2]
    assert lpjepa.RectifiedLpJEPALoss().num_projections == 256
    with pytest.raises(ValueError, match=r"num_projections and num_slices .*num_projections=8 and num_slices=16"):
        lpjepa.RectifiedLpJEPALoss(num_projections=8, num_slices=16)


@pytest.mark.parametrize(
    "options,error,message",
    [
        (dict(lamb_inv=float("nan")), ValueError, "lamb_inv must be a finite number"),
        (dict(lamb_reg="1"), ValueError, "lamb_reg must be a finite number"),
        (dict(p=0), ValueError, "p must be a finite number > 0"),
        (dict(mu=float("inf")), ValueError, "mu must be a finite number"),
        (dict(num_slices=0), ValueError, "num_projections must be >= 1"),
        (dict(num_projections=2.5), TypeError, "num_projections must be an int"),
        (dict(sigma=-1.0), ValueError, "sigma must be > 0"),
        (dict(directions="random"), ValueError, "directions must be one of"),
        (dict(target_draw="each"), ValueError, "target_draw must be one of"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(gather_distributed="yes"), TypeError, "gather_distributed must be True or False"),
        (dict(even_batches=1), TypeError, "even_batches must be True or False"),
        (dict(rectify="false"), TypeError, "rectify must be True or False"),
    ],
)
def test_bad_arguments_are_refused_by_name(options, error, message):
    with pytest.raises(error, match=message):
        lpjepa.RectifiedLpJEPALoss(**options)


def test_bad_views_are_refused_by_name():
    criterion = lpjepa.RectifiedLpJEPALoss(num_projections=4)
    with pytest.raises(ValueError, match=r"every view must have shape \(4, 3\)"):
        criterion(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(TypeError, match="views\\[1\\] must have a floating dtype"):
        criterion(torch.randn(4, 3), torch.ones(4, 3, dtype=torch.int64))


# --- Two gloo ranks under DDP ---------------------------------------------------------------


def _ddp_gradients(model, x_a, x_b, criterion, **fixed):
    """The loss parts and the parameter gradients of one backward (after DDP's all-reduce, for a DDP model)."""
    z_a, z_b = model(torch.cat([x_a, x_b])).split([len(x_a), len(x_b)])
    parts = criterion.forward_components(z_a, z_b, **fixed)
    parts.loss.backward()
    return parts, [p.grad.clone() for p in model.parameters()]


def check_ddp_gradients_are_the_single_process_gradients(rank):
    """Each rank feeds its rows of one global batch; DDP's averaged gradient is the one-process gradient."""
    from torch.nn.parallel import DistributedDataParallel

    largest = 0.0
    for sizes in [(4, 4), (3, 5)]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 6), nn.ReLU()).double()
        gen = torch.Generator().manual_seed(1)
        x_a, x_b = torch.randn(2, sum(sizes), 5, generator=gen, dtype=torch.float64)
        x_b = x_a + 0.5 * x_b
        target = lpjepa.sample_rgg((sum(sizes), 6), generator=gen, backend="torch").double()
        projections = reference.random_projections(16, 6, dtype=torch.float64, generator=gen)
        rows = _rows(sizes, rank)
        fixed = dict(target=target, projections=projections)
        gathered = lpjepa.RectifiedLpJEPALoss(num_slices=16, gather_distributed=True)
        parts, grads = _ddp_gradients(DistributedDataParallel(copy.deepcopy(model)), x_a[rows], x_b[rows], gathered,
                                      **fixed)
        local = lpjepa.RectifiedLpJEPALoss(num_slices=16)
        single, expected = _ddp_gradients(copy.deepcopy(model), x_a, x_b, local, **fixed)
        across = [_all_equal_across_ranks(part) for part in parts]
        for name, values, ours, theirs in zip(parts._fields, across, parts, single):
            assert values[0] == values[1], f"sizes={sizes}: {name} differs across ranks {values}"
            torch.testing.assert_close(ours, theirs, **FP64, msg=f"sizes={sizes}: {name} is not the global one")
        for ours, theirs in zip(grads, expected):
            assert theirs.abs().max() > 1e-3, "a gradient that cannot tell the scales apart"
            torch.testing.assert_close(ours, theirs, **FP64, msg=f"sizes={sizes}: gradient")
            largest = max(largest, (ours - theirs).abs().max().item())
    return {"max_gradient_difference": largest}


def check_drawn_targets_are_fresh_and_alike_on_every_rank(rank):
    """Without a fixed target: rank-dependent torch seeds, yet one seed stream, a fresh draw per call."""
    torch.manual_seed(100 + rank)
    sizes = (3, 5)
    z_a, z_b = _views(sum(sizes), 6, seed=7)
    rows = _rows(sizes, rank)
    criterion = lpjepa.RectifiedLpJEPALoss(num_projections=8, gather_distributed=True, even_batches=False)
    first, second = (criterion(*_leaves(z_a[rows], z_b[rows])) for _ in range(2))
    stream = criterion.rdmreg.seed_stream
    across = [_all_equal_across_ranks(v) for v in (first, second, torch.tensor(float(stream.seed)))]
    for values in across:
        assert values[0] == values[1], across
    assert stream.step == 2 and first != second
    local = lpjepa.RectifiedLpJEPALoss(num_projections=8)
    for step, ours in enumerate((first, second)):
        theirs = local(z_a, z_b, generator=distributed.step_generator(stream.seed, step, "cpu"))
        # The one process projects its shared fp32 target in fp32, the global path in fp64.
        torch.testing.assert_close(ours, theirs, **FP32, msg=f"step {step}")


def check_no_gather_is_the_local_loss_and_never_communicates(rank):
    sizes = (4, 4)
    z_a, z_b = _views(sum(sizes), 6, seed=8)
    rows = _rows(sizes, rank)
    target = torch.rand(sizes[rank], 6, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    projections = reference.random_projections(8, 6, dtype=torch.float64)
    collectives = ("batch_sizes", "gather_batch", "global_mean", "broadcast_seed")
    real = {name: getattr(distributed, name) for name in collectives}

    def refuse(name):
        def collective(*args, **kwargs):
            raise AssertionError(f"gather_distributed=False called distributed.{name}")
        return collective

    for name in collectives:
        setattr(distributed, name, refuse(name))
    try:
        criterion = lpjepa.RectifiedLpJEPALoss()
        ours = criterion(z_a[rows], z_b[rows], target=target, projections=projections)
        criterion(z_a[rows], z_b[rows])  # its own draws: from this rank's torch generator, no seed broadcast
    finally:
        for name, fn in real.items():
            setattr(distributed, name, fn)
    theirs = lpjepa.rectified_lpjepa_loss(z_a[rows], z_b[rows], target=target, projections=projections,
                                          process_group=None)
    assert torch.equal(ours, theirs.loss)


CHECKS = {name: fn for name, fn in globals().items() if name.startswith("check_")}


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    return spawn_ranks(CHECKS, WORLD, str(tmp_path_factory.mktemp("lightly_style")), timeout_s=120)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_two_gloo_ranks(spawned, name):
    assert_no_rank_failed(spawned, name)
    if "max_gradient_difference" in spawned[0][name]:
        print(f"max |DDP gradient - single-process gradient| over ranks: "
              f"{max(r[name]['max_gradient_difference'] for r in spawned):.3g}")
