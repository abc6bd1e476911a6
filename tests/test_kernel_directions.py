"""The sampler's Gaussian directions (``rgg_launch(..., directions=...)``, ``triton_draw``) and RDMReg's one launch.

The law is checked against scipy: a coordinate u_j of a direction uniform on the sphere of
R^D has u_j^2 ~ Beta(1/2, (D - 1)/2). Statistical checks run at fixed seeds with the
thresholds of test_kernel_rgg (KS p-value 1e-4, 5 standard errors), which a correct sampler
passes at almost any seed. Sizes stay small (K * D <= ~20k): the kernels run in Triton's
interpreter on the CPU.
"""
import math

import numpy as np
import pytest
import torch
from scipy import stats

import lpjepa
from conftest import requires_cuda
from lpjepa import rgg
from lpjepa.kernels.rgg_sample import DIRECTIONS_MAX_BLOCK, philox_seed_offset, rgg_launch, rgg_philox_increment
from lpjepa.ops import rgg_sample as rgg_sample_op
from lpjepa.ops.rgg_sample import triton_draw

KS_PVALUE = 1e-4
# Above one chunk of a row: the two-pass path (norm, then the same counters again for the stores).
CHUNKED_DIM = DIRECTIONS_MAX_BLOCK + 476


def _directions(num, dim, *, dtype=torch.float32, seed=7, offset=0, target_shape=(3, 5), p=1.0):
    """(target, directions) of one launch at Philox (seed, offset)."""
    target = torch.empty(target_shape)
    directions = torch.empty(num, dim, dtype=dtype)
    rgg_launch(target, p=p, mu=0.0, sigma=1.0, seed=seed, offset=offset, directions=directions)()
    return target, directions


def _norm_tolerance(dtype, dim):
    """|norm - 1| bound: each stored element rounds with relative error <= eps/2 (so the norm does), plus the
    fp32 sum of D squares (relative error <= D * eps32) under the square root (halved), with a factor 2 of slack."""
    return torch.finfo(dtype).eps + dim * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("dim", [1, 5, 33, 257, CHUNKED_DIM])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_unit_rows_and_half_precision_is_the_fp32_draw_rounded(dim, dtype):
    num = max(2, min(64, 16384 // dim))
    _, exact = _directions(num, dim)
    norms = exact.double().norm(dim=1)
    assert torch.all((norms - 1).abs() <= _norm_tolerance(torch.float32, dim)), norms
    if dtype != torch.float32:
        _, rounded = _directions(num, dim, dtype=dtype)
        if dtype == torch.float16:
            # Computed in fp32 and rounded to nearest on store: exactly torch's cast of the fp32 draw.
            assert torch.equal(rounded, exact.to(dtype))
        else:  # the interpreter truncates to bf16 (test_kernel_rgg): within one bf16 step, exact on a GPU (below)
            assert torch.all((rounded.float() - exact).abs() <= torch.finfo(dtype).eps * exact.abs())
        norms = rounded.double().norm(dim=1)
        assert torch.all((norms - 1).abs() <= _norm_tolerance(dtype, dim)), norms


@requires_cuda
@pytest.mark.parametrize("dim", [33, 512, 8192])
def test_on_a_gpu_unit_rows_and_bf16_is_the_fp32_draw_rounded(dim):
    def draw(dtype):
        target = torch.empty(256, 512, device="cuda")
        directions = torch.empty(256, dim, dtype=dtype, device="cuda")
        rgg_launch(target, p=1.0, mu=0.0, sigma=1.0, seed=2024, offset=8, directions=directions)()
        return target, directions

    target, exact = draw(torch.float32)
    assert torch.all((exact.double().norm(dim=1) - 1).abs() <= _norm_tolerance(torch.float32, dim))
    for dtype in (torch.float16, torch.bfloat16):
        same_target, rounded = draw(dtype)
        assert torch.equal(same_target, target) and torch.equal(rounded, exact.to(dtype))
    beta = stats.beta(0.5, (dim - 1) / 2)
    assert stats.kstest(exact[:, 0].double().cpu().numpy() ** 2, beta.cdf).pvalue > KS_PVALUE


@pytest.mark.parametrize("num,dim", [(3000, 5), (600, 33), (80, 257)])
def test_coordinates_have_the_law_of_a_uniform_direction(num, dim):
    _, directions = _directions(num, dim, seed=11)
    u = directions.double().numpy()
    beta = stats.beta(0.5, (dim - 1) / 2)
    for column in {0, dim // 2, dim - 1}:  # rows are independent: one coordinate is an i.i.d. sample
        result = stats.kstest(u[:, column] ** 2, beta.cdf)
        assert result.pvalue > KS_PVALUE, (column, result)
        # Symmetric about 0: the sign is a fair coin, independent of |u_j| (a binomial within 5 standard errors).
        assert abs(np.mean(u[:, column] > 0) - 0.5) < 5 * 0.5 / math.sqrt(num)
    # Isotropy: every coordinate has E[u_j^2] = 1/D; Var(u_j^2) = 3 / (D (D + 2)) - 1 / D^2.
    stderr = math.sqrt((3 / (dim * (dim + 2)) - 1 / dim**2) / num)
    assert np.all(np.abs((u**2).mean(axis=0) - 1 / dim) < 5 * stderr)
    assert np.all(np.abs(u.mean(axis=0)) < 5 / math.sqrt(dim * num))


def test_ks_rejects_a_wrong_dimension():
    # The Beta law's test has the power to fail: D = 33 directions are not D = 22 ones (a norm over 2/3 of a row).
    _, directions = _directions(600, 33, seed=11)
    result = stats.kstest(directions[:, 0].double().numpy() ** 2, stats.beta(0.5, (22 - 1) / 2).cdf)
    assert result.pvalue < KS_PVALUE


def test_counter_layout_rows_and_chunks():
    # Element (k, j) owns counter offset + k * D + j: a later offset is a shifted set of rows ...
    _, whole = _directions(4, 33, offset=0)
    _, tail = _directions(2, 33, offset=66)
    assert torch.equal(whole[2:], tail)
    # ... and a chunked row holds the normals of shorter rows on the same counters, divided by the whole row's
    # norm: each half of a (1, 2 * half) row is parallel to the (2, half) rows, both below and above one chunk.
    half = CHUNKED_DIM // 2
    assert 2 * half > DIRECTIONS_MAX_BLOCK >= half
    _, long_row = _directions(1, 2 * half)
    _, short_rows = _directions(2, half)
    for part, row in zip(long_row[0].double().split(half), short_rows.double()):
        torch.testing.assert_close(part / part.norm(), row, atol=1e-5, rtol=0)
    torch.testing.assert_close(long_row.double().norm(), torch.tensor(1.0, dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("p", [1.0, 2.0, 1.5])
def test_the_target_stream_is_the_same_with_directions_and_independent_of_them(p):
    alone = torch.empty(1000, 8)
    rgg_launch(alone, p=p, mu=0.0, sigma=1.0, seed=123, offset=40)()
    # Directions with as many elements: direction element i draws on the target element i's first counter words.
    target, directions = _directions(1000, 8, seed=123, offset=40, target_shape=(1000, 8), p=p)
    assert torch.equal(target, alone)
    x = target.double().flatten().numpy()
    u = directions.double().flatten().numpy()
    bound = 5 / math.sqrt(x.size)  # the standard error of a correlation of independent samples
    assert abs(stats.pearsonr(x, u).statistic) < bound
    assert abs(stats.spearmanr(np.abs(x), np.abs(u)).statistic) < bound


def test_triton_draw_reproducible_from_the_generator_and_consecutive_draws_differ():
    def draw(generator):
        return triton_draw((6, 7), 9, 7, p=1.5, mu=-0.2, sigma=1.0, dtype=torch.float32,
                           directions_dtype=torch.bfloat16, device="cpu", generator=generator)

    default_state = torch.get_rng_state()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    first, second = draw(g1), draw(g1)
    again = draw(g2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], second[0]) and not torch.equal(first[1], second[1])
    assert first[0].shape == (6, 7) and first[0].dtype == torch.float32
    assert first[1].shape == (9, 7) and first[1].dtype == torch.bfloat16
    assert torch.equal(torch.get_rng_state(), default_state)  # an explicit generator leaves the default one alone
    # One generator advance for both: the launch's (seed, offset) is the next philox_seed_offset's.
    g3, g4 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    seed, offset = philox_seed_offset(rgg_philox_increment(42, 63), "cpu", g4)
    target, directions = torch.empty(6, 7), torch.empty(9, 7, dtype=torch.bfloat16)
    rgg_launch(target, p=1.5, mu=-0.2, sigma=1.0, seed=seed, offset=offset, directions=directions)()
    assert torch.equal(draw(g3)[1], directions)
    assert torch.equal(g3.get_state(), g4.get_state())


def test_increment_covers_the_larger_of_target_and_directions():
    assert rgg_philox_increment(100) == 100
    assert rgg_philox_increment(100, 300) == 300
    assert rgg_philox_increment(500, 300) == 500


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("target_draw", ["shared", "per-view"])
def test_rdmreg_on_triton_draws_both_in_one_launch(patch, dtype, target_draw):
    views = [torch.randn(12, 6, generator=torch.Generator().manual_seed(s)).to(dtype) for s in (1, 2)]
    module = lpjepa.RDMReg(p=1.0, num_projections=10, target_draw=target_draw, backend="triton")
    launches, seen = [], {}
    real_draw, real_loss = rgg_sample_op.triton_draw, lpjepa.loss.sliced_wasserstein_op.sliced_wasserstein

    def count(*args, **kwargs):
        launches.append(args)
        return real_draw(*args, **kwargs)

    def spy(views, target, directions, backend, gather=None):
        seen.update(target=target, directions=directions)
        return real_loss(views, target, directions, backend, gather)

    def refuse(*args, **kwargs):
        raise AssertionError("drawn apart")

    patch.setattr(rgg_sample_op, "triton_draw", count)
    patch.setattr(rgg_sample_op, "triton_sample", refuse)
    patch.setattr(lpjepa.loss.direction_ops, "random_projections", refuse)
    patch.setattr(lpjepa.loss.sliced_wasserstein_op, "sliced_wasserstein", spy)
    loss = module(*views, generator=torch.Generator().manual_seed(5))
    assert len(launches) == 1 and torch.isfinite(loss)
    target, directions = seen["target"], seen["directions"]
    assert target.shape == ((12, 6) if target_draw == "shared" else (2, 12, 6))
    assert directions.shape == (10, 6)
    assert target.dtype == directions.dtype == dtype  # the projection's operand dtype: nothing to cast
    assert bool((target >= 0).all()) and bool((target == 0).any())  # rectified at mu = 0
    # The same generator state gives the same draw, the pair that triton_draw gives by hand.
    by_hand = real_draw(target.shape, 10, 6, p=1.0, mu=0.0, sigma=rgg.sigma_gn(1.0), dtype=dtype,
                        directions_dtype=dtype, device="cpu", generator=torch.Generator().manual_seed(5))
    assert torch.equal(by_hand[0], target) and torch.equal(by_hand[1], directions)


def test_rdmreg_draws_apart_where_one_launch_does_not_apply(patch):
    views = [torch.randn(12, 6, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]

    def refuse(*args, **kwargs):
        raise AssertionError("one launch taken")

    patch.setattr(rgg_sample_op, "triton_draw", refuse)
    gen = torch.Generator().manual_seed(5)
    lpjepa.RDMReg(num_projections=10, backend="torch")(*views, generator=gen)  # the seed's draw
    lpjepa.RDMReg(num_projections=10, directions="orthogonal", backend="triton")(*views, generator=gen)
    lpjepa.RDMReg(num_projections=10, backend="triton")(*views, projections=torch.eye(6), generator=gen)
    lpjepa.RDMReg(num_projections=10, backend="triton")(*views, target=torch.rand(12, 6), generator=gen)
