"""Test-session setup shared by every test file.

Without a GPU, Triton kernels run on the CPU interpreter. The interpreter is chosen
when Triton is first imported, so the variable must be set here, before any test
module imports ``lpjepa`` (which imports the kernels).
"""
import os
import socket
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The Triton backend remembers its fastest paths in a cache file; tests keep theirs apart
# from the user's (lpjepa.ops.path_choice).
os.environ["LPJEPA_CACHE_DIR"] = tempfile.mkdtemp(prefix="lpjepa-test-cache-")

HAS_CUDA = torch.cuda.is_available()


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

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
