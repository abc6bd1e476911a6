"""Test-session setup shared by every test file.

Without a GPU, Triton kernels run on the CPU interpreter. The interpreter is chosen
when Triton is first imported, so the variable must be set here, before any test
module imports ``lpjepa`` (which imports the kernels).
"""
import contextlib
import datetime
import json
import os
import socket
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The Triton backend remembers its fastest paths in a cache file; tests keep theirs apart
# from the user's (lpjepa.ops.path_choice).
os.environ["LPJEPA_CACHE_DIR"] = tempfile.mkdtemp(prefix="lpjepa-test-cache-")

HAS_CUDA = torch.cuda.is_available()

from _state import Patcher, Snapshot  # noqa: E402  (after TRITON_INTERPRET: it imports nothing of lpjepa itself)


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_checks_on_rank(rank, port, out_dir, checks, world):
    """One rank of a gloo world on the CPU: each of ``checks`` (name -> fn(rank)) in lockstep, then rank{rank}.json.

    A check's traceback is recorded, not raised, under its name as {"error", "seconds", **what it returned}; the
    barrier after each check keeps a failed one from leaving a collective half-matched on the other ranks.
    """
    from lpjepa import distributed  # here, not above: lpjepa must load after TRITON_INTERPRET is set

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name, check in checks.items():
            started = time.perf_counter()
            try:
                results[name] = dict(check(rank) or {}, error=None)
            except Exception:
                results[name] = {"error": traceback.format_exc()}
            results[name]["seconds"] = time.perf_counter() - started
            dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        distributed.destroy_process_group()


def spawn_ranks(checks, world, out_dir, timeout_s):
    """``run_checks_on_rank`` on ``world`` spawned processes: each rank's results (name -> dict), in rank order.

    ``checks``: module-level functions (spawned ranks import them by name). A run past ``timeout_s`` is
    ended and fails the test.
    """
    context = mp.spawn(run_checks_on_rank, args=(free_port(), out_dir, checks, world), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail(f"the {world}-rank run did not finish within {timeout_s} s")
    results = []
    for rank in range(world):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            results.append(json.load(f))
    return results


def assert_no_rank_failed(spawned, name):
    """Fails with every rank's traceback when check ``name`` raised on any rank of ``spawn_ranks``' results."""
    errors = [f"rank {rank}:\n{result[name]['error']}" for rank, result in enumerate(spawned) if result[name]["error"]]
    assert not errors, "\n".join(errors)


# One statement of the tolerances each dtype earns when a fast path is compared with
# the reference (atol, rtol). Inputs are cast to fp32 inside the loss, so fp16/bf16
# rows mostly measure the rounding of the inputs themselves.
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def tolerance(dtype):
    """(atol, rtol) for comparing results computed from ``dtype`` inputs."""
    return TOLERANCES[dtype]


# Marks a GPU-only test: skipped without CUDA, selected by `pytest -m cuda` (benchmarks/gpu_check.sh).
requires_cuda = pytest.mark.cuda


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one); use via requires_cuda")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


# Tests leave no trace: shared state is changed through the helpers of tests/_state.py (or `patch`), which
# restore it in a `finally`, and every test is checked for what it left changed.


@pytest.fixture
def patch():
    """monkeypatch's setattr / setenv / delenv / setitem, plus torch_flag, each undone after the test even when
    another undo raises (tests/_state.py says why not monkeypatch)."""
    with contextlib.ExitStack() as stack:
        yield Patcher(stack)


@pytest.fixture(autouse=True)
def leaves_no_trace(request):
    """Fails the test that leaves torch's switches, the watched environment variables, the package's (or the
    patched libraries') functions and classes, or the package's caches changed, naming each change; and puts
    them back, so that the next test starts from the same state whatever this one did."""
    before = Snapshot()
    yield
    changes = before.changes()
    if not changes:
        return
    failed_restores = []
    for what, put_back in changes:
        try:
            put_back()
        except Exception as error:  # the others are still put back
            failed_restores.append(f"{what} (could not be put back: {error!r})")
    lines = [what for what, _ in changes] + failed_restores
    pytest.fail(f"{request.node.nodeid} left shared state changed (put back now; change it through the helpers "
                "of tests/_state.py or the `patch` fixture, which restore it in a finally):\n  " + "\n  ".join(lines),
                pytrace=False)


# The training programs' tests share one tiny image folder and one finished run on it
# (session fixtures, so they are made once). Tests must not change them.


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory):
    """An image folder of 2 classes, 8 training and 4 validation 16x16 images each (train/ and val/)."""
    from test_train import make_imagefolder

    return make_imagefolder(str(tmp_path_factory.mktemp("tiny_images")))


@pytest.fixture(scope="session")
def one_epoch_run(tiny_images, tmp_path_factory):
    """A finished one-epoch run (``test_train.TINY``) on ``tiny_images``: its folder, with last.pt and final.pt."""
    from lpjepa import train
    from test_train import run_args

    out = tmp_path_factory.mktemp("one_epoch_run")
    train.main(run_args(tiny_images, out, "--epochs", "1"))
    return out
