"""Host cost of one regularizer step on the Triton path, against the same step in plain eager torch.

    python -m benchmarks.host_overhead [--batch 8] [--dim 8] [--num-projections 8] [--views 2] [--seconds 4]

At the seed's shape a GPU's kernels take microseconds (the static model: 5.0 us on an H100),
so what a user pays per step is the Python the host runs to issue them. That Python is the
same on any machine, so it is measured here on the CPU: every Triton launch is replaced by a
no-op that only counts (outputs stay as allocated), and the tensors are tiny, so that
almost no compute is left and what is timed is dispatch, autograd and the package's own
Python.

One regularizer step, in both providers: draw the target (B, D) and K directions, two views
(B, D) against them, forward and backward (``lpjepa.RDMReg`` with ``backend='triton'``).
The plain-torch step writes the same computation as a user would in eager torch: the
device sampler (``lpjepa.ops.rgg_sample``'s torch body), Gaussian directions normalised,
matmuls, ``torch.sort`` of both sides, the mean squared difference, autograd.

The two are timed alternately in one process on one thread (medians of many rounds of the
thread's CPU time, so that a loaded machine's preemptions do not count), and the ratio is
reported. Each step starts as a training step does, with the views' gradients set to None
(``zero_grad(set_to_none=True)``), so the backward accumulates nothing.

Launches are counted as a GPU would make them: the package's own Triton launches, and
every torch operator that would launch a device kernel (a dispatch-level count of
non-view operators), in the regularizer's forward and backward. Not counted there: the
root gradient that ``loss.backward()`` makes (one ``ones_like`` per training step, for the
whole objective, whatever the regularizer does; reported on its own line), and the seed
draw the Triton interpreter makes from the CPU generator (``torch.randint``), which on a
GPU is a read of the CUDA generator's state on the host (``philox_seed_offset``), no
launch. Targets (issue 24): host time at most 0.5x plain torch's, at most 5 kernel
launches per step. Prints a table and writes ``host_overhead.json`` to ``--out`` when given.
"""
import argparse
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path

# The kernels' module imports Triton; without a GPU its interpreter is the only target, and
# nothing is launched anyway.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

TARGET_RATIO = 0.5
TARGET_LAUNCHES = 5

# Operators that only make or reshape tensor metadata: no device kernel is launched for them.
_NO_KERNEL = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view", "as_strided",
    "t", "transpose", "permute", "expand", "slice", "select", "unsqueeze", "squeeze", "alias", "detach",
    "reshape", "unbind", "split", "split_with_sizes", "narrow", "lift_fresh", "_reshape_alias", "set_",
    "is_same_size", "resize_", "diagonal", "unfold", "_local_scalar_dense", "sym_size", "sym_stride",
}


class _CountKernels(TorchDispatchMode):
    """Counts the torch operators that would launch a device kernel, by name, except while ``paused``."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _NO_KERNEL and not self.paused:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


class _InterpreterSeedNotCounted:
    """Pauses ``counter`` inside ``philox_seed_offset``: its CPU branch (the interpreter's) draws a seed with
    ``torch.randint``, where on CUDA it reads the generator's state on the host and launches nothing."""

    def __init__(self, counter):
        from lpjepa.kernels import rgg_sample

        self.module, self.counter = rgg_sample, counter

    def __enter__(self):
        self.real = real = self.module.philox_seed_offset
        counter = self.counter

        def not_counted(*args, **kwargs):
            counter.paused = True
            try:
                return real(*args, **kwargs)
            finally:
                counter.paused = False

        self.module.philox_seed_offset = not_counted
        return self

    def __exit__(self, *exc):
        self.module.philox_seed_offset = self.real


class StubbedLaunches:
    """Replaces every ``KernelLaunch`` call of the package by a no-op that counts it by kernel name."""

    def __init__(self):
        from lpjepa.kernels.launch import KernelLaunch

        self.cls = KernelLaunch
        self.counts = collections.Counter()

    def __enter__(self):
        self.real = self.cls.__call__
        counts = self.counts

        def stub(launch):
            counts[launch.kernel.__name__] += 1

        self.cls.__call__ = stub
        return self

    def __exit__(self, *exc):
        self.cls.__call__ = self.real


def triton_step(batch, dim, num_projections, views, seed=0):
    """One RDMReg forward on the Triton backend (launches stubbed by the caller), as ``(forward, views)``."""
    import lpjepa

    rdmreg = lpjepa.RDMReg(num_projections=num_projections, backend="triton")
    gen = torch.Generator().manual_seed(seed)
    zs = [torch.randn(batch, dim, generator=gen, requires_grad=True) for _ in range(views)]
    return (lambda: rdmreg(*zs)), zs


def torch_step(batch, dim, num_projections, views, seed=0):
    """The same forward in plain eager torch (the torch sampler, normalised Gaussian directions, torch.sort)."""
    from lpjepa import rgg
    from lpjepa.ops import rgg_sample

    sigma = rgg.sigma_gn(1.0)
    gen = torch.Generator().manual_seed(seed)
    zs = [torch.randn(batch, dim, generator=gen, requires_grad=True) for _ in range(views)]

    def forward():
        target = rgg_sample.sample((batch, dim), p=1.0, mu=0.0, sigma=sigma, dtype=torch.float32, device="cpu")
        directions = torch.randn(num_projections, dim)
        directions = directions / directions.norm(dim=1, keepdim=True)
        target_sorted = torch.sort(target @ directions.T, dim=0).values
        losses = [(torch.sort(z @ directions.T, dim=0).values - target_sorted).square().mean() for z in zs]
        return torch.stack(losses).mean()

    return forward, zs


def training_step(forward, zs):
    """One regularizer step as a training loop runs it: gradients set to None, the forward, ``loss.backward()``."""

    def step():
        for z in zs:
            z.grad = None
        loss = forward()
        loss.backward()
        return loss

    return step


def count_launches(forward, zs):
    """(package Triton launches, torch operators that launch a kernel) of one regularizer step, each a Counter.

    The root gradient is passed in (made outside the count: one per training step, for the
    whole objective), and the interpreter's seed draw is not counted (see the module doc).
    """
    root_gradient = torch.ones(())
    for z in zs:
        z.grad = None
    with StubbedLaunches() as stubbed, _CountKernels() as torch_ops, _InterpreterSeedNotCounted(torch_ops):
        forward().backward(root_gradient)
    return stubbed.counts, torch_ops.counts


def time_alternately(steps, seconds):
    """{name: median seconds per call}: every step once per round, in alternating order, for ``seconds``.

    The time is the calling thread's CPU time (``time.thread_time``), not the wall clock:
    on a shared machine a preempted step would otherwise be charged for its neighbours'
    work. With one torch thread, the autograd engine's CPU work runs on this thread too.
    """
    names = list(steps)
    for name in names:  # warm: first-call caches, lazy imports
        for _ in range(20):
            steps[name]()
    times = {name: [] for name in names}
    start, rounds = time.perf_counter(), 0
    while time.perf_counter() - start < seconds or rounds < 50:
        order = names if rounds % 2 == 0 else names[::-1]
        for name in order:
            t0 = time.thread_time()
            for _ in range(10):
                steps[name]()
            times[name].append((time.thread_time() - t0) / 10)
        rounds += 1
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure(batch=8, dim=8, num_projections=8, views=2, seconds=4.0):
    """The host times, their ratio and the launch counts: a dict (what ``main`` prints).

    Runs on one torch thread with denormals flushed, and puts both settings back.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # The stubbed kernels leave their outputs as allocated: flush denormals, so that arithmetic on
    # that memory (the backward's) never takes the CPU's slow path and is timed as on real values.
    flush = torch.set_flush_denormal(True)
    try:
        forwards = {"triton (launches stubbed)": triton_step(batch, dim, num_projections, views),
                    "plain torch": torch_step(batch, dim, num_projections, views)}
        steps = {name: training_step(*forward) for name, forward in forwards.items()}
        with StubbedLaunches():
            medians = time_alternately(steps, seconds)
        triton_launches, triton_torch_ops = count_launches(*forwards["triton (launches stubbed)"])
        _, plain_ops = count_launches(*forwards["plain torch"])
    finally:
        if flush:
            torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
    ratio = medians["triton (launches stubbed)"] / medians["plain torch"]
    launches = sum(triton_launches.values()) + sum(triton_torch_ops.values())
    return dict(
        shape=dict(batch=batch, dim=dim, num_projections=num_projections, views=views),
        host_us={name: 1e6 * s for name, s in medians.items()},
        ratio=ratio,
        triton_launches=dict(triton_launches),
        torch_kernels_on_triton_path=dict(triton_torch_ops),
        launches_per_step=launches,
        plain_torch_kernels=dict(plain_ops),
        plain_torch_launches=sum(plain_ops.values()),
        targets=dict(ratio=TARGET_RATIO, launches=TARGET_LAUNCHES),
        met=dict(ratio=ratio <= TARGET_RATIO, launches=launches <= TARGET_LAUNCHES),
        threads=1,
        load=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--num-projections", type=int, default=8)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0, help="timing budget (default 4)")
    parser.add_argument("--out", help="folder for host_overhead.json")
    args = parser.parse_args(argv)
    for name in ("batch", "dim", "num_projections", "views"):
        if getattr(args, name) < 1:
            parser.error(f"argument --{name.replace('_', '-')}: must be >= 1; got {getattr(args, name)}")
    if args.seconds <= 0:
        parser.error(f"argument --seconds: must be > 0; got {args.seconds}")
    result = measure(args.batch, args.dim, args.num_projections, args.views, args.seconds)
    triton_us, torch_us = result["host_us"].values()
    print(f"host CPU time per regularizer step (B={args.batch}, D={args.dim}, K={args.num_projections}, "
          f"{args.views} views; 1 thread, load {result['load']:.2f}):")
    print(f"  triton path, launches stubbed  {triton_us:8.1f} us")
    print(f"  plain eager torch              {torch_us:8.1f} us")
    print(f"  ratio {result['ratio']:.2f}x (target <= {TARGET_RATIO}x): {'met' if result['met']['ratio'] else 'MISSED'}")
    triton = ", ".join(f"{k} {v}" for k, v in sorted(result["triton_launches"].items()))
    torch_ops = ", ".join(f"{k} {v}" for k, v in sorted(result["torch_kernels_on_triton_path"].items()))
    print(f"kernel launches per step: {result['launches_per_step']} (target <= {TARGET_LAUNCHES}): "
          f"{'met' if result['met']['launches'] else 'MISSED'}")
    print(f"  Triton: {triton or 'none'}")
    print(f"  torch:  {torch_ops or 'none'}")
    print(f"  (plain torch's step launches {result['plain_torch_launches']}; either step's loss.backward() adds "
          f"its root gradient, one ones_like per training step, not counted)")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "host_overhead.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
