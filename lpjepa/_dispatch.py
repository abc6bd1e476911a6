"""Chooses between the torch backend and the Triton kernels for each call."""
import os

import torch

from ._checks import check_backend

# Filled on first use. A dict and an import statement rather than functools.lru_cache and
# importlib: torch.compile traces both (it cannot trace importlib.import_module), so a
# compiled model's first call does not break its graph here.
_LOADED = {}


def _triton_ops():
    """(the module of Triton-backed ops, None), or (None, the reason it cannot be loaded)."""
    if "ops" not in _LOADED:
        try:
            from . import triton_ops as module
            _LOADED["ops"] = (module, None)
        except ImportError as error:  # triton missing, or no kernels on this platform
            _LOADED["ops"] = (None, str(error))
    return _LOADED["ops"]


def triton_ops(backend, device):
    """The Triton ops module when ``backend`` resolves to Triton on ``device``, else None.

    'auto' picks Triton for CUDA tensors when it loads and torch otherwise; 'triton'
    insists, and explains what is missing when it cannot run.
    """
    check_backend(backend)
    if backend == "torch":
        return None
    device = torch.device(device)
    if backend == "auto" and device.type != "cuda":
        return None
    module, reason = _triton_ops()
    if backend == "auto":
        return module
    if module is None:
        raise RuntimeError(f"backend='triton' is unavailable here ({reason}); use backend='torch' or 'auto'.")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "backend='triton' on CPU tensors runs Triton's interpreter, which needs TRITON_INTERPRET=1 in the "
            "environment before lpjepa is imported; or use backend='torch' on the CPU."
        )
    return module
