"""Rectified LpJEPA: sparse, non-negative self-supervised features regularized by RDMReg.

The public API is a drop-in for the seed's ``sample_rgg`` and ``rdmreg_loss``, plus the
``RDMReg`` module, ``rectified_lpjepa_loss`` and its module ``RectifiedLpJEPALoss`` (shaped
like Lightly's losses). On CUDA tensors the fused Triton kernels run; elsewhere a torch
backend with the same value and gradient does, and on a GPU where the kernels cannot run
too, after one ``TritonFallbackWarning``.

``import lpjepa`` imports torch and this package's own modules only: the Triton ops load
at the first call that uses them, the training program's timm and torchvision with
``lpjepa.training``, and the seed's reference (the tests' oracle) on first access of
``lpjepa.reference``.
"""
import importlib

from . import metrics, rgg
from .loss import LossParts, RDMReg, RectifiedLpJEPALoss, rdmreg_loss, rectified_lpjepa_loss
from .ops.backend import KernelUnavailable, TritonFallbackWarning
from .sampling import sample_rgg

__all__ = [
    "KernelUnavailable",
    "LossParts",
    "RDMReg",
    "RectifiedLpJEPALoss",
    "metrics",
    "rdmreg_loss",
    "rectified_lpjepa_loss",
    "reference",
    "rgg",
    "sample_rgg",
    "TritonFallbackWarning",
]
__version__ = "0.1.0"


def __getattr__(name):
    # ``lpjepa.reference`` stays an attribute of the package without being imported by it.
    if name == "reference":
        return importlib.import_module(".reference", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
