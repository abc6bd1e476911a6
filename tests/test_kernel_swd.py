"""The sliced-Wasserstein forward (fused kernel and fallback) against a plain fp64 oracle.

The interpreter runs the fused kernel's per-direction sorts in Python, so shapes stay
small: at most 16 directions and B_PAD = 512 (B = 257 with 4 directions).
"""
from typing import NamedTuple

import pytest
import torch

import lpjepa.kernels.sliced_wasserstein as swd
from conftest import requires_cuda, tolerance
from lpjepa.kernels.sliced_wasserstein import swd_forward, swd_forward_plan


def oracle(z, target, projections):
    """fp64 (loss, residual_z, residual_target) from torch.matmul and a stable torch.sort."""
    proj_z = z.double() @ projections.double().T  # (B, K)
    proj_t = target.double() @ projections.double().T
    z_sorted, z_rows = torch.sort(proj_z, dim=0, stable=True)
    t_sorted, t_rows = torch.sort(proj_t, dim=0, stable=True)
    diff = z_sorted - t_sorted
    residual_z = torch.empty_like(diff.T).scatter_(1, z_rows.T, diff.T)
    residual_t = torch.empty_like(diff.T).scatter_(1, t_rows.T, -diff.T)
    return (diff**2).mean(), residual_z, residual_t


def make_inputs(batch, dim, num_projections, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, dim, generator=g).to(dtype)
    target = torch.relu(torch.randn(batch, dim, generator=g) + 0.3).to(dtype)
    projections = torch.randn(num_projections, dim, generator=g)
    projections = (projections / projections.norm(dim=1, keepdim=True)).to(dtype)
    return z, target, projections


class Path(NamedTuple):
    name: str
    options: dict  # the launcher keywords that force the path


@pytest.fixture(params=["fused", "fallback"])
def path(request):
    """Runs a test on both paths; the fallback is forced by a zero batch threshold."""
    return Path(request.param, {} if request.param == "fused" else dict(fused_max_batch=0))


def check(z, target, projections, path):
    (loss, residual_z, residual_t), launches = swd_forward_plan(
        z, target, projections, need_target_residual=True, **path.options
    )
    expected_kernel = "_swd_fused_kernel" if path.name == "fused" else "_swd_residual_kernel"
    assert launches[0].kernel.__name__ == expected_kernel
    for launch in launches:
        launch()
    want_loss, want_z, want_t = oracle(z, target, projections)
    atol, rtol = tolerance(z.dtype)
    batch, num_projections = z.shape[0], projections.shape[0]
    assert loss.shape == () and loss.dtype == torch.float32
    assert residual_z.shape == residual_t.shape == (num_projections, batch)
    assert residual_z.dtype == residual_t.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want_loss, atol=atol, rtol=rtol)
    torch.testing.assert_close(residual_z.double(), want_z, atol=atol, rtol=rtol)
    torch.testing.assert_close(residual_t.double(), want_t, atol=atol, rtol=rtol)


@pytest.mark.parametrize(
    "batch, dim, num_projections",
    [
        (2, 7, 3),  # smallest batch
        (3, 1, 5),  # D = 1
        (17, 40, 20),  # D not a multiple of BLOCK_D, K over one direction block
        (64, 33, 16),
        (255, 24, 8),  # odd, pads to 256
        (257, 18, 4),  # odd, pads to 512
    ],
)
def test_matches_oracle(batch, dim, num_projections, path):
    check(*make_inputs(batch, dim, num_projections, seed=batch), path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_input_dtypes(dtype, path):
    check(*make_inputs(33, 20, 7, dtype=dtype, seed=5), path)


def test_mixed_input_dtypes(path):
    z, target, projections = make_inputs(9, 12, 6, seed=8)
    check(z.half(), target, projections.half(), path)


@requires_cuda  # the Triton interpreter mishandles bf16
def test_bf16_inputs_on_gpu(path):
    z, target, projections = (t.bfloat16().cuda() for t in make_inputs(300, 64, 32, seed=4))
    (loss, residual_z, residual_t), launches = swd_forward_plan(
        z, target, projections, need_target_residual=True, **path.options
    )
    for launch in launches:
        launch()
    want_loss, want_z, want_t = oracle(z.cpu(), target.cpu(), projections.cpu())
    atol, rtol = tolerance(torch.bfloat16)
    torch.testing.assert_close(loss.double().cpu(), want_loss, atol=atol, rtol=rtol)
    torch.testing.assert_close(residual_z.double().cpu(), want_z, atol=atol, rtol=rtol)


def test_non_contiguous_inputs(path):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(21, 30, generator=g)[:, ::2]  # row stride 30, column stride 2
    target = torch.randn(15, 21, generator=g).T  # transposed: row stride 1
    projections = torch.randn(24, 15, generator=g)
    projections = (projections / projections.norm(dim=1, keepdim=True))[::2]  # row stride 30
    assert not (z.is_contiguous() or target.is_contiguous() or projections.is_contiguous())
    check(z, target, projections, path)


def test_ties_break_consistently(path):
    # Repeated rows make tied projections; the stable oracle agrees with either path.
    z, target, projections = make_inputs(12, 10, 5, seed=11)
    z[6:] = z[:6]
    target[1::2] = target[::2]
    check(z, target, projections, path)


def test_without_target_residual(path):
    z, target, projections = make_inputs(20, 16, 9, seed=2)
    loss, residual_z, residual_t = swd_forward(z, target, projections, **path.options)
    assert residual_t is None
    want_loss, want_z, _ = oracle(z, target, projections)
    atol, rtol = tolerance(torch.float32)
    torch.testing.assert_close(loss.double(), want_loss, atol=atol, rtol=rtol)
    torch.testing.assert_close(residual_z.double(), want_z, atol=atol, rtol=rtol)


def test_deterministic(path):
    inputs = make_inputs(50, 24, 6, seed=6)
    first = swd_forward(*inputs, need_target_residual=True, **path.options)
    second = swd_forward(*inputs, need_target_residual=True, **path.options)
    assert first[0].view(torch.int32) == second[0].view(torch.int32)  # bit-identical loss
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])


@pytest.mark.parametrize("which", ["z", "target"])
def test_nan_input_gives_nan_loss(which, path):
    z, target, projections = make_inputs(10, 6, 3, seed=9)
    (z if which == "z" else target)[4, 2] = float("nan")
    loss, residual_z, _ = swd_forward(z, target, projections, **path.options)
    assert torch.isnan(loss)
    assert torch.isnan(residual_z).any()


def test_threshold_picks_the_path():
    inputs = make_inputs(8, 4, 2)
    assert swd_forward_plan(*inputs)[1][0].kernel.__name__ == "_swd_fused_kernel"
    assert swd_forward_plan(*inputs, fused_max_batch=7)[1][0].kernel.__name__ == "_swd_residual_kernel"
    batch = swd.FUSED_MAX_BATCH + 1
    assert not swd.swd_use_fused(batch)


@pytest.mark.parametrize(
    "shapes",
    [((4, 3), (5, 3), (2, 3)), ((4, 3), (4, 3), (2, 4)), ((4,), (4,), (2, 4)), ((0, 3), (0, 3), (2, 3))],
)
def test_rejects_bad_shapes(shapes):
    z, target, projections = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError):
        swd_forward(z, target, projections)


def test_rejects_float64():
    z, target, projections = make_inputs(4, 3, 2)
    with pytest.raises(ValueError):
        swd_forward(z.double(), target, projections)
