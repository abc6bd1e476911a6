"""Every path a GPU can take, against the fp64 reference: what `benchmarks/gpu_check.sh` runs first.

The loss runs through the public API with each step's path forced (``LPJEPA_PROJECTION_PATH``,
``LPJEPA_SORT_PATH``): the projection on the Triton kernel and on cuBLAS in fp32 IEEE, TF32,
fp16 and bf16; the register sort with one and with several directions per program, with
and without the target's gradient; the torch.sort path, forced and past the register
sort's largest batch; per-view targets and directions; odd batches. The inputs are rounded
to the dtype first, so the fp64 reference sees the values the kernels see and the
comparison measures the kernels' arithmetic: fp32 accumulation, TF32 operands, and the
backward's operands rounded to the features' dtype. Errors are relative (norm of the
difference over the norm of the reference), so a tolerance cannot be met by tiny values.

``check_against_reference`` also runs on the CPU interpreter at tiny shapes (fp32 and fp16,
the first tests), so its logic is exercised wherever the suite runs; the rest need CUDA.
"""
import math
import os

import numpy as np
import pytest
import scipy.stats
import torch

import lpjepa
from lpjepa import reference
from lpjepa.kernels import sliced_wasserstein as kernels
from conftest import requires_cuda, tolerance
from test_kernel_rgg import check_against_gennorm, gennorm, unit_variance_sigma

PRECISIONS = {  # name: (features' dtype, TF32 allowed, the dtype whose tolerance it earns)
    "fp32 IEEE": (torch.float32, False, torch.float32),
    "fp32 TF32": (torch.float32, True, torch.float16),  # TF32 keeps fp16's 10 mantissa bits
    "fp16": (torch.float16, False, torch.float16),
    "bf16": (torch.bfloat16, False, torch.bfloat16),
}


def _relative_error(got, want):
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-300)).item()


def _inputs(views, batch, dim, num_projections, dtype, *, per_view, seed, device):
    """z (V, B, D) in dtype, a rectified target ((B, D) or (V, B, D)) and unit directions ((K, D) or (V, K, D)).

    Directions and target are rounded to ``dtype`` (and the directions kept fp32), so the
    loss's own rounding to the features' dtype changes nothing.
    """
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(views, batch, dim, generator=gen).to(dtype)
    target_shape = (views, batch, dim) if per_view else (batch, dim)
    target = torch.relu(torch.randn(target_shape, generator=gen) + 0.3).to(dtype)
    direction_shape = (views, num_projections, dim) if per_view else (num_projections, dim)
    projections = torch.nn.functional.normalize(torch.randn(direction_shape, generator=gen), dim=-1)
    projections = projections.to(dtype).float()
    return [t.to(device) for t in (z, target, projections)]


def _reference_loss(z, target, projections):
    """The mean over views of the seed's loss, in fp64, with per-view targets and directions where given."""
    losses = [
        reference.rdmreg_loss(z[v], target[v] if target.dim() == 3 else target,
                              projections=projections[v] if projections.dim() == 3 else projections)
        for v in range(z.shape[0])
    ]
    return sum(losses) / len(losses)


def check_against_reference(patch, device, precision, projection_path, sort_path, *, batch=96, dim=40,
                            num_projections=48, views=2, per_view=False, target_grad=True, seed=0):
    """The loss and the gradients of z, the target and the directions on the forced paths, against fp64 autograd."""
    dtype, allow_tf32, tolerance_dtype = PRECISIONS[precision]
    patch.torch_flag(torch.backends.cuda.matmul, "allow_tf32", allow_tf32)
    patch.setenv("LPJEPA_PROJECTION_PATH", projection_path)
    patch.setenv("LPJEPA_SORT_PATH", sort_path)
    z, target, projections = _inputs(views, batch, dim, num_projections, dtype, per_view=per_view, seed=seed,
                                     device=device)
    leaves = [z.clone().requires_grad_(), target.clone().requires_grad_(target_grad),
              projections.clone().requires_grad_()]
    rdmreg = lpjepa.RDMReg(num_projections=num_projections, backend="triton")
    loss = rdmreg(*leaves[0], target=leaves[1], projections=leaves[2])
    wanted = [leaf for leaf in leaves if leaf.requires_grad]
    grads = torch.autograd.grad(loss * (num_projections * batch), wanted)
    ref_leaves = [t.detach().cpu().double().requires_grad_(t.requires_grad) for t in leaves]
    ref = _reference_loss(*ref_leaves)
    ref_grads = torch.autograd.grad(ref * (num_projections * batch), [t for t in ref_leaves if t.requires_grad])
    _, rtol = tolerance(tolerance_dtype)
    label = f"{precision} {projection_path}/{sort_path} B={batch}"
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.item() - ref.item()) <= rtol * abs(ref.item()), (label, loss.item(), ref.item())
    names = [name for name, leaf in zip(("z", "target", "directions"), leaves) if leaf.requires_grad]
    for name, leaf, g, r in zip(names, wanted, grads, ref_grads):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        assert _relative_error(g.cpu(), r) <= rtol, (label, name, _relative_error(g.cpu(), r))


# On a GPU machine the interpreter is off (conftest sets it only without CUDA) and the cuda tests run the check.
on_the_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter")


@on_the_interpreter
@pytest.mark.parametrize("precision,per_view", [("fp32 IEEE", False), ("fp16", True)])
def test_the_check_runs_on_the_interpreter(patch, precision, per_view):
    # The CPU proof of the check itself: tiny shapes, both paths of each step (no bf16: the interpreter mishandles it).
    for projection_path, sort_path in (("triton", "registers"), ("cublas", "torch_sort")):
        check_against_reference(patch, "cpu", precision, projection_path, sort_path, batch=13, dim=6,
                                num_projections=8, per_view=per_view)


@on_the_interpreter
def test_the_check_fails_on_a_wrong_loss(patch):
    # The check can fail: a loss 3% off is caught.
    real = lpjepa.RDMReg.forward
    patch.setattr(lpjepa.RDMReg, "forward", lambda self, *a, **k: 1.03 * real(self, *a, **k))
    with pytest.raises(AssertionError):
        check_against_reference(patch, "cpu", "fp32 IEEE", "cublas", "torch_sort", batch=13, dim=6,
                                num_projections=8)


@requires_cuda
@pytest.mark.parametrize("projection_path", kernels.PROJECTION_PATHS)
@pytest.mark.parametrize("precision", sorted(PRECISIONS))
def test_every_projection_precision(patch, precision, projection_path):
    check_against_reference(patch, "cuda", precision, projection_path, "registers", target_grad=False)


@requires_cuda
@pytest.mark.parametrize("batch", [3, 255, 256, 257])
@pytest.mark.parametrize("target_grad", [False, True])
def test_register_sort_one_direction_per_program(patch, batch, target_grad):
    assert kernels.sort_config(batch, 48, target_grad)["ROWS"] == 1
    check_against_reference(patch, "cuda", "fp32 IEEE", "triton", "registers", batch=batch,
                            target_grad=target_grad)


@requires_cuda
@pytest.mark.parametrize("precision", ["fp32 IEEE", "bf16"])
@pytest.mark.parametrize("target_grad", [False, True])
def test_register_sort_several_directions_per_program(patch, precision, target_grad):
    batch, num_projections = 100, 2048
    assert kernels.sort_config(batch, num_projections, target_grad)["ROWS"] > 1
    check_against_reference(patch, "cuda", precision, "triton", "registers", batch=batch, dim=32,
                            num_projections=num_projections, target_grad=target_grad)


@requires_cuda
@pytest.mark.parametrize("batch", [255, kernels.register_sort_max_batch() + 3])
@pytest.mark.parametrize("target_grad", [False, True])
def test_torch_sort_path(patch, batch, target_grad):
    if batch > kernels.register_sort_max_batch():
        assert kernels.sort_paths_for(batch, target_grad) == ("torch_sort",)
    check_against_reference(patch, "cuda", "fp32 IEEE", "triton", "torch_sort", batch=batch, dim=16,
                            num_projections=16, target_grad=target_grad)


@requires_cuda
@pytest.mark.parametrize("paths", [("triton", "registers"), ("cublas", "torch_sort")])
@pytest.mark.parametrize("precision", ["fp32 IEEE", "bf16"])
def test_per_view_targets_and_directions(patch, paths, precision):
    check_against_reference(patch, "cuda", precision, *paths, batch=257, per_view=True)


@requires_cuda
def test_three_views_against_one_target(patch):
    check_against_reference(patch, "cuda", "fp16", "triton", "registers", views=3, batch=255)


@requires_cuda
def test_svd_directions_match_the_torch_backend():
    # The SVD directions are the views' own: the two backends must draw and use the same ones.
    gen = torch.Generator(device="cuda").manual_seed(5)
    z1 = torch.randn(257, 48, device="cuda", generator=gen).relu().requires_grad_()
    z2 = (z1.detach() + 0.1 * torch.randn(257, 48, device="cuda", generator=gen)).relu().requires_grad_()
    target = lpjepa.sample_rgg((257, 48), device="cuda", generator=gen)
    losses, grads = [], []
    for backend in ("triton", "torch"):
        rdmreg = lpjepa.RDMReg(num_projections=40, directions="svd", backend=backend)
        loss = rdmreg(z1, z2, target=target, generator=torch.Generator(device="cuda").manual_seed(9))
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, [z1, z2]))
    _, rtol = tolerance(torch.float32)
    assert abs(losses[0].item() - losses[1].item()) <= rtol * abs(losses[1].item())
    for g, r in zip(*grads):
        assert _relative_error(g, r.double()) <= rtol


@requires_cuda
@pytest.mark.parametrize("p,mu", [(0.5, 0.0), (1.0, -0.5), (1.0, -2.0), (2.0, 0.3), (8.0, -0.5), (100.0, 0.0)])
def test_sampler_law_on_the_gpu(p, mu):
    torch.manual_seed(int(100 * p) + int(10 * mu))
    sigma = unit_variance_sigma(p)
    sample = lpjepa.sample_rgg((1 << 18,), p=p, mu=mu, sigma=sigma, device="cuda", backend="triton")
    assert sample.is_cuda and (sample >= 0).all()
    check_against_gennorm(sample, p, mu, sigma)  # the zero fraction within 5 standard errors, and a KS test


@requires_cuda
@pytest.mark.parametrize("p", [0.5, 1.0, 2.0, 8.0])
def test_dense_sampler_law_on_the_gpu(p):
    torch.manual_seed(int(10 * p))
    sample = lpjepa.sample_rgg((1 << 18,), p=p, mu=0.25, sigma=1.5, device="cuda", backend="triton", rectify=False)
    x = (sample.double().cpu().numpy() - 0.25) / 1.5
    assert scipy.stats.kstest(x, gennorm(p).cdf).pvalue > 1e-4
    assert (x < 0).mean() == pytest.approx(0.5, abs=5 * math.sqrt(0.25 / x.size))


@requires_cuda
def test_bf16_sampler_is_the_fp32_law_rounded():
    torch.manual_seed(3)
    sample = lpjepa.sample_rgg((1 << 16,), p=1.0, mu=-0.5, device="cuda", dtype=torch.bfloat16, backend="triton")
    assert sample.dtype == torch.bfloat16
    zero = np.mean(sample.float().cpu().numpy() == 0)
    assert zero == pytest.approx(lpjepa.rgg.expected_zero_fraction(1.0, -0.5), abs=0.01)
