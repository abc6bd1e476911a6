"""What every launcher shares: a kernel launch as data, the dtypes the kernels take, the device's architecture."""
from typing import Any, NamedTuple

import torch

# The floating dtypes every kernel reads and writes; they compute in fp32 whatever the input.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_kernel_dtype(name, tensor):
    """Refuses a tensor the kernels cannot read: the one dtype check of the kernel layer."""
    if tensor.dtype not in KERNEL_DTYPES:
        raise ValueError(f"{name} must be one of {KERNEL_DTYPES}; got {tensor.dtype}")


# The architectures from which Triton emits tensor-core instructions for tl.dot (mma.sync);
# below it (sm_75, Turing) tl.dot runs on the FMA units whatever the dtype, and bf16 has no
# hardware arithmetic at all.
TENSOR_CORE_ARCH = 80
_ARCH_OF_DEVICE = {}  # {CUDA device index: major * 10 + minor}


def device_arch(device):
    """The compute capability of a CUDA ``device`` as major * 10 + minor (90 for an H100); None off CUDA.

    The launchers choose tiles and paths by it; None (CPU, the interpreter, ``meta``
    tensors of the compile report, which passes its arch explicitly) takes the sm_80+ choices.
    """
    if not isinstance(device, torch.device):  # every launch plan asks: no new device object for a device
        device = torch.device(device)
    if device.type != "cuda":
        return None
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _ARCH_OF_DEVICE:  # asked at every launch plan: read the driver once per device
        major, minor = torch.cuda.get_device_capability(index)
        _ARCH_OF_DEVICE[index] = major * 10 + minor
    return _ARCH_OF_DEVICE[index]


def has_tensor_core_dot(arch):
    """Whether Triton's tl.dot runs on tensor cores at ``arch`` (None: assumed, as on sm_80+)."""
    return arch is None or arch >= TENSOR_CORE_ARCH


def cdiv(a, b):
    """ceil(a / b) for positive ints: what ``triton.cdiv`` gives, at a plain function call's cost.

    The launch plans run at every step; ``triton.cdiv`` and ``triton.next_power_of_2`` are
    Triton ``ConstexprFunction``s, whose host-side call costs about 10 us each.
    """
    return -(-a // b)


def next_power_of_2(n):
    """The smallest power of two >= n (1 for n <= 1), as ``triton.next_power_of_2``."""
    return 1 << max(0, int(n) - 1).bit_length()


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
