"""The loss as Lightly users call it: views as a list or a stack, and ``gather_distributed`` as Lightly means it.

Views: Lightly's collate hands a step a list of views, its JEPA-family losses take (V, N, D)
stacks; ``RDMReg`` and the objective take either, with exactly the value (and gradient) of the
views unpacked, and refuse a wrong count or shape by the argument's name.

``gather_distributed=True`` (VICReg, BarlowTwins, NTXent, VISReg and SIGReg in Lightly): without an
initialized process group the loss is the local one, so one script runs on one process and on
many; only a torch build without ``torch.distributed`` refuses it, at construction. Two gloo
ranks running the Lightly-style step (a list of views, ``gather_distributed=True``) get the
global batch's loss.
"""
import contextlib

import pytest
import torch
import torch.distributed as dist

import lpjepa
from lpjepa import distributed, reference
from conftest import assert_no_rank_failed, spawn_ranks, tolerance
from test_distributed import WORLD, _rows
FP64 = dict(zip(("atol", "rtol"), tolerance(torch.float64)))


def _views(count, rows, dim, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, dim, generator=gen, dtype=dtype)
    return [base + 0.4 * torch.randn(rows, dim, generator=gen, dtype=dtype) for _ in range(count)]


def _fixed(rows, dim, seed=1, per_view=None):
    """A rectified target ((rows, dim), or (per_view, rows, dim)) and 8 Gaussian directions, in fp64."""
    gen = torch.Generator().manual_seed(seed)
    shape = (rows, dim) if per_view is None else (per_view, rows, dim)
    target = lpjepa.sample_rgg(shape, generator=gen, dtype=torch.float64, backend="torch")
    return dict(target=target, projections=reference.random_projections(8, dim, dtype=torch.float64, generator=gen))


@contextlib.contextmanager
def torch_distributed_unavailable():
    """``torch.distributed.is_available()`` returns False inside, as in a torch build without it."""
    real = dist.is_available
    dist.is_available = lambda: False
    try:
        yield
    finally:
        dist.is_available = real


# --- Views as a list, a tuple or a stack ---------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize("form", ["list", "tuple", "stack"])
def test_rdmreg_takes_a_list_a_tuple_or_a_stack_of_views(count, form):
    views = _views(count, 17, 6, seed=count)
    fixed = _fixed(17, 6, per_view=count if count > 1 else None)
    unpacked_leaves = [v.clone().requires_grad_() for v in views]
    expected = lpjepa.RDMReg(num_projections=8)(*unpacked_leaves, **fixed)
    expected.backward()
    leaves = [v.clone().requires_grad_() for v in views]
    packed = {"list": list(leaves), "tuple": tuple(leaves), "stack": torch.stack(leaves)}[form]
    loss = lpjepa.RDMReg(num_projections=8)(packed, **fixed)
    loss.backward()
    assert torch.equal(loss, expected)
    for ours, theirs in zip(leaves, unpacked_leaves):
        assert torch.equal(ours.grad, theirs.grad)


@pytest.mark.parametrize("form", ["list", "tuple", "stack"])
def test_the_objective_takes_its_two_views_in_one_argument(form):
    z_a, z_b = _views(2, 33, 5, seed=4)
    fixed = _fixed(33, 5)
    criterion = lpjepa.RectifiedLpJEPALoss(num_slices=8)
    packed = {"list": [z_a, z_b], "tuple": (z_a, z_b), "stack": torch.stack([z_a, z_b])}[form]
    expected = criterion.forward_components(z_a, z_b, **fixed)
    for parts in (criterion.forward_components(packed, **fixed),
                  lpjepa.rectified_lpjepa_loss(packed, num_projections=8, **fixed)):
        for name, ours, theirs in zip(parts._fields, parts, expected):
            assert torch.equal(ours, theirs), name
    assert torch.equal(criterion(packed, **fixed), expected.loss)
    # Own draws: the same generator state gives the same value packed or not.
    drawn = [criterion(*args, generator=torch.Generator().manual_seed(9)) for args in ((z_a, z_b), (packed,))]
    assert torch.equal(drawn[0], drawn[1])


def test_a_stacks_gradient_reaches_the_stack():
    stack = torch.stack(_views(2, 9, 4, seed=5)).requires_grad_()
    lpjepa.RectifiedLpJEPALoss(num_slices=8)(stack, **_fixed(9, 4)).backward()
    assert stack.grad is not None and stack.grad.shape == stack.shape and stack.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda c, z: c([z, z, z]), r"compares two views; z_a holds 3 \(a list of 3\)"),
        (lambda c, z: c(torch.stack([z, z, z])), r"z_a holds 3 \(a tensor of shape \(3, 6, 4\)\)"),
        (lambda c, z: c([z]), r"z_a holds 1"),
        (lambda c, z: c(z), r"z_b is missing: pass two \(N, D\) views, \(z_a, z_b\), or z_a alone as a list"),
        (lambda c, z: c([z, z], z), r"z_a must be one \(N, D\) view when z_b is given; got a list of 2"),
        (lambda c, z: c(z, torch.stack([z, z])), r"z_b must be one \(N, D\) view .*got a tensor of shape \(2, 6, 4\)"),
        (lambda c, z: c([z, torch.randn(5, 4, dtype=z.dtype)]), r"every view must have shape \(6, 4\)"),
    ],
)
def test_the_objective_refuses_a_wrong_count_or_shape_by_name(call, message):
    z = _views(1, 6, 4)[0]
    with pytest.raises(ValueError, match=message):
        call(lpjepa.RectifiedLpJEPALoss(num_slices=8), z)


def test_the_function_names_its_own_arguments():
    z = _views(1, 6, 4)[0]
    with pytest.raises(ValueError, match="z2 is missing"):
        lpjepa.rectified_lpjepa_loss(z)
    with pytest.raises(ValueError, match=r"z1 holds 3"):
        lpjepa.rectified_lpjepa_loss([z, z, z])


@pytest.mark.parametrize(
    "args,error,message",
    [
        (lambda z: ([z, z], z), ValueError, r"RDMReg takes the views either unpacked, RDMReg\(z1, z2\), or as one "
                                            r"list .*views\[0\] is a list of 2 beside other arguments"),
        (lambda z: (z, torch.stack([z, z])), ValueError, r"views\[1\] is a tensor of shape \(2, 6, 4\)"),
        (lambda z: (z[None, None],), ValueError, r"RDMReg takes \(N, D\) views or one \(V, N, D\) stack .*\(1, 1, 6, 4\)"),
        (lambda z: ([],), ValueError, "RDMReg needs at least one view"),
        (lambda z: ([z, "z2"],), TypeError, r"views\[1\] must be a torch.Tensor"),
    ],
)
def test_rdmreg_refuses_mixed_or_misshapen_views_by_name(args, error, message):
    z = _views(1, 6, 4)[0]
    with pytest.raises(error, match=message):
        lpjepa.RDMReg(num_projections=8)(*args(z))


# --- gather_distributed without a process group: the local loss, as in Lightly ------------


def test_gather_distributed_without_a_process_group_is_the_local_loss():
    assert not dist.is_initialized()
    z_a, z_b = _views(2, 24, 6, seed=6)
    gathered = lpjepa.RectifiedLpJEPALoss(num_slices=16, gather_distributed=True)
    local = lpjepa.RectifiedLpJEPALoss(num_slices=16)
    for call in ("__call__", "forward_components"):
        ours = getattr(gathered, call)(z_a, z_b, generator=torch.Generator().manual_seed(1))
        theirs = getattr(local, call)(z_a, z_b, generator=torch.Generator().manual_seed(1))
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs)) if call != "__call__" else torch.equal(ours, theirs)
    # Its own draws come from torch's default generator, as gather_distributed=False's do.
    torch.manual_seed(3)
    first = gathered(z_a, z_b)
    torch.manual_seed(3)
    assert torch.equal(first, local(z_a, z_b))


def test_gather_distributed_needs_a_torch_with_distributed():
    """The one error Lightly raises: at construction, when torch.distributed.is_available() is False."""
    z_a, z_b = _views(2, 8, 4, seed=7)
    with torch_distributed_unavailable():
        assert not dist.is_available()
        with pytest.raises(ValueError, match="gather_distributed=True, but this torch build has no torch.distributed"):
            lpjepa.RectifiedLpJEPALoss(gather_distributed=True)
        # Without the flag everything runs, on one process.
        parts = lpjepa.RectifiedLpJEPALoss(num_slices=8).forward_components(z_a, z_b, **_fixed(8, 4))
        assert torch.isfinite(parts.loss)
        assert torch.isfinite(lpjepa.RDMReg(num_projections=8)(z_a, z_b))
        assert torch.isfinite(lpjepa.rectified_lpjepa_loss(z_a, z_b, num_projections=8).loss)
    assert dist.is_available()


# --- Two gloo ranks: the Lightly-style step gets the global batch's loss -------------------


def check_a_list_of_views_with_gather_distributed_is_the_global_loss(rank):
    """Each rank passes criterion([z0, z1]) on its rows; every rank gets the one-process loss of all rows."""
    sizes = (5, 7)
    z_a, z_b = _views(2, sum(sizes), 6, seed=11)
    fixed = _fixed(sum(sizes), 6, seed=12)
    rows = _rows(sizes, rank)
    criterion = lpjepa.RectifiedLpJEPALoss(num_slices=8, gather_distributed=True)
    leaves = [z_a[rows].clone().requires_grad_(), z_b[rows].clone().requires_grad_()]
    loss = criterion(leaves, **fixed)
    loss.backward()
    single_leaves = [z_a.clone().requires_grad_(), z_b.clone().requires_grad_()]
    single = lpjepa.RectifiedLpJEPALoss(num_slices=8)(single_leaves, **fixed)
    single.backward()
    local = lpjepa.RectifiedLpJEPALoss(num_slices=8)(
        [z_a[rows], z_b[rows]], target=lpjepa.sample_rgg((sizes[rank], 6), dtype=torch.float64, backend="torch",
                                                         generator=torch.Generator().manual_seed(13)),
        projections=fixed["projections"],
    )
    torch.testing.assert_close(loss, single, **FP64)
    assert not torch.allclose(loss, local), "the gathered loss is the local one: nothing was gathered"
    for ours, theirs in zip(leaves, single_leaves):  # DDP's averaging of WORLD * these is the one-process gradient
        torch.testing.assert_close(ours.grad, WORLD * theirs.grad[rows], **FP64)
    # Its own draws: alike on every rank.
    drawn = criterion(torch.stack([z_a[rows], z_b[rows]])).detach().reshape(1)
    everyone = [torch.empty_like(drawn) for _ in range(WORLD)]
    dist.all_gather(everyone, drawn)
    assert everyone[0] == everyone[1], everyone
    return {"loss": loss.item()}


CHECKS = {name: fn for name, fn in globals().items() if name.startswith("check_")}


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    return spawn_ranks(CHECKS, WORLD, str(tmp_path_factory.mktemp("lightly_views")), timeout_s=120)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_two_gloo_ranks(spawned, name):
    assert_no_rank_failed(spawned, name)
