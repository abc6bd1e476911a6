"""Chooses between the torch backend and the Triton kernels for each call."""
import functools
import importlib
import os

import torch

from ._checks import check_backend


@functools.lru_cache(maxsize=None)
def _triton_ops():
    """The module of Triton-backed ops, or the reason it cannot be loaded."""
    try:
        return importlib.import_module("lpjepa.triton_ops"), None
    except ImportError as error:  # triton missing, or no kernels on this platform
        return None, str(error)


def triton_ops(backend, device):
    """The Triton ops module when ``backend`` resolves to Triton on ``device``, else None.

    'auto' picks Triton for CUDA tensors when it loads and torch otherwise; 'triton'
    insists, and explains what is missing when it cannot run.
    """
    check_backend(backend)
    if backend == "torch":
        return None
    device = torch.device(device)
    module, reason = _triton_ops()
    if backend == "auto":
        return module if device.type == "cuda" else None
    if module is None:
        raise RuntimeError(f"backend='triton' is unavailable here ({reason}); use backend='torch' or 'auto'.")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "backend='triton' on CPU tensors runs Triton's interpreter, which needs TRITON_INTERPRET=1 in the "
            "environment before lpjepa is imported; or use backend='torch' on the CPU."
        )
    return module
