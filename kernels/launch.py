"""What every launcher shares: a kernel launch as data, and the dtypes the kernels take."""
from typing import Any, NamedTuple

import torch

# The floating dtypes every kernel reads and writes; they compute in fp32 whatever the input.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_kernel_dtype(name, tensor):
    """Refuses a tensor the kernels cannot read: the one dtype check of the kernel layer."""
    if tensor.dtype not in KERNEL_DTYPES:
        raise ValueError(f"{name} must be one of {KERNEL_DTYPES}; got {tensor.dtype}")


class KernelLaunch(NamedTuple):
    """One ``kernel[grid](*args, **meta)`` call; ``meta`` holds constexprs and num_warps/num_stages.

    The launchers build these with their heuristics and call them; the compile report
    builds the same ones on ``meta``-device tensors and compiles instead of launching.
    """

    kernel: Any
    grid: tuple
    args: tuple
    meta: dict

    def __call__(self):
        return self.kernel[self.grid](*self.args, **self.meta)
