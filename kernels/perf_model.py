"""A static performance model of the sliced-Wasserstein loss: a roofline lower bound per path, not a measurement.

For each kernel a path launches, the bound is the larger of its arithmetic at the
datasheet peak of the units it runs on and its DRAM traffic at the datasheet bandwidth,
each scaled down when the kernel has fewer programs than the GPU has SMs (an idle SM
contributes nothing); a path's bound is the sum over its kernels, which run one after
another. Real kernels reach a fraction of these peaks, so a measured time is always
above the bound; the ratio says how far a kernel is from its roofline. ``compile_report
--model`` adds what the compiled code says: registers, shared memory and warps give the
programs resident per SM and the waves, and the SASS the tensor-core instructions.

What each kernel is charged (no cache reuse beyond what is said):

* projection (``_project_kernel`` or cuBLAS): 2 S K B D flops on the tensor cores (fp16 /
  bf16; TF32 for fp32 when allowed) or the FMA units (IEEE fp32); reads the S B D rows and
  the K D directions once, writes S K B fp32.
* register sort (``_sort_residual_kernel``): a bitonic sort of n keys makes
  n log2(n) (log2(n) + 1) / 2 element-steps; each costs at least 2 lane instructions for
  an int32 key and 4 for an int64 key, issued at the FP32 lane rate (half the FMA flop
  rate), the fastest any SM issues. Sorts: the target once (int32 keys without its
  residual) and each view (int64 keys, an argsort); reads the projections, writes the
  residuals.
* torch.sort + ``_residual_kernel``: the sort at least reads its fp32 keys and writes
  them with their int64 indices; the residual kernel reads both back and writes the
  residual.
* the fixed-order reduction: one program, a few hundred bytes: its launch.
* backward (forward + backward rows): 2 V K B D flops for z's gradient, on the same units
  as the projection (its operands are rounded to the features' dtype), reading the
  gradient of the projections and the directions, writing z's gradient.

Both sides are charged the same work, the whole regularizer step of a training loop:
``path_costs`` what ``RDMReg`` launches (the target's and the directions' draws, the
casts and the stack included), ``seed_costs`` the seed's step as its notebook writes it,
on the GPU with its Gamma draw moved there, forward and backward: per view, fresh
directions (randn, norm, divide), autocast's casts, two fp16 matmuls, two torch.sort
along the batch, the squared difference and its mean, then the backward through sort and
matmul. Elementwise kernels are charged their memory traffic alone.

Launches are counted too: at the seed's shape every kernel is shorter than PyTorch's
typical 3-10 microseconds of host time per launch, so ``launch_floor_us`` (3 microseconds
a launch, the low end) can exceed the roofline bound there.
"""
import math
from typing import NamedTuple

import torch
import triton

from . import sliced_wasserstein as kernels


class GPU(NamedTuple):
    """Datasheet peaks (dense) of one GPU, from the vendor's published figures."""

    name: str
    arch: int
    sms: int
    fp32_tflops: float  # FMA units
    tf32_tflops: float  # tensor cores
    fp16_tflops: float  # tensor cores, fp32 accumulate (bf16 alike)
    hbm_tbps: float
    regs_per_sm: int
    smem_per_sm: int  # bytes
    max_threads_per_sm: int
    max_blocks_per_sm: int


GPUS = {
    "H100": GPU("H100 SXM5", 90, 132, 66.9, 494.7, 989.4, 3.35, 65536, 228 * 1024, 2048, 32),
    "A100": GPU("A100 SXM4", 80, 108, 19.5, 156.0, 312.0, 2.04, 65536, 164 * 1024, 2048, 32),
}


class Shape(NamedTuple):
    name: str
    B: int
    D: int
    K: int


# The seed's minimal example; the official recipe's (8192 directions, D 2048, a global
# batch of up to 1024 gathered over GPUs); a large batch.
MODEL_SHAPES = (Shape("seed", 256, 512, 256), Shape("official", 1024, 2048, 8192), Shape("large", 4096, 2048, 4096))

LAUNCH_US = 3.0  # the low end of PyTorch's typical host time per kernel launch


class KernelCost(NamedTuple):
    """What one launch must do: its programs, flops (on which units) and DRAM bytes."""

    name: str
    programs: int
    flops: float
    unit: str  # 'tensor_fp16', 'tensor_tf32', 'fma_fp32' or 'lanes' (instructions at the FP32 lane rate)
    dram_bytes: float


def peak_per_second(gpu, unit):
    return {
        "tensor_fp16": gpu.fp16_tflops,
        "tensor_tf32": gpu.tf32_tflops,
        "fma_fp32": gpu.fp32_tflops,
        "lanes": gpu.fp32_tflops / 2,  # one lane instruction per FMA's two flops
    }[unit] * 1e12


def kernel_bound_us(cost, gpu):
    """The roofline lower bound of one kernel, in microseconds (the SMs it can occupy only)."""
    busy = min(1.0, cost.programs / gpu.sms) if cost.programs else 1.0
    compute = cost.flops / (peak_per_second(gpu, cost.unit) * busy)
    memory = cost.dram_bytes / (gpu.hbm_tbps * 1e12)
    return 1e6 * max(compute, memory)


def residency(regs_per_thread, warps, smem_bytes, gpu):
    """Programs resident on one SM: the smallest of the register, shared-memory, thread and block limits.

    Registers are allocated per warp in units of 256.
    """
    regs_per_warp = math.ceil(regs_per_thread * 32 / 256) * 256
    by_regs = gpu.regs_per_sm // max(1, regs_per_warp * warps)
    by_smem = gpu.smem_per_sm // smem_bytes if smem_bytes else gpu.max_blocks_per_sm
    by_threads = gpu.max_threads_per_sm // (32 * warps)
    return max(0, min(by_regs, by_smem, by_threads, gpu.max_blocks_per_sm))


def _matmul_unit(dtype_bytes, allow_tf32):
    if dtype_bytes == 2:
        return "tensor_fp16"
    return "tensor_tf32" if allow_tf32 else "fma_fp32"


def bitonic_steps(n):
    """Element-steps of a bitonic sort of n (a power of two) keys: n log2(n) (log2(n) + 1) / 2."""
    log_n = max(1, int(math.log2(n)))
    return n * log_n * (log_n + 1) / 2


def projection_cost(name, sources, B, D, K, dtype_bytes, allow_tf32, programs):
    return KernelCost(name, programs, 2.0 * sources * K * B * D, _matmul_unit(dtype_bytes, allow_tf32),
                      sources * B * D * dtype_bytes + K * D * dtype_bytes + sources * K * B * 4)


def register_sort_cost(views, targets, B, K, programs, need_target_residual):
    b_pad = 1 << max(0, B - 1).bit_length()
    target_instructions = 4 if need_target_residual else 2
    instructions = K * bitonic_steps(b_pad) * (targets * target_instructions + views * 4)
    written = views + (targets if need_target_residual else 0)
    return KernelCost("_sort_residual_kernel", programs, instructions, "lanes",
                      (views + targets + written) * K * B * 4)


def torch_sort_costs(views, targets, B, K, residual_programs, need_target_residual):
    rows = (views + targets) * K * B
    sort = KernelCost("torch.sort", 0, 0.0, "lanes", rows * (4 + 4 + 8))
    written = views + (targets if need_target_residual else 0)
    residual = KernelCost("_residual_kernel", residual_programs, 0.0, "lanes", rows * (4 + 8) + written * K * B * 4)
    return [sort, residual]


def backward_cost(views, B, D, K, dtype_bytes, allow_tf32):
    return KernelCost("backward matmul", 0, 2.0 * views * K * B * D, _matmul_unit(dtype_bytes, allow_tf32),
                      views * K * B * (4 + dtype_bytes) + K * D * dtype_bytes + views * B * D * dtype_bytes)


def mean_cost():
    return KernelCost("_mean_of_partials_kernel", 1, 0.0, "lanes", 0.0)


def _elementwise(name, elements, bytes_per_element):
    """A memory-bound kernel touching ``elements`` values at ``bytes_per_element`` read + written each."""
    return KernelCost(name, 0, 0.0, "lanes", elements * bytes_per_element)


def direction_draw_costs(shape):
    """``random_projections``, the seed's draw: randn, the row norms, the division (fp32)."""
    K, D = shape.K, shape.D
    return [_elementwise("randn directions", K * D, 4), _elementwise("row norms", K * D, 4),
            _elementwise("divide by the norms", K * D, 8)]


def seed_costs(shape, views=2, with_target_draw=True):
    """The seed's regularizer, kernel by kernel: fp16 autocast, its Gamma draw moved to the GPU.

    What the seed's training loop runs per step (``with_target_draw``): the target's draw
    (sign, Gamma variate and 6 elementwise ops), then per view ``rdmreg_loss`` with fresh
    directions (3 kernels), autocast's fp16 casts of z, P, the target and P again, two
    fp16 matmuls, two ``torch.sort`` with indices, subtract, square and mean; backward per
    view the mean's and the square's gradients, the sort's scatter, grad @ P and the cast
    back; the two views' mean.
    """
    B, D, K = shape.B, shape.D, shape.K
    costs = [_elementwise(f"target draw {i + 1}/8", B * D, 12) for i in range(8)] if with_target_draw else []
    for _ in range(views):
        costs += direction_draw_costs(shape)
        costs += [_elementwise(f"autocast cast {name}", n, 6) for name, n in
                  (("z", B * D), ("P", K * D), ("target", B * D), ("P again", K * D))]
        costs += [projection_cost("z @ P.T (fp16)", 1, B, D, K, 2, False, 0),
                  projection_cost("target @ P.T (fp16)", 1, B, D, K, 2, False, 0),
                  _elementwise("torch.sort z", B * K, 2 + 2 + 8), _elementwise("torch.sort target", B * K, 2 + 2 + 8),
                  _elementwise("subtract", B * K, 6), _elementwise("square", B * K, 4), _elementwise("mean", B * K, 2),
                  _elementwise("backward: mean", B * K, 2), _elementwise("backward: square", B * K, 6),
                  _elementwise("backward: sort scatter", B * K, 2 + 8 + 2),
                  KernelCost("backward: grad @ P (fp16)", 0, 2.0 * B * K * D, "tensor_fp16", (B * K + K * D + B * D) * 2),
                  _elementwise("backward: cast to fp32", B * D, 6)]
    return costs + [_elementwise("mean of the views", 2, 4)]


def project_programs(sources, shape, dtype, allow_tf32):
    """Programs of one ``_project_kernel`` launch, from the launcher's own tile choice."""
    cfg = kernels.project_config(sources, shape.B, shape.D, shape.K, dtype, allow_tf32)
    return sources * triton.cdiv(shape.K, cfg["BLOCK_K"]) * triton.cdiv(shape.B, cfg["BLOCK_B"])


def path_costs(shape, path, *, dtype=torch.bfloat16, allow_tf32=False, views=2, targets=1,
               need_target_residual=False, with_backward=True, with_target_draw=True):
    """The kernels of one (projection path, sort path) for ``shape``: what ``RDMReg`` launches.

    Forward: the target's draw (the Triton sampler, ``with_target_draw``), the directions'
    draw (3 kernels), the stack of the views, the casts of the target and the directions
    to the features' dtype (fp16 / bf16), the projections, the sort and residual, the
    reduction; backward (``with_backward``): the residual times its scale, its cast to the
    features' dtype, z's gradient matmul. Program counts come from the launchers'
    configs; cuBLAS, torch.sort and torch's elementwise kernels count as filling every SM.
    """
    B, D, K = shape.B, shape.D, shape.K
    projection_path, sort_path = path
    dtype_bytes = dtype.itemsize
    costs = [KernelCost("rgg sampler", 0, 0.0, "lanes", B * D * 4)] if with_target_draw else []
    costs += direction_draw_costs(shape)
    if views > 1:
        costs.append(_elementwise("stack the views", views * B * D, 2 * dtype_bytes))
    if dtype_bytes != 4:
        costs += [_elementwise(f"cast {name}", n, 4 + dtype_bytes) for name, n in (("target", B * D), ("P", K * D))]
    for sources in (views, targets):
        if projection_path == "triton":
            programs = project_programs(sources, shape, dtype, allow_tf32)
            costs.append(projection_cost("_project_kernel", sources, B, D, K, dtype_bytes, allow_tf32, programs))
        else:
            costs.append(projection_cost("cuBLAS", sources, B, D, K, dtype_bytes, allow_tf32, 0))
    if sort_path == "registers":
        programs = triton.cdiv(K, kernels.sort_config(B, K, need_target_residual)["ROWS"])
        costs.append(register_sort_cost(views, targets, B, K, programs, need_target_residual))
    else:
        cfg = kernels.residual_config(B, K)
        programs = triton.cdiv(K, cfg["BLOCK_K"]) * triton.cdiv(B, cfg["BLOCK_B"])
        costs += torch_sort_costs(views, targets, B, K, programs, need_target_residual)
    costs.append(mean_cost())
    if with_backward:
        costs.append(_elementwise("backward: residual x scale", views * K * B, 8))
        if dtype_bytes != 4:
            costs.append(_elementwise("backward: cast to the features' dtype", views * K * B, 4 + dtype_bytes))
        costs.append(backward_cost(views, B, D, K, dtype_bytes, allow_tf32))
    return costs


def total_bound_us(costs, gpu):
    """(roofline bound in microseconds, launches, launch floor in microseconds) of a kernel sequence."""
    bound = sum(kernel_bound_us(cost, gpu) for cost in costs)
    return bound, len(costs), len(costs) * LAUNCH_US
