"""Rectified LpJEPA: sparse, non-negative self-supervised features regularized by RDMReg.

The public API is a drop-in for the seed's ``sample_rgg`` and ``rdmreg_loss``, plus the
``RDMReg`` module and ``rectified_lpjepa_loss``. On CUDA tensors the fused Triton
kernels run; elsewhere a torch backend with the same value and gradient does.
"""
from . import metrics, reference, rgg
from .loss import LossParts, RDMReg, rdmreg_loss, rectified_lpjepa_loss
from .sampling import sample_rgg

__all__ = [
    "LossParts",
    "RDMReg",
    "metrics",
    "rdmreg_loss",
    "rectified_lpjepa_loss",
    "reference",
    "rgg",
    "sample_rgg",
]
__version__ = "0.1.0"
