"""Which backend computes a call: the torch ops, or the Triton ops over ``lpjepa.kernels``.

The Triton ops are loaded on first use, never by ``import lpjepa``: importing them
imports Triton, and on a GPU registering a ``triton_op`` imports ``torch._dynamo``.
"""
import os

import torch

BACKENDS = ("auto", "torch", "triton")

# Filled on first use. A dict and an import statement rather than functools.lru_cache and
# importlib: torch.compile traces both (it cannot trace importlib.import_module), so a
# compiled model's first call does not break its graph here.
_LOADED = {}


def check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got backend={backend!r}")


def _load_triton_ops():
    """({op name: its Triton module}, None), or (None, the reason they cannot be loaded)."""
    if "ops" not in _LOADED:
        try:
            from . import rgg_sample_triton, sliced_wasserstein_triton

            _LOADED["ops"] = (dict(rgg_sample=rgg_sample_triton, sliced_wasserstein=sliced_wasserstein_triton), None)
        except ImportError as error:  # triton missing, or no kernels on this platform
            _LOADED["ops"] = (None, str(error))
    return _LOADED["ops"]


def triton_module(op, backend, device, dtype=None):
    """The Triton module of ``op`` ('sliced_wasserstein' or 'rgg_sample') when ``backend`` picks Triton, else None.

    'auto' picks Triton for CUDA tensors when it loads, and torch otherwise, and keeps
    float64 (``dtype``) on torch, since the kernels compute in fp32; 'triton' insists, and
    explains what is missing when it cannot run; 'torch' never loads it.
    """
    check_backend(backend)
    if backend == "torch":
        return None
    device = torch.device(device)
    if backend == "auto" and (device.type != "cuda" or dtype == torch.float64):
        return None
    modules, reason = _load_triton_ops()
    if backend == "auto":
        return None if modules is None else modules[op]
    if modules is None:
        raise RuntimeError(f"backend='triton' is unavailable here ({reason}); use backend='torch' or 'auto'.")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "backend='triton' on CPU tensors runs Triton's interpreter, which needs TRITON_INTERPRET=1 in the "
            "environment before lpjepa is imported; or use backend='torch' on the CPU."
        )
    return modules[op]
