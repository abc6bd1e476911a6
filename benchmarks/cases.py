"""The benchmarked work: which operation, at which shape, by which provider.

An operation is what a user calls; a provider is who computes it:

- ``reference``: the seed's math (``lpjepa.reference``), the baseline of every speedup;
- ``compiled_reference``: ``torch.compile`` of that same code, where it compiles;
- ``torch``: our torch backend (``backend='torch'``);
- ``triton``: our Triton kernels (``backend='triton'``), on CUDA only.

Every provider of one operation does the same work on the same inputs, including
drawing its own random projections (and targets, for the step) each call, as the
seed does.
"""
import time
from typing import Callable, NamedTuple

import torch

import lpjepa
from lpjepa import reference


class Shape(NamedTuple):
    name: str
    B: int  # batch
    D: int  # feature dimension
    K: int  # number of projections

    def __str__(self):
        return f"{self.name} (B={self.B}, D={self.D}, K={self.K})"


SHAPES = {
    s.name: s
    for s in (
        Shape("tiny", 32, 16, 8),  # CI: checks that the code runs, not how fast
        Shape("seed", 256, 512, 256),  # the seed's minimal example
        Shape("official", 256, 512, 8192),  # the paper's official setting
        Shape("large", 1024, 2048, 4096),
    )
}

OPERATIONS = {
    "sample": "sample_rgg (B, D)",
    "forward": "loss forward",
    "forward_backward": "loss forward + backward",
    "step": "regularizer step: sample + 2 views, fwd + bwd",
}

PROVIDERS = ("reference", "compiled_reference", "torch", "triton")


class Unavailable(Exception):
    """A provider that cannot run here; the message says why."""


def default_shapes(device, quick):
    """Shape names a run covers when none are given: ``--quick`` on the CPU drops the large one."""
    if quick and device == "cpu":
        return ["seed", "official"]
    return ["seed", "official", "large"]


def default_providers(device, quick):
    """Provider names a run covers when none are given.

    On the CPU, ``--quick`` leaves ``torch.compile`` out (each compile costs several
    seconds there) and Triton never runs on the CPU (its interpreter is ~1000x slower).
    """
    providers = ["reference", "compiled_reference", "torch", "triton"]
    if device == "cpu":
        providers.remove("triton")
        if quick:
            providers.remove("compiled_reference")
    return providers


def skip_reason(provider, device, quick):
    """Why ``provider`` is left out of a default run on ``device``, or None."""
    if provider == "triton" and device == "cpu":
        return "Triton runs on CUDA only (its CPU interpreter is ~1000x slower)"
    if provider == "compiled_reference" and device == "cpu" and quick:
        return "torch.compile is left out of --quick on the CPU (several seconds of compiling per case)"
    return None


def parse_list(text, allowed, what):
    """Comma-separated names, each checked against ``allowed``."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise ValueError(f"unknown {what} {unknown or text!r}; choose from {', '.join(allowed)}")
    return names


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Case:
    """One operation by one provider at one shape, built and called once (warm).

    ``fn()`` does the work once and waits for the device; ``reset()`` drops the
    gradients a previous call left; ``first_call_s`` is the first call's time
    (compiling included, for ``compiled_reference``).
    """

    def __init__(self, op, provider, shape, device, fn: Callable, leaves=()):
        self.op, self.provider, self.shape, self.device = op, provider, shape, device
        self._fn = fn
        self._leaves = leaves
        start = time.perf_counter()
        self.fn()
        self.first_call_s = time.perf_counter() - start

    def reset(self):
        for leaf in self._leaves:
            leaf.grad = None

    def fn(self):
        self.reset()
        self._fn()
        synchronize(self.device)


def _inputs(shape, device, requires_grad):
    """Two feature views (non-negative, like the seed's projector output) and an RGG target batch."""
    generator = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(shape.B, shape.D, generator=generator).relu_().to(device) for _ in range(2))
    target = reference.sample_rgg((shape.B, shape.D)).to(device)
    return z1.requires_grad_(requires_grad), z2.requires_grad_(requires_grad), target


def reference_step_loss(z1, z2, num_projections):
    """The seed's regularizer, exactly as its training loop writes it."""
    target = reference.sample_rgg(z1.shape, device=z1.device)
    return (reference.rdmreg_loss(z1, target, num_projections) + reference.rdmreg_loss(z2, target, num_projections)) / 2


def _reference_work(op, shape, device, compiled):
    wrap = (lambda f: torch.compile(f, dynamic=False)) if compiled else (lambda f: f)
    sample, loss, step_loss = wrap(reference.sample_rgg), wrap(reference.rdmreg_loss), wrap(reference_step_loss)
    z1, z2, target = _inputs(shape, device, requires_grad=op != "forward")
    K = shape.K
    if op == "sample":
        return (lambda: sample((shape.B, shape.D), device=device)), ()
    if op == "forward":
        return (lambda: loss(z1, target, K)), ()
    if op == "forward_backward":
        return (lambda: loss(z1, target, K).backward()), (z1,)
    return (lambda: step_loss(z1, z2, K).backward()), (z1, z2)


def _lpjepa_work(op, shape, device, backend):
    z1, z2, target = _inputs(shape, device, requires_grad=op != "forward")
    K = shape.K
    if op == "sample":
        return (lambda: lpjepa.sample_rgg((shape.B, shape.D), device=device, backend=backend)), ()
    if op == "forward":
        return (lambda: lpjepa.rdmreg_loss(z1, target, K, backend=backend)), ()
    if op == "forward_backward":
        return (lambda: lpjepa.rdmreg_loss(z1, target, K, backend=backend).backward()), (z1,)
    regularizer = lpjepa.RDMReg(num_projections=K, backend=backend)
    return (lambda: regularizer(z1, z2).backward()), (z1, z2)


def build(op, provider, shape, device):
    """A warm ``Case``, or ``Unavailable`` when ``provider`` cannot run ``op`` on ``device``."""
    if op not in OPERATIONS or provider not in PROVIDERS:
        raise ValueError(f"unknown operation {op!r} or provider {provider!r}")
    device = str(device)
    if provider == "triton" and torch.device(device).type != "cuda":
        raise Unavailable("Triton runs on CUDA only (its CPU interpreter is ~1000x slower)")
    if provider in ("reference", "compiled_reference"):
        fn, leaves = _reference_work(op, shape, device, compiled=provider == "compiled_reference")
    else:
        fn, leaves = _lpjepa_work(op, shape, device, backend=provider)
    if provider in ("reference", "torch"):
        return Case(op, provider, shape, device, fn, leaves)
    try:  # the first call compiles (torch.compile) or finds the Triton backend missing
        return Case(op, provider, shape, device, fn, leaves)
    except Exception as error:  # a backend that is missing or does not compile here is skipped, not faked
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise Unavailable(f"{type(error).__name__}: {first_line[:200]}") from error


def floor_case(op, shape, device):
    """The unavoidable matmuls of ``op`` alone, as a Case (None for the sampler, which has none).

    forward: project z and the target (2 matmuls of K x D x B); forward + backward:
    plus grad_z = residual^T @ projections (3); step: the target once, each view
    forward and backward (5).
    """
    if op == "sample":
        return None
    generator = torch.Generator().manual_seed(0)
    P = torch.randn(shape.K, shape.D, generator=generator).to(device)
    x = torch.randn(shape.B, shape.D, generator=generator).to(device)
    r = torch.randn(shape.K, shape.B, generator=generator).to(device)
    projections_of = {"forward": 2, "forward_backward": 2, "step": 3}[op]
    gradients = {"forward": 0, "forward_backward": 1, "step": 2}[op]

    def matmuls():
        for _ in range(projections_of):
            P @ x.T
        for _ in range(gradients):
            r.T @ P

    return Case(op, "matmul floor", shape, device, matmuls)
