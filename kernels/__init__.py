"""Triton kernels and their launchers, installed as ``lpjepa.kernels``.

Only ``@triton.jit`` kernels and the plain-Python functions that launch them live
here: no autograd, no ``nn.Module``. ``lpjepa`` imports this package, never the
other way round.
"""
