"""The benchmarked work: which operation, at which shape, by which provider.

An operation is what a user calls; a provider is who computes it:

- ``reference``: the seed's math (``lpjepa.reference``), the baseline of every speedup;
- ``compiled_reference``: ``torch.compile`` of that same code, where it compiles;
- ``torch``: our torch backend (``backend='torch'``);
- ``triton``: our Triton kernels (``backend='triton'``), on CUDA only;
- ``official``: the official recipe's algorithm in plain PyTorch (``official_rdmreg``):
  directions drawn in the features' dtype, a GPU Laplace sampler, ``torch.sort``, and a
  fresh target and directions per view.

Every provider of one operation does the same work on the same inputs, including
drawing its own random projections (and targets, for the step) each call, as the
seed does. On CUDA the step of ``compiled_reference`` draws the seed's Gamma variates on
the GPU (``gpu_seed_sample_rgg``), so that torch.compile is not timed waiting on the CPU.
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

PROVIDERS = ("reference", "compiled_reference", "torch", "triton", "official")


class Unavailable(Exception):
    """A provider that cannot run here; the message says why."""


def default_shapes(device, quick):
    """Shape names a run covers when none are given: ``--quick`` on the CPU drops the large one."""
    if quick and device == "cpu":
        return ["seed", "official"]
    return ["seed", "official", "large"]


def default_providers(device, quick):
    """Provider names a run covers when none are given: those ``skip_reason`` leaves in."""
    return [provider for provider in PROVIDERS if skip_reason(provider, device, quick) is None]


def skip_reason(provider, device, quick):
    """Why ``provider`` is left out of a default run on ``device``, or None."""
    if provider == "triton" and device == "cpu":
        return "Triton runs on CUDA only (its CPU interpreter is ~1000x slower)"
    if provider == "official" and device == "cpu":
        return "the official recipe's provider is a GPU baseline (pass --providers to run it on the CPU)"
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


def reference_step_loss(z1, z2, num_projections, sampler=reference.sample_rgg):
    """The seed's regularizer, exactly as its training loop writes it."""
    target = sampler(z1.shape, device=z1.device)
    return (reference.rdmreg_loss(z1, target, num_projections) + reference.rdmreg_loss(z2, target, num_projections)) / 2


def gpu_seed_sample_rgg(shape, p=1.0, mu=0.0, device="cpu"):
    """The seed's sample_rgg with its Gamma variates drawn on ``device`` instead of the CPU."""
    sigma = reference.sigma_gn(p)
    sign = torch.empty(shape, device=device).bernoulli_(0.5) * 2 - 1
    concentration = torch.full(shape, 1.0 / p, device=device)
    g = torch._standard_gamma(concentration)
    return torch.relu(mu + sigma * sign * (p * g).pow(1.0 / p))


def official_laplace(device, p_scale=reference.sigma_gn(1.0)):
    """The official recipe's Laplace prior on ``device``, built once per case: building it copies two
    scalars to the device, which on CUDA waits for the GPU, and timing that would flatter our speed-ups."""
    return torch.distributions.Laplace(torch.tensor(0.0, device=device), torch.tensor(p_scale, device=device))


def official_rdmreg(z, num_projections, laplace, mu=0.0):
    """The official recipe's RDMReg of one view, in plain PyTorch: a fresh Laplace target and directions per call.

    Directions are drawn in z's dtype and normalised; the rectified target is drawn from
    ``laplace`` (``official_laplace``) on z's device and cast to z's dtype; both are
    projected and sorted with torch.sort along the batch.
    """
    projections = reference.random_projections(num_projections, z.shape[1], z.device, dtype=z.dtype)
    target = torch.relu(mu + laplace.sample(z.shape)).to(z.dtype)
    proj_z = torch.sort(z @ projections.T, dim=0).values
    proj_t = torch.sort(target @ projections.T, dim=0).values
    return torch.mean((proj_z - proj_t).float() ** 2)


def _reference_work(op, shape, device, compiled):
    wrap = (lambda f: torch.compile(f, dynamic=False)) if compiled else (lambda f: f)
    sample, loss = wrap(reference.sample_rgg), wrap(reference.rdmreg_loss)
    sampler = gpu_seed_sample_rgg if compiled and torch.device(device).type == "cuda" else reference.sample_rgg
    step_loss = wrap(lambda z1, z2, k: reference_step_loss(z1, z2, k, sampler))
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


def _official_work(op, shape, device):
    z1, z2, _ = _inputs(shape, device, requires_grad=op != "forward")
    K, laplace = shape.K, official_laplace(device)
    if op == "sample":
        return (lambda: torch.relu(laplace.sample((shape.B, shape.D)))), ()
    if op == "forward":
        return (lambda: official_rdmreg(z1, K, laplace)), ()
    if op == "forward_backward":
        return (lambda: official_rdmreg(z1, K, laplace).backward()), (z1,)
    return (lambda: ((official_rdmreg(z1, K, laplace) + official_rdmreg(z2, K, laplace)) / 2).backward()), (z1, z2)


def build(op, provider, shape, device):
    """A warm ``Case``, or ``Unavailable`` when ``provider`` cannot run ``op`` on ``device``."""
    if op not in OPERATIONS or provider not in PROVIDERS:
        raise ValueError(f"unknown operation {op!r} or provider {provider!r}")
    device = str(device)
    if provider == "triton" and torch.device(device).type != "cuda":
        raise Unavailable("Triton runs on CUDA only (its CPU interpreter is ~1000x slower)")
    if provider in ("reference", "compiled_reference"):
        fn, leaves = _reference_work(op, shape, device, compiled=provider == "compiled_reference")
    elif provider == "official":
        fn, leaves = _official_work(op, shape, device)
    else:
        fn, leaves = _lpjepa_work(op, shape, device, backend=provider)
    if provider in ("reference", "torch", "official"):
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


def model_bound_ms(op, shape, dtype=torch.float32, allow_tf32=None, gpu=None):
    """The static model's lower bound for ``op``, in ms (benchmarks.perf_model), or None.

    gpu: a ``perf_model.GPU`` (default: the current CUDA device's, ``perf_model.device_gpu``).

    The best of the Triton backend's paths, charged what the benchmarked call does: one
    view with its directions drawn (forward, forward + backward), or two views against a
    shared target with the target drawn too (the step). A bound, not a prediction:
    measured times are above it.
    """
    from benchmarks import perf_model as pm
    from lpjepa.kernels.sliced_wasserstein import PROJECTION_PATHS, sort_paths_for

    gpu = pm.device_gpu() if gpu is None else gpu
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32 if allow_tf32 is None else allow_tf32
    model_shape = pm.Shape(shape.name, shape.B, shape.D, shape.K)
    if op == "sample":
        return 1e-3 * pm.kernel_bound_us(pm.KernelCost("sample", 0, 0.0, "lanes", shape.B * shape.D * 4), gpu)
    views = 2 if op == "step" else 1
    bounds = []
    for path in ((p, s) for p in PROJECTION_PATHS for s in sort_paths_for(shape.B)):
        costs = pm.path_costs(model_shape, path, dtype=dtype, allow_tf32=allow_tf32, views=views,
                              with_backward=op != "forward", with_target_draw=op == "step", arch=gpu.arch)
        bounds.append(pm.total_bound_us(costs, gpu)[0])
    return 1e-3 * min(bounds)
