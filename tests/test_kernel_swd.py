"""The sliced-Wasserstein kernels (projection, sort and residual, both paths each) against a plain fp64 oracle.

The interpreter runs the register sort in Python, so shapes stay small: at most a few
dozen directions and B_PAD = 512 (B = 257).
"""
import pytest
import torch

from conftest import requires_cuda, tolerance
from lpjepa.kernels import sliced_wasserstein as swd

# The two steps' paths are independent, so two pairs cover every path of each step.
ALL_PATHS = [("triton", "registers"), ("cublas", "torch_sort")]


def oracle(views, targets, projections):
    """fp64 (loss, residual, residual_target) from einsum and a stable torch.sort."""
    proj = torch.einsum("kd,vbd->vkb", projections.double(), views.double())
    proj_t = torch.einsum("kd,tbd->tkb", projections.double(), targets.double())
    z_sorted, z_cols = torch.sort(proj, dim=2, stable=True)
    t_sorted, t_cols = torch.sort(proj_t, dim=2, stable=True)
    diff = z_sorted - t_sorted.expand_as(z_sorted)
    residual = torch.empty_like(diff).scatter_(2, z_cols, diff)
    target_diff = diff.sum(0, keepdim=True) if proj_t.shape[0] == 1 else diff
    residual_t = torch.empty_like(proj_t).scatter_(2, t_cols, -target_diff)
    return (diff**2).mean(), residual, residual_t


def make_inputs(views, targets, batch, dim, num_projections, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(views, batch, dim, generator=g).to(dtype)
    t = torch.relu(torch.randn(targets, batch, dim, generator=g) + 0.3).to(dtype)
    projections = torch.randn(num_projections, dim, generator=g)
    projections = (projections / projections.norm(dim=1, keepdim=True)).to(dtype)
    return x, t, projections


def check(views, targets, projections, paths, dtype=None, allow_tf32=False):
    loss, residual, residual_t = swd.sliced_wasserstein_forward(
        views, targets, projections, need_target_residual=True, paths=paths, allow_tf32=allow_tf32
    )
    want_loss, want_residual, want_t = oracle(views, targets, projections)
    atol, rtol = tolerance(dtype or views.dtype)
    assert loss.shape == () and loss.dtype == torch.float32
    assert residual.shape == views.shape[:1] + (projections.shape[0], views.shape[1])
    assert residual_t.shape == (targets.shape[0], projections.shape[0], views.shape[1])
    assert residual.dtype == residual_t.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want_loss, atol=atol, rtol=rtol)
    torch.testing.assert_close(residual.double(), want_residual, atol=atol, rtol=rtol)
    torch.testing.assert_close(residual_t.double(), want_t, atol=atol, rtol=rtol)


@pytest.mark.parametrize("paths", ALL_PATHS)
@pytest.mark.parametrize(
    "views, targets, batch, dim, num_projections",
    [
        (1, 1, 2, 7, 3),  # smallest batch
        (1, 1, 3, 1, 5),  # D = 1
        (2, 1, 17, 40, 20),  # two views, one shared target; D not a multiple of the D step
        (2, 2, 64, 33, 17),  # a target per view
        (1, 1, 255, 24, 8),  # odd, pads to 256
        (2, 1, 257, 18, 4),  # odd, pads to 512
    ],
)
def test_matches_oracle(views, targets, batch, dim, num_projections, paths):
    check(*make_inputs(views, targets, batch, dim, num_projections, seed=batch), paths)


@pytest.mark.parametrize("need_target_residual", [False, True])
def test_several_directions_per_program(need_target_residual):
    # With many directions small batches pack several into a program; 4 a program over 10
    # directions leaves the last program half empty.
    assert swd.sort_config(8, 600)["ROWS"] == 2
    views, targets, projections = make_inputs(2, 1, 8, 6, 10, seed=1)
    proj, proj_t = (swd.project_plan(t, projections, path="cublas")[0] for t in (views, targets))
    (loss, residual, residual_t), launches = swd.sort_residual_plan(
        proj, proj_t, need_target_residual=need_target_residual, rows=4
    )
    assert launches[0].grid == (3,)
    for launch in launches:
        launch()
    want_loss, want_residual, want_t = oracle(views, targets, projections)
    atol, rtol = tolerance(torch.float32)
    torch.testing.assert_close(loss.double(), want_loss, atol=atol, rtol=rtol)
    torch.testing.assert_close(residual.double(), want_residual, atol=atol, rtol=rtol)
    if need_target_residual:
        torch.testing.assert_close(residual_t.double(), want_t, atol=atol, rtol=rtol)


@pytest.mark.parametrize("paths", ALL_PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_input_dtypes(dtype, paths):
    check(*make_inputs(2, 1, 33, 20, 7, dtype=dtype, seed=5), paths)


def test_tf32_mode_on_the_interpreter():
    # The interpreter multiplies in fp32, so this checks the plumbing; a GPU rounds to TF32.
    inputs = make_inputs(1, 1, 40, 24, 16, seed=3)
    assert swd.project_config(1, 40, 24, 16, torch.float32, True)["INPUT_PRECISION"] == "tf32"
    check(*inputs, ("triton", "registers"), allow_tf32=True)


@requires_cuda  # the Triton interpreter mishandles bf16
@pytest.mark.parametrize("paths", ALL_PATHS)
def test_bf16_inputs_on_gpu(paths):
    views, targets, projections = (t.bfloat16().cuda() for t in make_inputs(2, 1, 300, 64, 32, seed=4))
    loss, residual, _ = swd.sliced_wasserstein_forward(views, targets, projections, paths=paths)
    want_loss, want_residual, _ = oracle(views.cpu(), targets.cpu(), projections.cpu())
    atol, rtol = tolerance(torch.bfloat16)
    torch.testing.assert_close(loss.double().cpu(), want_loss, atol=atol, rtol=rtol)
    torch.testing.assert_close(residual.double().cpu(), want_residual, atol=atol, rtol=rtol)


@pytest.mark.parametrize("paths", ALL_PATHS)
def test_non_contiguous_inputs(paths):
    g = torch.Generator().manual_seed(3)
    views = torch.randn(2, 21, 30, generator=g)[:, :, ::2]  # column stride 2
    targets = torch.randn(1, 15, 21, generator=g).transpose(1, 2)  # row stride 1
    projections = torch.randn(24, 15, generator=g)
    projections = (projections / projections.norm(dim=1, keepdim=True))[::2]  # row stride 30
    assert not (views.is_contiguous() or targets.is_contiguous() or projections.is_contiguous())
    check(views, targets, projections, paths)


@pytest.mark.parametrize("paths", ALL_PATHS)
def test_ties_break_consistently(paths):
    # Repeated rows make tied projections; the stable oracle agrees with either path.
    views, targets, projections = make_inputs(1, 1, 12, 10, 5, seed=11)
    views[:, 6:] = views[:, :6]
    targets[:, 1::2] = targets[:, ::2]
    check(views, targets, projections, paths)


@pytest.mark.parametrize("paths", ALL_PATHS)
def test_without_target_residual(paths):
    inputs = make_inputs(2, 1, 20, 16, 9, seed=2)
    loss, residual, residual_t = swd.sliced_wasserstein_forward(*inputs, paths=paths)
    assert residual_t is None
    want_loss, want_residual, _ = oracle(*inputs)
    atol, rtol = tolerance(torch.float32)
    torch.testing.assert_close(loss.double(), want_loss, atol=atol, rtol=rtol)
    torch.testing.assert_close(residual.double(), want_residual, atol=atol, rtol=rtol)


@pytest.mark.parametrize("paths", ALL_PATHS)
def test_deterministic(paths):
    inputs = make_inputs(2, 1, 50, 24, 6, seed=6)
    first = swd.sliced_wasserstein_forward(*inputs, need_target_residual=True, paths=paths)
    second = swd.sliced_wasserstein_forward(*inputs, need_target_residual=True, paths=paths)
    assert first[0].view(torch.int32) == second[0].view(torch.int32)  # bit-identical loss
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])


@pytest.mark.parametrize("paths", ALL_PATHS)
@pytest.mark.parametrize("which", ["views", "targets"])
def test_nan_input_gives_nan_loss(which, paths):
    views, targets, projections = make_inputs(1, 1, 10, 6, 3, seed=9)
    (views if which == "views" else targets)[0, 4, 2] = float("nan")
    loss, residual, _ = swd.sliced_wasserstein_forward(views, targets, projections, paths=paths)
    assert torch.isnan(loss)
    assert torch.isnan(residual).any()


def test_default_paths_follow_the_register_sort_limit():
    limit = swd.register_sort_max_batch()
    assert swd.default_paths(limit) == ("triton", "registers")
    assert swd.default_paths(limit + 1) == ("triton", "torch_sort")
    assert swd.default_paths(limit, need_target_residual=True) == ("triton", "torch_sort")
    proj = torch.empty((1, 4, limit + 1), device="meta")
    with pytest.raises(ValueError, match="register sort takes B <="):
        swd.sort_residual_plan(proj, proj, path="registers")


def test_below_sm_80_the_default_projection_is_cublas():
    # Triton's tl.dot has no tensor cores on sm_75 (compile_report --arch 75: 0 HMMA); cuBLAS does.
    assert swd.default_paths(256, arch=75) == ("cublas", "registers")
    for arch in (None, 80, 86, 89, 90, 100, 120):
        assert swd.default_paths(256, arch=arch) == ("triton", "registers")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("allow_tf32", [False, True])
def test_sm_75_takes_an_fma_tile_and_no_tf32(dtype, allow_tf32):
    cfg = swd.project_config(2, 1024, 512, 8192, dtype, allow_tf32, arch=75)
    # The largest tile that does not spill there with fp16 / bf16 operands (compile_report --arch 75).
    assert (cfg["BLOCK_K"], cfg["BLOCK_B"], cfg["BLOCK_D"], cfg["num_warps"]) == (64, 64, 16, 8)
    assert cfg["INPUT_PRECISION"] == "ieee"  # Turing has no TF32
    sm_80 = swd.project_config(2, 1024, 512, 8192, dtype, allow_tf32, arch=80)
    assert sm_80 == swd.project_config(2, 1024, 512, 8192, dtype, allow_tf32)  # None: the sm_80+ tiles
    assert sm_80["INPUT_PRECISION"] == ("tf32" if dtype == torch.float32 and allow_tf32 else "ieee")


@pytest.mark.parametrize("path", swd.PROJECTION_PATHS)
def test_the_sm_75_tiles_compute_the_projection(path):
    views, _, projections = make_inputs(2, 1, 70, 40, 9, seed=21)  # partial 64-tiles in K, B and D
    out, launches = swd.project_plan(views, projections, path=path, arch=75)
    assert all(launch.meta["BLOCK_D"] == 16 for launch in launches)
    for launch in launches:
        launch()
    want = torch.einsum("kd,sbd->skb", projections.double(), views.double())
    torch.testing.assert_close(out.double(), want, **dict(zip(("atol", "rtol"), tolerance(torch.float32))))


def test_bf16_below_sm_80_is_multiplied_as_fp32():
    assert swd.bf16_as_fp32(torch.bfloat16, 75)
    assert not any(swd.bf16_as_fp32(torch.bfloat16, arch) for arch in (None, 80, 90, 120))
    assert not swd.bf16_as_fp32(torch.float16, 75)  # fp16 keeps cuBLAS's tensor cores on Turing
    views, _, projections = (t.bfloat16() for t in make_inputs(2, 1, 30, 20, 6, seed=22))
    out, _ = swd.project_plan(views, projections, path="cublas", arch=75)
    # bf16 values and their products are exact in fp32: the fp64 sum up to fp32 rounding.
    want = torch.einsum("kd,sbd->skb", projections.double(), views.double())
    torch.testing.assert_close(out.double(), want, **dict(zip(("atol", "rtol"), tolerance(torch.float32))))


@pytest.mark.parametrize("batch, num_projections", [(256, 256), (256, 8192), (1024, 8192), (4096, 4096)])
def test_sorts_spread_over_every_sm(batch, num_projections):
    # The seed's, the official recipe's and a large shape: at least one program per H100 SM.
    cfg = swd.sort_config(batch, num_projections)
    assert -(-num_projections // cfg["ROWS"]) >= 132


@pytest.mark.parametrize(
    "shapes",
    [((2, 4, 3), (1, 5, 3), (2, 3)), ((1, 4, 3), (1, 4, 3), (2, 4)), ((4, 3), (4, 3), (2, 3)),
     ((1, 0, 3), (1, 0, 3), (2, 3)), ((3, 4, 3), (2, 4, 3), (2, 3))],
)
def test_rejects_bad_shapes(shapes):
    views, targets, projections = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError):
        swd.sliced_wasserstein_forward(views, targets, projections)


def test_rejects_float64():
    views, targets, projections = make_inputs(1, 1, 4, 3, 2)
    with pytest.raises(ValueError):
        swd.sliced_wasserstein_forward(views.double(), targets.double(), projections.double())


@pytest.mark.parametrize("path", swd.PROJECTION_PATHS)
def test_a_set_of_directions_per_source(path):
    views, _, _ = make_inputs(3, 1, 20, 12, 5, seed=12)
    g = torch.Generator().manual_seed(13)
    projections = torch.nn.functional.normalize(torch.randn(3, 9, 12, generator=g), dim=2)
    out, launches = swd.project_plan(views, projections, path=path)
    for launch in launches:
        launch()
    want = torch.einsum("skd,sbd->skb", projections.double(), views.double())
    torch.testing.assert_close(out.double(), want, **dict(zip(("atol", "rtol"), tolerance(torch.float32))))


@pytest.mark.parametrize("path", swd.PROJECTION_PATHS)
@pytest.mark.parametrize("sources, batch, dim, num_projections, dtype", [
    (2, 3, 5, 3, torch.float32),  # one view and its target: odd, tiny
    (3, 17, 40, 20, torch.float32),  # two views and a target: D not a multiple of the D step
    (3, 16, 32, 16, torch.float16),
])
def test_separate_sources_read_where_they_lie(path, sources, batch, dim, num_projections, dtype):
    """A tuple of (B, D) sources projects as their stack would, without the stacked copy."""
    stacked, _, projections = make_inputs(sources, 1, batch, dim, num_projections, dtype=dtype, seed=21)
    separate = tuple(t.clone() for t in stacked.unbind(0))  # tensors of their own, as the loss's views and target are
    out, launches = swd.project_plan(separate, projections, path=path)
    for launch in launches:
        launch()
    want = torch.einsum("kd,sbd->skb", projections.double(), stacked.double())
    assert out.shape == (sources, num_projections, batch)
    torch.testing.assert_close(out.double(), want, **dict(zip(("atol", "rtol"), tolerance(dtype))))
    if path == "triton":
        assert launches[0].meta["SOURCE_POINTERS"] == sources
        assert all(arg is not stacked for arg in launches[0].args)


@pytest.mark.parametrize("separate", [
    lambda: (torch.randn(4, 3),),  # one source: stack it
    lambda: tuple(torch.randn(4, 3) for _ in range(4)),  # more than the kernel's three pointers
    lambda: (torch.randn(4, 3), torch.randn(3, 4).T),  # one shape, different strides
    lambda: (torch.randn(4, 3), torch.randn(4, 3).half()),  # two dtypes
])
def test_separate_sources_of_another_layout_are_refused(separate):
    with pytest.raises(ValueError, match="stack them"):
        swd.project_plan(separate(), torch.randn(2, 3))


# --- The projection's backward: the views' gradient in one launch ------------------------


def backward_inputs(sources, batch, dim, num_projections, dtype, shared, seed):
    """(residual (S, K, B) fp32, directions (K, D) or (S, K, D) in dtype, a random 0-dim fp32 scale)."""
    g = torch.Generator().manual_seed(seed)
    residual = torch.randn(sources, num_projections, batch, generator=g)
    shape = (num_projections, dim) if shared else (sources, num_projections, dim)
    directions = torch.nn.functional.normalize(torch.randn(shape, generator=g), dim=-1).to(dtype)
    scale = (torch.rand((), generator=g) * 4 - 2).float()  # random, sign included: never the identity
    return residual, directions, scale


def backward_oracle(residual, directions, scale):
    """fp64 scale * residual^T @ P per source, the residual rounded to P's dtype first (the formula's rounding)."""
    P = directions.double()
    P = P.expand(residual.shape[0], -1, -1) if P.dim() == 2 else P
    return scale.double() * torch.einsum("skb,skd->sbd", residual.to(directions.dtype).double(), P)


def coarser_tolerance(*dtypes):
    """(atol, rtol) of the least precise of ``dtypes``: the operands' rounding or the output's."""
    tolerances = [tolerance(dtype) for dtype in dtypes]
    return dict(atol=max(t[0] for t in tolerances), rtol=max(t[1] for t in tolerances))


def run_backward_plan(residual, directions, scale, out_dtype, **kwargs):
    grad_x, launches = swd.project_backward_plan(residual, directions, scale, out_dtype=out_dtype, **kwargs)
    assert len(launches) == 1 and launches[0].kernel is swd._project_backward_kernel
    launches[0]()
    return grad_x


BACKWARD_SHAPES = [
    # (S, B, D, K): tiny and odd (every dimension below tl.dot's 16, partial tiles, K past one step) beside round.
    (1, 3, 5, 3),
    (2, 17, 33, 40),
    (3, 3, 33, 17),
    (1, 17, 5, 40),
    (2, 64, 32, 32),
]


# bf16 runs on a GPU only (the interpreter mishandles bf16 arithmetic): test_project_backward_bf16_on_gpu.
@pytest.mark.parametrize("sources, batch, dim, num_projections", BACKWARD_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shared", [True, False])
def test_project_backward_matches_fp64(sources, batch, dim, num_projections, dtype, shared):
    residual, directions, scale = backward_inputs(sources, batch, dim, num_projections, dtype, shared,
                                                  seed=sources * 1000 + batch * 10 + dim)
    grad_x = run_backward_plan(residual, directions, scale, dtype)
    assert grad_x.shape == (sources, batch, dim) and grad_x.dtype == dtype and grad_x.is_contiguous()
    want = backward_oracle(residual, directions, scale)
    torch.testing.assert_close(grad_x.double(), want, **coarser_tolerance(dtype))


@pytest.mark.parametrize("dtype, out_dtype", [(torch.float32, torch.float16), (torch.float16, torch.float32)])
def test_project_backward_writes_the_asked_dtype(dtype, out_dtype):
    # Views whose dtypes differ take an fp32 gradient; fp32 operands may write a narrower one.
    residual, directions, scale = backward_inputs(2, 17, 33, 40, dtype, True, seed=41)
    grad_x = run_backward_plan(residual, directions, scale, out_dtype)
    assert grad_x.dtype == out_dtype
    want = backward_oracle(residual, directions, scale)
    torch.testing.assert_close(grad_x.double(), want, **coarser_tolerance(dtype, out_dtype))


def test_project_backward_reads_a_strided_residual():
    # Under a process group the op keeps its own rows of the residual: a slice along B.
    residual, directions, scale = backward_inputs(2, 30, 20, 24, torch.float32, False, seed=42)
    local = residual[:, :, 7:20]
    assert not local.is_contiguous()
    grad_x = run_backward_plan(local, directions, scale, torch.float32)
    torch.testing.assert_close(grad_x.double(), backward_oracle(local, directions, scale),
                               **coarser_tolerance(torch.float32))


def test_project_backward_on_the_sm_75_tiles_and_tf32():
    # Below sm_80 an FMA tile and no TF32 (Turing has none); from sm_80 fp32 asks for TF32 when allowed.
    cfg = swd.project_backward_config(2, 1024, 512, 8192, torch.float16, False, arch=75)
    assert (cfg["BLOCK_B"], cfg["BLOCK_D"], cfg["BLOCK_K"], cfg["num_warps"]) == (64, 64, 16, 8)
    assert swd.project_backward_config(2, 1024, 512, 8192, torch.float32, True, arch=75)["INPUT_PRECISION"] == "ieee"
    assert swd.project_backward_config(2, 1024, 512, 8192, torch.float32, True, arch=90)["INPUT_PRECISION"] == "tf32"
    residual, directions, scale = backward_inputs(2, 70, 80, 20, torch.float32, True, seed=43)  # partial 64-tiles
    for kwargs in (dict(arch=75), dict(allow_tf32=True)):  # the interpreter multiplies TF32 in fp32: the plumbing
        grad_x = run_backward_plan(residual, directions, scale, torch.float32, **kwargs)
        torch.testing.assert_close(grad_x.double(), backward_oracle(residual, directions, scale),
                                   **coarser_tolerance(torch.float32), msg=str(kwargs))


@pytest.mark.parametrize("batch, dim, sources", [(256, 512, 2), (1024, 2048, 2), (4096, 512, 3)])
def test_project_backward_tiles_fit_the_shape(batch, dim, sources):
    for dtype, allow_tf32 in ((torch.float32, False), (torch.float32, True), (torch.float16, False)):
        cfg = swd.project_backward_config(sources, batch, dim, 256, dtype, allow_tf32)
        assert min(cfg["BLOCK_B"], cfg["BLOCK_D"], cfg["BLOCK_K"]) >= 16  # tl.dot's smallest
        assert cfg["BLOCK_B"] <= batch and cfg["BLOCK_D"] <= dim


def test_project_backward_plans_on_meta_tensors():
    # The compile report builds the launch on meta tensors: no data, no device.
    residual = torch.empty((2, 256, 1024), device="meta")
    directions = torch.empty((256, 512), dtype=torch.bfloat16, device="meta")
    scale = torch.empty((), device="meta")
    grad_x, launches = swd.project_backward_plan(residual, directions, scale, out_dtype=torch.bfloat16, arch=90)
    assert grad_x.shape == (2, 1024, 512) and grad_x.dtype == torch.bfloat16 and grad_x.device.type == "meta"
    cfg = launches[0].meta
    assert launches[0].grid == (-(-1024 // cfg["BLOCK_B"]) * -(-512 // cfg["BLOCK_D"]), 2)
    assert launches[0].args[7:13] == (256 * 1024, 1024, 1, 0, 512, 1)  # shared directions: stride 0 along S


@pytest.mark.parametrize(
    "residual, directions, scale, out_dtype",
    [
        (torch.randn(2, 4, 3), torch.randn(5, 6), torch.ones(()), torch.float32),  # K disagrees
        (torch.randn(2, 4, 3), torch.randn(3, 4, 6), torch.ones(()), torch.float32),  # S disagrees
        (torch.randn(2, 4, 3).double(), torch.randn(4, 6), torch.ones(()), torch.float32),  # fp64 residual
        (torch.randn(2, 4, 3), torch.randn(4, 6).double(), torch.ones(()), torch.float32),  # fp64 directions
        (torch.randn(2, 4, 3), torch.randn(4, 6), torch.ones(2), torch.float32),  # two scales
        (torch.randn(2, 4, 3), torch.randn(4, 6), torch.ones(()), torch.float64),  # no fp64 output
    ],
)
def test_project_backward_rejects_bad_inputs(residual, directions, scale, out_dtype):
    with pytest.raises(ValueError):
        swd.project_backward_plan(residual, directions, scale, out_dtype=out_dtype)


@requires_cuda  # the Triton interpreter mishandles bf16
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dtype, allow_tf32", [(torch.bfloat16, False), (torch.float16, False),
                                               (torch.float32, True)])
def test_project_backward_on_gpu(shared, dtype, allow_tf32):
    for sources, batch, dim, num_projections in BACKWARD_SHAPES + [(2, 256, 512, 256), (2, 1000, 300, 130)]:
        residual, directions, scale = backward_inputs(sources, batch, dim, num_projections, dtype, shared, seed=dim)
        grad_x = run_backward_plan(residual.cuda(), directions.cuda(), scale.cuda(), dtype, allow_tf32=allow_tf32)
        want = backward_oracle(residual, directions, scale)
        # TF32 keeps fp16's 10 mantissa bits.
        torch.testing.assert_close(grad_x.double().cpu(), want,
                                   **coarser_tolerance(torch.float16 if allow_tf32 else dtype),
                                   msg=f"{(sources, batch, dim, num_projections)}")


@pytest.mark.parametrize("sort_path", swd.SORT_PATHS)
@pytest.mark.parametrize("need_target_residual", [False, True])
def test_the_residual_written_over_the_projections_is_the_same(sort_path, need_target_residual):
    views, targets, projections = make_inputs(2, 1, 33, 12, 9, seed=31)
    proj, _ = swd.project_plan(views, projections, path="cublas")
    proj_t, _ = swd.project_plan(targets, projections, path="cublas")
    kept = proj.clone()
    outputs = {}
    for in_place in (False, True):
        (loss, residual, residual_t), launches = swd.sort_residual_plan(
            proj, proj_t, need_target_residual=need_target_residual, path=sort_path, residual_scale=0.25,
            in_place=in_place)
        for launch in launches:
            launch()
        outputs[in_place] = (loss, residual, residual_t)
        if not in_place:
            assert torch.equal(proj, kept)  # read, never written
    assert outputs[True][1] is proj
    for apart, over in zip(outputs[False], outputs[True]):
        if apart is not None:
            torch.testing.assert_close(over, apart, rtol=0, atol=0)
