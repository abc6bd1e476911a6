"""Kernels that cannot run fall back to the torch backend under 'auto', and raise under 'triton'.

Each failure is forced on the CPU: the interpreter runs the Triton ops ('cpu' is added to
the device types 'auto' sends to Triton), and the failure is patched in where it would
happen on a GPU (the kernel launch, the launcher's build, the import of Triton, the
device's compute capability).
"""
import ast
import subprocess
import warnings

import pytest
import torch
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

import lpjepa
from lpjepa import reference
from lpjepa.ops import backend
from lpjepa.kernels import rgg_sample as rgg_kernels
from lpjepa.ops import sliced_wasserstein as swd_op
from conftest import tolerance

FAILURES = {
    "compile error": lambda: CompilationError("def kernel(): ...", ast.parse("x").body[0], "unsupported layout"),
    "out of resources": lambda: OutOfResources(300000, 232448, "shared memory"),
    "no C compiler": lambda: RuntimeError(
        "Failed to find C compiler. Please specify via CC environment variable or set triton.knobs.build.impl."),
    "launcher build": lambda: subprocess.CalledProcessError(1, ["gcc", "main.c"]),
    "no ptxas": lambda: RuntimeError("Cannot find ptxas"),
}
HINTS = {"no C compiler": "install one (gcc or clang) or point CC at it", "no ptxas": "TRITON_PTXAS_PATH"}


@pytest.fixture
def triton_on_cpu(patch):
    """'auto' sends CPU tensors to the Triton ops (the interpreter), with no failure remembered yet."""
    patch.setattr(backend, "TRITON_DEVICE_TYPES", {"cuda", "cpu"})
    patch.setattr(backend, "_UNAVAILABLE", {})
    patch.setattr(backend, "_DECISIONS", {})
    patch.delenv(backend.ENV_FALLBACK, raising=False)


def _inputs(seed=0, batch=7, dim=5, num_projections=8):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, dim, generator=gen).requires_grad_()
    target = torch.rand(batch, dim, generator=gen) + 0.1
    projections = reference.random_projections(num_projections, dim, generator=gen)
    return z, target, projections


def _failing_launch(patch, error):
    """Every kernel launch of the loss raises ``error()``; returns the list of attempts."""
    attempts = []

    def launch(_launch):
        attempts.append(_launch.kernel)
        raise error()

    patch.setattr(swd_op, "_launch", launch)
    return attempts


def test_the_interpreter_seam_really_runs_the_kernels(triton_on_cpu, patch):
    # Without a failure, 'auto' on CPU tensors now launches the Triton kernels: the seam the others use.
    launched = []
    real = swd_op._launch
    patch.setattr(swd_op, "_launch", lambda launch: (launched.append(launch.kernel), real(launch)))
    z, target, projections = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", backend.TritonFallbackWarning)
        lpjepa.rdmreg_loss(z, target, projections=projections)
    assert launched


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_auto_falls_back_to_torch_with_one_warning(triton_on_cpu, patch, failure):
    attempts = _failing_launch(patch, FAILURES[failure])
    z, target, projections = _inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = [lpjepa.rdmreg_loss(z, target, projections=projections) for _ in range(3)]
    fallbacks = [w for w in caught if issubclass(w.category, backend.TritonFallbackWarning)]
    assert len(fallbacks) == 1, [str(w.message) for w in caught]
    message = str(fallbacks[0].message)
    cause = FAILURES[failure]()
    assert type(cause).__name__ in message and "sliced_wasserstein" in message
    assert "LPJEPA_TRITON_FALLBACK=quiet" in message and "backend='torch'" in message
    if failure in HINTS:
        assert HINTS[failure] in message
    assert len(attempts) == 1  # remembered: the later calls go to torch directly
    # The torch backend's value and gradient, exactly.
    want = lpjepa.rdmreg_loss(z, target, projections=projections, backend="torch")
    for loss in losses:
        torch.testing.assert_close(loss, want, atol=0, rtol=0)
    grad, = torch.autograd.grad(losses[0], z)
    want_grad, = torch.autograd.grad(want, z)
    torch.testing.assert_close(grad, want_grad, atol=0, rtol=0)


def test_the_fallback_matches_the_reference(triton_on_cpu, patch):
    _failing_launch(patch, FAILURES["compile error"])
    z, target, projections = _inputs(seed=3, batch=255, dim=6)
    with pytest.warns(backend.TritonFallbackWarning):
        loss = lpjepa.rdmreg_loss(z, target, projections=projections)
    want = reference.rdmreg_loss(z.double(), target.double(), projections=projections.double())
    atol, rtol = tolerance(torch.float32)
    torch.testing.assert_close(loss.double(), want, atol=atol, rtol=rtol)


def test_the_warning_is_silenced_by_the_environment(triton_on_cpu, patch):
    _failing_launch(patch, FAILURES["out of resources"])
    patch.setenv(backend.ENV_FALLBACK, "quiet")
    z, target, projections = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = lpjepa.rdmreg_loss(z, target, projections=projections)
    torch.testing.assert_close(loss, lpjepa.rdmreg_loss(z, target, projections=projections, backend="torch"))


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_backend_triton_raises_with_the_cause(triton_on_cpu, patch, failure):
    _failing_launch(patch, FAILURES[failure])
    z, target, projections = _inputs()
    with pytest.raises(backend.KernelUnavailable, match="cannot run on cpu") as raised:
        lpjepa.rdmreg_loss(z, target, projections=projections, backend="triton")
    assert type(FAILURES[failure]()).__name__ in str(raised.value)
    assert "backend='torch'" in str(raised.value)
    assert isinstance(raised.value.__cause__, type(FAILURES[failure]()))
    assert not backend._UNAVAILABLE  # 'triton' never makes 'auto' give up


def test_argument_errors_are_not_swallowed(triton_on_cpu, patch):
    # An error the torch backend would raise as well is the caller's, not the kernels'.
    _failing_launch(patch, lambda: ValueError("bad projections"))
    z, target, projections = _inputs()
    with pytest.raises(ValueError, match="bad projections"):
        lpjepa.rdmreg_loss(z, target, projections=projections)
    assert not backend._UNAVAILABLE


def test_the_module_and_the_objective_fall_back_too(triton_on_cpu, patch):
    _failing_launch(patch, FAILURES["compile error"])
    z1, target, projections = _inputs(seed=4)
    z2 = (z1.detach() + 0.1).requires_grad_()
    with pytest.warns(backend.TritonFallbackWarning):
        parts = lpjepa.rectified_lpjepa_loss(z1, z2, target=target, projections=projections)
    want = lpjepa.rectified_lpjepa_loss(z1, z2, target=target, projections=projections, backend="torch")
    torch.testing.assert_close(parts.loss, want.loss, atol=0, rtol=0)
    parts.loss.backward()
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()


def test_the_sampler_falls_back(triton_on_cpu, patch):
    def fail(*args, **kwargs):
        raise FAILURES["no C compiler"]()

    patch.setattr(rgg_kernels, "rgg_sample", fail)
    torch.manual_seed(7)
    with pytest.warns(backend.TritonFallbackWarning, match="rgg_sample"):
        drawn = lpjepa.sample_rgg((64, 8), p=1.0, mu=-0.5)
    torch.manual_seed(7)
    torch.testing.assert_close(drawn, lpjepa.sample_rgg((64, 8), p=1.0, mu=-0.5, backend="torch"), atol=0, rtol=0)
    with pytest.raises(backend.KernelUnavailable, match="rgg_sample"):
        lpjepa.sample_rgg((64, 8), backend="triton")


def test_no_triton_falls_back_and_names_the_install(triton_on_cpu, patch):
    patch.setitem(backend._LOADED, "ops", (None, ImportError("No module named 'triton'")))
    patch.setattr(backend, "_DECISIONS", {})
    z, target, projections = _inputs()
    with pytest.warns(backend.TritonFallbackWarning, match="pip install triton"):
        loss = lpjepa.rdmreg_loss(z, target, projections=projections)
    torch.testing.assert_close(loss, lpjepa.rdmreg_loss(z, target, projections=projections, backend="torch"))
    with pytest.raises(backend.KernelUnavailable, match="No module named 'triton'"):
        lpjepa.rdmreg_loss(z, target, projections=projections, backend="triton")


def test_gpus_below_sm_75_are_refused_before_any_launch(patch):
    patch.setattr(backend, "_UNAVAILABLE", {})
    patch.setattr(backend, "_REASONS", {})
    patch.setattr(backend, "_DECISIONS", {})
    patch.setattr(torch.cuda, "is_available", lambda: True)
    patch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    patch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    with pytest.raises(backend.KernelUnavailable, match=r"cuda:0 \(Tesla V100-SXM2-16GB, sm_70\).*below 7.5"):
        backend.use_triton("sliced_wasserstein", "triton", "cuda:0", torch.float32)
    with pytest.warns(backend.TritonFallbackWarning, match="compute capability 7.0"):
        assert not backend.use_triton("sliced_wasserstein", "auto", "cuda:0", torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per op and device
        assert not backend.use_triton("sliced_wasserstein", "auto", "cuda:0", torch.float32)
    patch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4 runs them
    assert backend.use_triton("rgg_sample", "auto", "cuda:1", torch.float32)
    assert backend.kernels("rgg_sample") is rgg_kernels


def test_the_warning_class_is_public():
    assert lpjepa.TritonFallbackWarning is backend.TritonFallbackWarning
    assert lpjepa.KernelUnavailable is backend.KernelUnavailable
    assert issubclass(lpjepa.TritonFallbackWarning, UserWarning) and issubclass(lpjepa.KernelUnavailable, RuntimeError)


def _failing_backward_kernel(patch, error):
    """Only the views' gradient kernel fails (it compiles at the first backward); the forward's run."""
    real = swd_op._launch

    def launch(one):
        if one.kernel.__name__ == "_project_backward_kernel":
            raise error()
        real(one)

    patch.setattr(swd_op, "_launch", launch)


def test_a_backward_kernel_failure_falls_back_to_the_formula(triton_on_cpu, patch):
    _failing_backward_kernel(patch, FAILURES["out of resources"])
    z, target, projections = _inputs(seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", backend.TritonFallbackWarning)
        loss = lpjepa.rdmreg_loss(z, target, projections=projections)  # the forward's kernels run
    with pytest.warns(backend.TritonFallbackWarning, match="OutOfResources"):
        grad, = torch.autograd.grad(loss, z)
    assert ("sliced_wasserstein", "cpu") in backend._UNAVAILABLE  # later calls go to torch
    ref_z = z.detach().double().requires_grad_()
    want, = torch.autograd.grad(reference.rdmreg_loss(ref_z, target.double(), projections=projections.double()), ref_z)
    atol, rtol = tolerance(torch.float32)
    torch.testing.assert_close(grad.double(), want, atol=atol, rtol=rtol)


def test_a_backward_kernel_failure_raises_under_triton(triton_on_cpu, patch):
    _failing_backward_kernel(patch, FAILURES["compile error"])
    z, target, projections = _inputs(seed=6)
    loss = lpjepa.rdmreg_loss(z, target, projections=projections, backend="triton")
    with pytest.raises(backend.KernelUnavailable, match="cannot run on cpu") as raised:
        loss.backward()
    assert isinstance(raised.value.__cause__, CompilationError)
    assert not backend._UNAVAILABLE
