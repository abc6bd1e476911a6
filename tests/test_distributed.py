"""Global-batch RDMReg under torch.distributed: 2 gloo ranks on the CPU against one process.

Spawning is slow, so one spawned run (module fixture) executes every multi-process check
on both ranks; each check's traceback (if any) comes back through a file in tmp_path and
is asserted by its own test below. Collectives run before the assertions inside a check,
so a failing check does not leave the other rank waiting.
"""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import lpjepa
from lpjepa import distributed, reference
from lpjepa.loss import draw_directions
from lpjepa.ops import sliced_wasserstein
from conftest import assert_no_rank_failed, spawn_ranks, tolerance

WORLD = 2
FP64 = dict(zip(("atol", "rtol"), tolerance(torch.float64)))
FP32 = dict(zip(("atol", "rtol"), tolerance(torch.float32)))


# --- Data every rank builds alike ---------------------------------------------------------


def _global_views(sizes, dim, dtype=torch.float64, seed=0):
    """Two global views (sum(sizes), dim), a continuous target and 5 directions, the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    z1 = torch.randn(total, dim, generator=gen, dtype=dtype)
    z2 = z1 + 0.3 * torch.randn(total, dim, generator=gen, dtype=dtype)
    target = torch.rand(total, dim, generator=gen, dtype=dtype) + 0.1
    projections = reference.random_projections(5, dim, dtype=dtype, generator=gen)
    return z1, z2, target, projections


def _rows(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _local_leaves(tensors, rows):
    return [t[rows].clone().requires_grad_() for t in tensors]


def _all_equal_across_ranks(value):
    """The values of a 0-dim tensor on every rank (one all-gather), in rank order."""
    value = value.detach().reshape(1).double()
    out = [torch.empty_like(value) for _ in range(WORLD)]
    dist.all_gather(out, value)
    return [v.item() for v in out]


# --- Checks run on every rank inside the spawned world ------------------------------------


def check_rdmreg_loss_and_gradients_match_single_process(rank):
    """Same value on every rank as one process on the concatenated batch; each rank's gradient its slice."""
    for sizes in [(4, 4), (3, 5)]:
        for gather in ("projections", "features"):
            z1, z2, target, projections = _global_views(sizes, dim=6)
            rows = _rows(sizes, rank)
            exact = _local_leaves([z1, z2], rows)
            loss = lpjepa.RDMReg(gather=gather, scale_grad_by_world_size=False)(
                *exact, target=target, projections=projections
            )
            loss.backward()
            scaled = _local_leaves([z1, z2], rows)
            lpjepa.RDMReg(gather=gather)(*scaled, target=target, projections=projections).backward()
            values = _all_equal_across_ranks(loss)

            whole = [z1.clone().requires_grad_(), z2.clone().requires_grad_()]
            single = lpjepa.RDMReg(process_group=None)(*whole, target=target, projections=projections)
            single.backward()
            seed_whole = [z1.clone().requires_grad_(), z2.clone().requires_grad_()]
            seed = sum(reference.rdmreg_loss(v, target, projections=projections) for v in seed_whole) / 2
            seed.backward()

            where = f"sizes={sizes}, gather={gather}"
            assert values[0] == values[1], f"{where}: ranks disagree {values}"
            torch.testing.assert_close(loss, single, **FP64, msg=where)
            torch.testing.assert_close(loss, seed, **FP64, msg=where)
            for ours, theirs, ref in zip(exact, scaled, seed_whole):
                torch.testing.assert_close(ours.grad, ref.grad[rows], **FP64, msg=f"{where}: exact slice")
                torch.testing.assert_close(theirs.grad, WORLD * ref.grad[rows], **FP64, msg=f"{where}: DDP scale")


def check_rectified_loss_parts_and_gradients_match_single_process(rank):
    for sizes in [(4, 4), (2, 6)]:
        z1, z2, target, projections = _global_views(sizes, dim=7, seed=1)
        rows = _rows(sizes, rank)
        local = _local_leaves([z1, z2], rows)
        parts = lpjepa.rectified_lpjepa_loss(
            *local, target=target, projections=projections, scale_grad_by_world_size=False
        )
        parts.loss.backward()
        values = [_all_equal_across_ranks(part) for part in parts]
        whole = [z1.clone().requires_grad_(), z2.clone().requires_grad_()]
        single = lpjepa.rectified_lpjepa_loss(*whole, target=target, projections=projections, process_group=None)
        single.loss.backward()
        for name, ours, ref, across in zip(parts._fields, parts, single, values):
            assert across[0] == across[1], f"sizes={sizes}: {name} differs across ranks {across}"
            torch.testing.assert_close(ours, ref, **FP64, msg=f"sizes={sizes}: {name}")
        for ours, ref in zip(local, whole):
            torch.testing.assert_close(ours.grad, ref.grad[rows], **FP64, msg=f"sizes={sizes}: gradient")


def _seed_loss(z1, z2, seed, step, p=1.0, mu=0.0, num_projections=8):
    """The seed's loss on the global views with what step ``step`` of ``seed`` draws: target, then directions."""
    gen = distributed.step_generator(seed, step, "cpu")
    target = lpjepa.sample_rgg(z1.shape, p, mu, generator=gen, backend="torch")
    projections = reference.random_projections(num_projections, z1.shape[1], generator=gen)
    return sum(reference.rdmreg_loss(v, target.double(), projections=projections.double()) for v in (z1, z2)) / 2


def check_seeded_draws_equal_single_process_draws(rank):
    """RDMReg(seed=s) at step n draws what step_generator(s, n) draws in one process."""
    sizes = (3, 4)
    z1, z2, _, _ = _global_views(sizes, dim=6, seed=2)
    rows = _rows(sizes, rank)
    module = lpjepa.RDMReg(p=1.5, mu=-0.3, num_projections=8, seed=1234)
    first = module(z1[rows], z2[rows])
    second = module(z1[rows], z2[rows])
    across = _all_equal_across_ranks(first)
    single = lpjepa.RDMReg(p=1.5, mu=-0.3, num_projections=8, process_group=None)
    assert across[0] == across[1], across
    assert module.seed_stream.step == 2
    for step, ours in enumerate((first, second)):
        # One process projects an fp32 target in fp32 when several views share it; the
        # global path projects it in the loss's dtype (fp64 here), hence fp32 tolerance.
        theirs = single(z1, z2, generator=distributed.step_generator(1234, step, "cpu"))
        torch.testing.assert_close(ours, theirs, **FP32, msg=f"step {step}")
        torch.testing.assert_close(ours, _seed_loss(z1, z2, 1234, step, 1.5, -0.3), **FP64, msg=f"step {step}")
    assert first != second


def check_triton_sampler_draws_alike_on_every_rank(rank):
    """backend='triton' (the interpreter here): every rank draws one target from the step's generator."""
    sizes = (3, 4)
    z1, z2, _, _ = _global_views(sizes, dim=6, seed=7)
    rows = _rows(sizes, rank)
    module = lpjepa.RDMReg(p=1.5, mu=-0.3, num_projections=16, backend="triton", seed=77)
    loss = module(z1[rows].float(), z2[rows].float())
    across = _all_equal_across_ranks(loss)
    single = lpjepa.RDMReg(p=1.5, mu=-0.3, num_projections=16, backend="triton", process_group=None)
    theirs = single(z1.float(), z2.float(), generator=distributed.step_generator(77, 0, "cpu"))
    assert across[0] == across[1], across
    torch.testing.assert_close(loss, theirs, **FP32)


def check_triton_global_loss_runs_the_kernels(rank):
    """backend='triton': the gathered global batch is projected and sorted by the Triton kernels."""
    from lpjepa.ops import sliced_wasserstein as triton_ops

    launched = []
    real = triton_ops._launch
    triton_ops._launch = lambda launch: (launched.append(launch.kernel.__name__), real(launch))
    try:
        sizes = (3, 5)
        for gather in ("projections", "features"):
            launched.clear()
            z1, z2, target, projections = (t.float() for t in _global_views(sizes, dim=6, seed=4))
            rows = _rows(sizes, rank)
            local = _local_leaves([z1, z2], rows)
            loss = lpjepa.RDMReg(gather=gather, backend="triton", scale_grad_by_world_size=False)(
                *local, target=target, projections=projections
            )
            loss.backward()
            across = _all_equal_across_ranks(loss)
            whole = [z1.double().requires_grad_(), z2.double().requires_grad_()]
            seed = sum(reference.rdmreg_loss(v, target.double(), projections=projections.double()) for v in whole) / 2
            seed.backward()
            where = f"sizes={sizes}, gather={gather}"
            assert across[0] == across[1], f"{where}: ranks disagree {across}"
            # The views' rows (or the gathered global rows) in one launch, the target in another; the
            # backward: this rank's rows of the views' gradient in one.
            assert launched == ["_project_kernel", "_project_kernel", "_sort_residual_kernel",
                                "_mean_of_partials_kernel", "_project_backward_kernel"], f"{where}: {launched}"
            torch.testing.assert_close(loss.double(), seed, **FP32, msg=where)
            for ours, ref in zip(local, whole):
                torch.testing.assert_close(ours.grad.double(), ref.grad[rows], **FP32, msg=f"{where}: gradient")
    finally:
        triton_ops._launch = real


def check_svd_directions_are_the_global_batchs_on_every_rank(rank):
    """directions='svd': each view's singular vectors of the global batch, the same bits on every rank."""
    for sizes in [(4, 4), (3, 5)]:
        z1, z2, _, _ = _global_views(sizes, dim=6, seed=8)
        rows = _rows(sizes, rank)
        gen = distributed.step_generator(9, 0, "cpu")
        directions = draw_directions("svd", 10, [z1[rows], z2[rows]], gen, dist.group.WORLD, list(sizes))
        gathered = [torch.empty_like(directions) for _ in range(WORLD)]
        dist.all_gather(gathered, directions)
        assert torch.equal(gathered[0], gathered[1]), f"sizes={sizes}: ranks project onto different directions"
        shared = reference.random_projections(4, 6, dtype=torch.float64, generator=distributed.step_generator(9, 0, "cpu"))
        for v, view in enumerate((z1, z2)):
            centred = view - view.mean(dim=0)
            vh = torch.linalg.svd(centred, full_matrices=False).Vh  # 8 rows > 6 features: unique up to sign
            vh = vh * torch.gather(vh, 1, vh.abs().argmax(dim=1, keepdim=True)).sign()  # largest entry positive
            torch.testing.assert_close(directions[v, :6], vh, **FP64)
            torch.testing.assert_close(directions[v, 6:], shared, **FP64)


def check_loss_family_matches_single_process(rank):
    """SVD directions and per-view dense targets from the seed stream: the single-process loss and gradient slices."""
    cases = [
        dict(directions="svd", target_draw="shared"),
        dict(directions="svd-bottom-half", target_draw="per-view", rectify=False),
        dict(directions="orthogonal", target_draw="per-view", sigma="unit-rectified"),
    ]
    for options in cases:
        for sizes, gather in [((4, 4), "projections"), ((3, 5), "features")]:
            z1, z2, _, _ = _global_views(sizes, dim=6, seed=10)
            rows = _rows(sizes, rank)
            local = _local_leaves([z1, z2], rows)
            module = lpjepa.RDMReg(p=1.5, mu=-0.3, num_projections=10, seed=66, gather=gather,
                                   scale_grad_by_world_size=False, **options)
            loss = module(*local)
            loss.backward()
            across = _all_equal_across_ranks(loss)
            whole = [z1.clone().requires_grad_(), z2.clone().requires_grad_()]
            single = lpjepa.RDMReg(p=1.5, mu=-0.3, num_projections=10, process_group=None, **options)
            expected = single(*whole, generator=distributed.step_generator(66, 0, "cpu"))
            expected.backward()
            where = f"{options}, sizes={sizes}, gather={gather}"
            assert across[0] == across[1], f"{where}: ranks disagree {across}"
            # The single process projects its fp32 targets in fp32 where the global path uses fp64.
            torch.testing.assert_close(loss, expected, **FP32, msg=where)
            for ours, ref in zip(local, whole):
                torch.testing.assert_close(ours.grad, ref.grad[rows], **FP32, msg=f"{where}: gradient")


def check_triton_per_view_directions_and_targets(rank):
    """backend='triton': per-view SVD directions and per-view targets through the gathered kernels."""
    sizes = (3, 5)
    z1, z2, _, _ = (t.float() for t in _global_views(sizes, dim=6, seed=11))
    rows = _rows(sizes, rank)
    local = _local_leaves([z1, z2], rows)
    options = dict(num_projections=12, directions="svd", target_draw="per-view", backend="triton")
    loss = lpjepa.RDMReg(seed=88, scale_grad_by_world_size=False, **options)(*local)
    loss.backward()
    across = _all_equal_across_ranks(loss)
    whole = [z1.clone().requires_grad_(), z2.clone().requires_grad_()]
    expected = lpjepa.RDMReg(process_group=None, **options)(*whole, generator=distributed.step_generator(88, 0, "cpu"))
    expected.backward()
    assert across[0] == across[1], across
    torch.testing.assert_close(loss, expected, **FP32)
    for ours, ref in zip(local, whole):
        torch.testing.assert_close(ours.grad, ref.grad[rows], **FP32)


def check_even_batches_skip_the_size_gather_and_give_the_same_loss(rank):
    sizes = (4, 4)
    z1, z2, target, projections = _global_views(sizes, dim=6, seed=8)
    rows = _rows(sizes, rank)
    gathered = []
    real = distributed.batch_sizes
    distributed.batch_sizes = lambda *args: gathered.append(args) or real(*args)
    try:
        even = lpjepa.RDMReg(even_batches=True)(z1[rows], z2[rows], target=target, projections=projections)
        assert gathered == []
        uneven_ready = lpjepa.RDMReg()(z1[rows], z2[rows], target=target, projections=projections)
        assert len(gathered) == 1
    finally:
        distributed.batch_sizes = real
    torch.testing.assert_close(even, uneven_ready, **FP64)


def check_broadcast_seed_makes_ranks_agree(rank):
    """With rank-dependent torch seeds, the seed broadcast from rank 0 still gives one loss."""
    torch.manual_seed(100 + rank)
    sizes = (4, 4)
    z1, z2, _, _ = _global_views(sizes, dim=6, seed=3)
    rows = _rows(sizes, rank)
    module = lpjepa.RDMReg(num_projections=8)
    loss = module(z1[rows], z2[rows])
    parts = lpjepa.rectified_lpjepa_loss(z1[rows], z2[rows], num_projections=8)
    stream = distributed.default_seed_stream(dist.group.WORLD)
    across = [_all_equal_across_ranks(v) for v in (loss, parts.loss, torch.tensor(float(module.seed_stream.seed)))]
    expected = _seed_loss(z1, z2, module.seed_stream.seed, 0)
    expected_parts = 25.0 * torch.nn.functional.mse_loss(z1, z2) + 125.0 * _seed_loss(z1, z2, stream.seed, 0)
    for values in across:
        assert values[0] == values[1], across
    assert module.seed_stream.seed != stream.seed
    torch.testing.assert_close(loss, expected, **FP64)
    torch.testing.assert_close(parts.loss, expected_parts, **FP64)
    assert stream.step == 1


def _ddp_step(model, x1, x2, target, projections, lamb_inv, lamb_reg, process_group):
    """One SGD step of the objective on features of x1 and x2 (one forward over both views)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    z1, z2 = model(torch.cat([x1, x2])).split([len(x1), len(x2)])
    parts = lpjepa.rectified_lpjepa_loss(
        z1, z2, lamb_inv=lamb_inv, lamb_reg=lamb_reg, target=target, projections=projections,
        process_group=process_group,
    )
    optimizer.zero_grad()
    parts.loss.backward()
    optimizer.step()


def check_ddp_step_matches_single_process_step(rank):
    from torch.nn.parallel import DistributedDataParallel

    for sizes in [(4, 4), (3, 5)]:
        for lamb_inv, lamb_reg in [(25.0, 125.0), (0.0, 1.0)]:
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(5, 6), nn.ReLU())
            gen = torch.Generator().manual_seed(4)
            x1, x2 = torch.randn(2, sum(sizes), 5, generator=gen)
            target = lpjepa.sample_rgg((sum(sizes), 6), generator=gen, backend="torch")
            projections = reference.random_projections(16, 6, generator=gen)
            rows = _rows(sizes, rank)

            ddp = DistributedDataParallel(copy.deepcopy(model))
            _ddp_step(ddp, x1[rows], x2[rows], target, projections, lamb_inv, lamb_reg, "auto")
            single = copy.deepcopy(model)
            _ddp_step(single, x1, x2, target, projections, lamb_inv, lamb_reg, None)

            where = f"sizes={sizes}, lamb_inv={lamb_inv}, lamb_reg={lamb_reg}"
            for (name, before), after, expected in zip(
                model.named_parameters(), ddp.module.parameters(), single.parameters()
            ):
                assert (expected - before).abs().max() > 1e-3, f"{where}: {name} barely moved"
                torch.testing.assert_close(after, expected, **FP32, msg=f"{where}: {name}")


def check_no_process_group_is_the_local_loss(rank):
    sizes = (4, 4)
    z1, z2, target, projections = _global_views(sizes, dim=6, seed=5)
    rows = _rows(sizes, rank)
    local = lpjepa.RDMReg(process_group=None)(z1[rows], z2[rows], target=target[rows], projections=projections)
    parts = lpjepa.rectified_lpjepa_loss(
        z1[rows], z2[rows], target=target[rows], projections=projections, process_group=None
    )
    seed = sum(reference.rdmreg_loss(v[rows], target[rows], projections=projections) for v in (z1, z2)) / 2
    torch.testing.assert_close(local, seed, **FP64)
    torch.testing.assert_close(parts.invariance, torch.nn.functional.mse_loss(z1[rows], z2[rows]), **FP64)


def check_bad_global_inputs_raise_on_every_rank(rank):
    sizes = (3, 5)
    z1, z2, target, projections = _global_views(sizes, dim=6, seed=6)
    rows = _rows(sizes, rank)
    module = lpjepa.RDMReg()
    with pytest.raises(ValueError, match=r"target must have shape \(8, 6\)"):
        module(z1[rows], target=target[rows], projections=projections)
    with pytest.raises(ValueError, match="projections cannot require grad"):
        module(z1[rows], target=target, projections=projections.clone().requires_grad_())
    # One process sorts a single row (the seed's value); the global batch needs two.
    one_row = z1[:1] if rank == 0 else z1[:0]
    with pytest.raises(ValueError, match="global batch .* needs at least 2 rows"):
        module(one_row, target=target[:1], projections=projections)


CHECKS = {name: fn for name, fn in globals().items() if name.startswith("check_")}


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    return spawn_ranks(CHECKS, WORLD, str(tmp_path_factory.mktemp("distributed")), timeout_s=180)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_two_gloo_ranks(spawned, name):
    assert_no_rank_failed(spawned, name)


# --- Single process, torch.distributed not initialized ---------------------------------


def test_auto_without_initialized_world_is_the_local_loss():
    assert not dist.is_initialized()
    z1, z2, _, _ = _global_views((6,), dim=6)
    torch.manual_seed(7)
    auto = lpjepa.RDMReg(num_projections=8)(z1, z2)
    torch.manual_seed(7)
    local = lpjepa.RDMReg(num_projections=8, process_group=None)(z1, z2)
    assert auto == local
    assert distributed.resolve_process_group("auto") is None


def test_argument_errors():
    with pytest.raises(ValueError, match="not initialized"):
        distributed.resolve_process_group(object())
    with pytest.raises(ValueError, match="'auto', None or"):
        lpjepa.RDMReg(process_group="world")(torch.randn(4, 3))
    with pytest.raises(ValueError, match="gather must be one of"):
        lpjepa.RDMReg(gather="targets")
    with pytest.raises(TypeError, match="seed must be an int"):
        lpjepa.RDMReg(seed=1.5)


def test_step_seeds_are_deterministic_and_distinct():
    seeds = [distributed.step_seed(s, n) for s in (0, 1, -1) for n in range(50)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds)
    a = torch.rand(4, generator=distributed.step_generator(3, 2, "cpu"))
    b = torch.rand(4, generator=distributed.step_generator(3, 2, "cpu"))
    assert torch.equal(a, b)


def test_projected_op_matches_sliced_wasserstein():
    """The sort and residual on stacked projected views, and the op's formula, equal the mean of the views' losses."""
    z1, z2, target, projections = _global_views((33,), dim=9)
    views = [z1.clone().requires_grad_(), z2.clone().requires_grad_()]
    proj = torch.stack([projections @ v.T for v in views])
    ours, residual, _ = sliced_wasserstein.torch_sort_residual(proj.detach(), (projections @ target.T)[None], False)
    # d loss / d z_v = 2 / numel * residual_v^T @ P: the op's one formula.
    ours_grads = [2.0 / residual.numel() * residual[v].T @ projections for v in range(2)]
    refs = [z1.clone().requires_grad_(), z2.clone().requires_grad_()]
    ref = sum(reference.rdmreg_loss(v, target, projections=projections) for v in refs) / 2
    ref_grads = torch.autograd.grad(ref, refs)
    torch.testing.assert_close(ours, ref, **FP64)
    for g, r in zip(ours_grads, ref_grads):
        torch.testing.assert_close(g, r, **FP64)


def test_gather_choice_moves_fewer_bytes():
    f32, bf16 = torch.float32, torch.bfloat16
    assert not distributed.gathers_features("auto", 256, 512, f32, f32)  # the seed's sizes: projections
    assert not distributed.gathers_features("auto", 256, 512, f32, bf16)  # a tie goes to the projections
    assert distributed.gathers_features("auto", 1024, 512, f32, f32)
    assert distributed.gathers_features("features", 8, 512, f32, f32)
    assert not distributed.gathers_features("projections", 1024, 8, f32, f32)


def test_destroy_process_group_without_a_group_is_a_no_op():
    assert not dist.is_initialized()
    assert distributed.destroy_process_group() is None
    assert not dist.is_initialized()
