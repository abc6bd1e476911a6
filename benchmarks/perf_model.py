"""A static performance model of the sliced-Wasserstein loss: a roofline lower bound per path, not a measurement.

For each kernel a path launches, the bound is the larger of its arithmetic at the
datasheet peak of the units it runs on (or, for the register sort, its instructions at
the issue rates of the SM's pipes) and its DRAM traffic at the datasheet bandwidth, each
scaled down when the kernel has fewer programs than the GPU has SMs (an idle SM
contributes nothing); a path's bound is the sum over its kernels, which run one after
another. Real kernels reach a fraction of these peaks, so a measured time is always
above the bound; the ratio says how far a kernel is from its roofline. ``compile_report
--model`` adds what the compiled code says: registers, shared memory and warps give the
programs resident per SM and the waves, the SASS the tensor-core instructions and the
register sort's instruction mix.

What each kernel is charged (no cache reuse beyond what is said):

* projection (``_project_kernel`` or cuBLAS): 2 S K B D flops on the tensor cores (fp16 /
  bf16; TF32 for fp32 when allowed) or the FMA units (IEEE fp32); reads the S B D rows and
  the K D directions once, writes S K B fp32.
* register sort (``_sort_residual_kernel``): its instructions per thread, by class, read
  from the compiled SASS (``compile_report.sass_instruction_mix``: the code outside the
  loop over the views once, the loop's body V times), times the threads launched, each
  class at its pipe's rate per SM (integer ALU ops at the INT32 lanes, half the FP32
  lanes of an H100; IMAD, FP32, shuffles and shared memory at theirs; every instruction
  through the 4 warp schedulers), over the SMs the programs occupy. An SM has 4 warp
  schedulers, each feeding its own quarter of the pipes: with fewer than 4 warps resident
  per SM (programs of one warp each, the small-batch configs) the issue rate is
  min(4, resident warps) / 4 of the peak. Without a compiled count (``path_costs`` alone,
  the benchmarks) a fallback formula stands in, and the row says so: a bitonic sort of n
  keys makes n log2(n) (log2(n) + 1) / 2 element-steps, each at least 2 integer ALU
  instructions for an int32 key and 4 for an int64 key. The SASS count is about 2.3x the
  formula at the official shape. Reads the projections, writes the residuals.
* torch.sort + ``_residual_kernel``: the sort at least reads its fp32 keys and writes
  them with their int64 indices; the residual kernel reads both back and writes the
  residual.
* the fixed-order reduction: one program, a few hundred bytes: its launch.
* backward (``_project_backward_kernel``): 2 V K B D flops for z's gradient, on the same
  units as the projection (the residual is rounded to the features' dtype in the kernel),
  reading the fp32 residual and the directions, writing z's gradient in its dtype.
* the draw (``_rgg_kernel`` with directions): the target's and the directions' elements
  written in the features' dtype, charged their memory traffic.

Both sides are charged the same work, the whole regularizer step of a training loop:
``path_costs`` what ``RDMReg`` launches (one draw of the target and the directions, the
stack where the sources need one), ``seed_costs`` the seed's step as its notebook writes it,
on the GPU with its Gamma draw moved there, forward and backward: per view, fresh
directions (randn, norm, divide), autocast's casts, two fp16 matmuls, two torch.sort
along the batch, the squared difference and its mean, then the backward through sort and
matmul. Elementwise kernels are charged their memory traffic alone.

The host issues every launch, so a step takes at least its host time as well: the
launch plans of one loss call built in Python (``host_plan_us``, measured on the machine
running the model) plus ``LAUNCH_US`` per launch (3 microseconds, the low end of
PyTorch's typical 3-10). ``step_bound_us`` is the larger of the GPU bound and that host
time; at the seed's shape the host time is the larger.

GPU figures: ``GPUS`` holds datasheet peaks of the common data-center GPUs and the
RTX 4090, each with its source; ``device_gpu()`` picks the current CUDA device's row by its
name, or, for a GPU not in the table, scales the nearest known GPU of the same
architecture by SM count and says so in its name.

What the bound ignores (each makes real time longer, never shorter):

* caches: L2 and L1 reuse beyond what is charged, and L2 misses beyond one DRAM pass;
  every byte is charged once at the datasheet HBM bandwidth;
* instruction latency and dependency stalls: instructions are charged at issue rate, as
  if every scheduler always had a ready warp (beyond the idle-scheduler charge);
* shared-memory bank conflicts, uncoalesced or partial-sector accesses, and the width of
  shared and global accesses (one issue slot each);
* the tail of partial waves beyond the busy-SM fraction (programs are spread evenly over
  the SMs they occupy), and launch ramp-up and drain inside a kernel;
* clocks below the boost clock (power and thermal limits) and the datasheet peaks being
  peaks: tensor cores, FMA units and HBM never sustain them;
* the real efficiency of torch's elementwise kernels, cuBLAS and torch.sort (charged their
  minimal traffic or flops at full occupancy);
* host time beyond the measured plan building and ``LAUNCH_US`` per launch: Python and
  autograd overhead of the ops, the allocator, synchronisations, gaps between launches;
* overlap between kernels (none is assumed: kernels run one after another) and between
  the host and the GPU (the step is the larger of the two, not their sum).
"""
import math
import re
import statistics
import time
from typing import NamedTuple, Optional

import torch
import triton

from lpjepa.kernels import sliced_wasserstein as kernels
from lpjepa.kernels.launch import has_tensor_core_dot


class GPU(NamedTuple):
    """Datasheet peaks (dense) and per-SM limits of one GPU, with where the figures come from."""

    name: str
    arch: int  # compute capability, major * 10 + minor
    sms: int
    fp32_tflops: float  # FMA units
    tf32_tflops: float  # tensor cores (the FMA units' fp32 rate where there are no TF32 tensor cores)
    fp16_tflops: float  # tensor cores, fp32 accumulate (bf16 alike)
    hbm_tbps: float
    regs_per_sm: int
    smem_per_sm: int  # bytes
    max_threads_per_sm: int
    max_blocks_per_sm: int
    clock_ghz: float  # boost clock: fp32_tflops = sms x fp32_lanes x 2 flops x clock
    fp32_lanes: int  # FP32 add / multiply / FMA results per SM per clock
    int32_lanes: int  # INT32 add / compare / logic / select results per SM per clock
    source: str


# Issue rates per SM per clock that do not differ between sm_75 and sm_90 (CUDA C++
# Programming Guide, "Arithmetic Instructions": warp shuffle 32 results per clock per SM,
# 32-bit integer multiply / multiply-add 64); shared memory serves 128 bytes a clock per SM,
# one 32-bit word for each of 32 lanes. Every SM has 4 warp schedulers (sub-partitions), each
# issuing one warp instruction a clock to its own quarter of the pipes.
SHUFFLE_LANES = 32
SHARED_LANES = 32
INT_MUL_LANES = 64
SCHEDULERS = 4
WARP = 32

# Per-SM limits and lanes by compute capability (CUDA C++ Programming Guide: technical
# specifications per compute capability; arithmetic instruction throughput): 32-bit
# registers, shared memory (bytes), threads, resident blocks, FP32 lanes, INT32 lanes.
SM_LIMITS = {
    75: (65536, 64 * 1024, 1024, 16, 64, 64),
    80: (65536, 164 * 1024, 2048, 32, 64, 64),
    86: (65536, 100 * 1024, 1536, 16, 128, 64),
    89: (65536, 100 * 1024, 1536, 24, 128, 64),
    90: (65536, 228 * 1024, 2048, 32, 128, 64),
}


def _gpu(name, arch, sms, fp32, tf32, fp16, hbm, clock, source):
    """A GPUS row: its datasheet peaks (TFLOP/s, TB/s, boost clock in GHz) and its architecture's per-SM limits."""
    regs, smem, threads, blocks, fp32_lanes, int32_lanes = SM_LIMITS[arch]
    return GPU(name, arch, sms, fp32, tf32, fp16, hbm, regs, smem, threads, blocks, clock, fp32_lanes, int32_lanes,
               source + "; per-SM limits and lanes: CUDA C++ Programming Guide")


_DATASHEET = "NVIDIA datasheet, dense peaks, boost clock: "
# Name, arch, SMs, FP32, TF32, FP16 / BF16 tensor with FP32 accumulate (TFLOP/s), HBM (TB/s),
# boost clock (GHz). H100 SXM5, H200 and A100 SXM4 80 GB as the project's GPU figures table has them.
GPUS = {
    "H100": _gpu("H100 SXM5", 90, 132, 66.9, 494.7, 989.4, 3.35, 1.98, _DATASHEET + "H100 SXM5 80 GB"),
    "H100 PCIe": _gpu("H100 PCIe", 90, 114, 51.2, 378.0, 756.0, 2.0, 1.755, _DATASHEET + "H100 PCIe 80 GB"),
    "H100 NVL": _gpu("H100 NVL", 90, 132, 60.0, 417.5, 835.5, 3.9, 1.785,
                     _DATASHEET + "H100 NVL 94 GB (its sparse tensor figures halved)"),
    "H200": _gpu("H200 SXM", 90, 132, 66.9, 494.7, 989.4, 4.8, 1.98, _DATASHEET + "H200 SXM 141 GB"),
    "A100": _gpu("A100 SXM4", 80, 108, 19.5, 156.0, 312.0, 2.04, 1.41, _DATASHEET + "A100 SXM4 80 GB"),
    "A100 40GB": _gpu("A100 40GB", 80, 108, 19.5, 156.0, 312.0, 1.555, 1.41, _DATASHEET + "A100 SXM4 / PCIe 40 GB"),
    "A100 PCIe": _gpu("A100 PCIe", 80, 108, 19.5, 156.0, 312.0, 1.935, 1.41, _DATASHEET + "A100 PCIe 80 GB"),
    "L4": _gpu("L4", 89, 58, 30.3, 60.0, 121.0, 0.3, 2.04, _DATASHEET + "L4 (its sparse tensor figures halved)"),
    "A10": _gpu("A10", 86, 72, 31.2, 62.5, 125.0, 0.6, 1.695, _DATASHEET + "A10 (its sparse tensor figures halved)"),
    "T4": _gpu("T4", 75, 40, 8.1, 8.1, 65.0, 0.32, 1.59,
               _DATASHEET + "T4 (no TF32 tensor cores: TF32 is the FMA units' FP32 rate)"),
    "RTX 4090": _gpu("RTX 4090", 89, 128, 82.6, 82.6, 165.2, 1.008, 2.52,
                     "NVIDIA Ada GPU architecture whitepaper, GeForce RTX 4090, dense, FP16 with FP32 accumulate"),
}

# The GPUs compile_report --model prints (it runs without a GPU).
MODEL_GPUS = ("H100", "A100", "H200")

# torch.cuda.get_device_name() patterns (lower case), first match wins: e.g. "NVIDIA H100 80GB HBM3",
# "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe", "Tesla T4", "NVIDIA GeForce RTX 4090".
DEVICE_NAMES = (
    (r"h200(?!.*nvl)", "H200"),
    (r"h100.*nvl", "H100 NVL"),
    (r"h100.*pcie", "H100 PCIe"),
    (r"h100", "H100"),
    (r"a100.*40gb", "A100 40GB"),
    (r"a100.*pcie", "A100 PCIe"),
    (r"a100", "A100"),
    (r"\bl4\b", "L4"),
    (r"\ba10\b", "A10"),
    (r"\bt4\b", "T4"),
    (r"rtx 4090", "RTX 4090"),
)


def _scaled(gpu, sms, name, props):
    """``gpu``'s peaks scaled to ``sms`` SMs, with the per-SM limits torch reports for the device."""
    ratio = sms / gpu.sms
    return gpu._replace(
        name=name, sms=sms, fp32_tflops=gpu.fp32_tflops * ratio, tf32_tflops=gpu.tf32_tflops * ratio,
        fp16_tflops=gpu.fp16_tflops * ratio, hbm_tbps=gpu.hbm_tbps * ratio,
        regs_per_sm=props.regs_per_multiprocessor or gpu.regs_per_sm,
        smem_per_sm=props.shared_memory_per_multiprocessor or gpu.smem_per_sm,
        max_threads_per_sm=props.max_threads_per_multi_processor or gpu.max_threads_per_sm,
        source=f"estimate: {gpu.name}'s peaks x {sms}/{gpu.sms} SMs; per-SM limits from the device's properties",
    )


def device_gpu(device=None):
    """The GPU figures of a CUDA device (default: the current one), from its name, else an estimate.

    A name in ``DEVICE_NAMES`` takes its ``GPUS`` row (scaled by SM count when torch reports
    fewer SMs, as on a MIG slice). Any other GPU is labelled "unknown GPU" and takes the
    peaks of the known GPU of its architecture (else its major architecture, else the
    H100) with the nearest SM count, scaled by SM count, and the per-SM limits torch
    reports. Raises RuntimeError when torch sees no CUDA device.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("device_gpu needs a CUDA device; without one pass a GPUS row, e.g. GPUS['H100']")
    name = torch.cuda.get_device_name(device)
    props = torch.cuda.get_device_properties(device)
    sms, arch = props.multi_processor_count, props.major * 10 + props.minor
    for pattern, key in DEVICE_NAMES:
        if re.search(pattern, name.lower()):
            gpu = GPUS[key]
            return gpu if sms == gpu.sms else _scaled(gpu, sms, f"{gpu.name} ({sms} of {gpu.sms} SMs)", props)
    candidates = ([g for g in GPUS.values() if g.arch == arch] or
                  [g for g in GPUS.values() if g.arch // 10 == props.major] or [GPUS["H100"]])
    nearest = min(candidates, key=lambda g: abs(g.sms - sms))
    label = f"unknown GPU {name}: peaks scaled from {nearest.name} by SM count"
    return _scaled(nearest, sms, label, props)._replace(arch=arch)


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
    """What one launch must do: its programs, flops (on which units), DRAM bytes and, for the sort, instructions.

    ``instructions``: lane instructions of the whole launch (per thread x threads) by
    class (``ISSUE_CLASSES``), charged at the issue rates of the SM's pipes; ``source``
    says where they come from. ``warps``, ``regs`` and ``smem`` (bytes) of one program
    give its residency; with ``warps`` set, fewer than 4 resident warps per SM leave warp
    schedulers idle and the compute time grows by 4 / min(4, resident warps).
    """

    name: str
    programs: int
    flops: float
    unit: str  # 'tensor_fp16', 'tensor_tf32', 'fma_fp32' or 'lanes' (instructions at the FP32 lane rate)
    dram_bytes: float
    instructions: Optional[dict] = None
    source: str = ""
    warps: int = 0
    regs: int = 0
    smem: int = 0


# The instruction classes compile_report.sass_instruction_mix sorts SASS into, and the pipes
# they issue to. The others issue at the schedulers' rate alone.
ISSUE_CLASSES = ("int_alu", "int_mul", "fp32", "shuffle", "shared", "global", "control", "uniform", "other")


def peak_per_second(gpu, unit):
    return {
        "tensor_fp16": gpu.fp16_tflops,
        "tensor_tf32": gpu.tf32_tflops,
        "fma_fp32": gpu.fp32_tflops,
        "lanes": gpu.fp32_tflops / 2,  # one lane instruction per FMA's two flops
    }[unit] * 1e12


def scheduler_fraction(cost, gpu):
    """min(4, warps resident per SM) / 4: the share of the warp schedulers a launch keeps busy (1 without ``warps``).

    Resident warps: the programs an SM holds (``residency``, at most the programs each busy
    SM gets) times the warps of one.
    """
    if not cost.warps or not cost.programs:
        return 1.0
    per_sm = math.ceil(cost.programs / min(cost.programs, gpu.sms))
    resident = min(per_sm, residency(cost.regs, cost.warps, cost.smem, gpu))
    return min(SCHEDULERS, max(1, resident) * cost.warps) / SCHEDULERS


def issue_cycles(instructions, gpu):
    """Clocks one SM needs for ``instructions`` (lane instructions by class): its busiest pipe, at full issue.

    Pipes: integer ALU ops (add, compare, logic, select, shift) at the INT32 lanes; IMAD at
    64; FP32 at the FP32 lanes, sharing the FMA pipe with IMAD; shuffles and shared memory
    at 32; every instruction through 4 schedulers of one warp instruction a clock.
    """
    n = {cls: instructions.get(cls, 0.0) for cls in ISSUE_CLASSES}
    return max(
        sum(n.values()) / (SCHEDULERS * WARP),
        n["int_alu"] / gpu.int32_lanes,
        n["int_mul"] / INT_MUL_LANES,
        (n["fp32"] + n["int_mul"]) / gpu.fp32_lanes,
        n["shuffle"] / SHUFFLE_LANES,
        n["shared"] / SHARED_LANES,
    )


def kernel_bound_us(cost, gpu):
    """The roofline lower bound of one kernel, in microseconds (the SMs it can occupy only)."""
    busy = min(1.0, cost.programs / gpu.sms) if cost.programs else 1.0
    compute = cost.flops / (peak_per_second(gpu, cost.unit) * busy)
    if cost.instructions:
        busy_sms = min(cost.programs, gpu.sms) if cost.programs else gpu.sms
        per_sm = {cls: count / busy_sms for cls, count in cost.instructions.items()}
        compute = max(compute, issue_cycles(per_sm, gpu) / (gpu.clock_ghz * 1e9))
    compute /= scheduler_fraction(cost, gpu)
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


def matmul_unit(dtype, allow_tf32, arch=90, triton_dot=False):
    """The unit a projection's multiply-adds issue to at compute capability ``arch``.

    From sm_80 as ``_matmul_unit``. Below it Triton's tl.dot (``triton_dot``) runs on the
    FMA units whatever the dtype (its SASS has no HMMA), and bf16 is multiplied as fp32 on
    either path (``sliced_wasserstein.bf16_as_fp32``); cuBLAS keeps fp16 on the tensor cores.
    """
    if not has_tensor_core_dot(arch) and (triton_dot or dtype == torch.bfloat16):
        return "fma_fp32"
    return _matmul_unit(dtype.itemsize, allow_tf32)


def bitonic_steps(n):
    """Element-steps of a bitonic sort of n (a power of two) keys: n log2(n) (log2(n) + 1) / 2."""
    log_n = max(1, int(math.log2(n)))
    return n * log_n * (log_n + 1) / 2


def projection_cost(name, sources, B, D, K, dtype_bytes, allow_tf32, programs, unit=None):
    """One projection's cost; ``unit``: where its multiply-adds issue (``matmul_unit``; None: sm_80+'s)."""
    return KernelCost(name, programs, 2.0 * sources * K * B * D, unit or _matmul_unit(dtype_bytes, allow_tf32),
                      sources * B * D * dtype_bytes + K * D * dtype_bytes + sources * K * B * 4)


def sort_instructions_per_thread(mix, views):
    """Dynamic instructions per thread by class from a SASS mix: the code outside the loop once, its body ``views`` times.

    ``mix``: ``compile_report.sass_instruction_mix``'s dict (``once``, ``loop``, ``loops``);
    the register sort's one loop is the loop over the views. None when the SASS holds
    another number of loops (the split would not be the views').
    """
    if mix is None or mix["loops"] != 1:
        return None
    classes = set(mix["once"]) | set(mix["loop"])
    return {cls: mix["once"].get(cls, 0) + views * mix["loop"].get(cls, 0) for cls in classes}


def register_sort_cost(views, targets, B, K, programs, need_target_residual, compiled=None):
    """``_sort_residual_kernel``'s cost: its SASS instruction mix when ``compiled`` has one, else the bitonic formula.

    compiled: ``compile_report``'s measure of the launch (``mix``, ``regs``, ``num_warps``,
    shared memory); without it the warps come from ``sort_config`` and the instructions
    from ``bitonic_steps`` (``source`` says which).
    """
    written = views + (targets if need_target_residual else 0)
    dram_bytes = (views + targets + written) * K * B * 4
    per_thread = sort_instructions_per_thread(compiled.get("mix"), views) if compiled else None
    if per_thread is not None:
        threads = programs * compiled["num_warps"] * WARP
        instructions = {cls: count * threads for cls, count in per_thread.items()}
        return KernelCost("_sort_residual_kernel", programs, 0.0, "lanes", dram_bytes, instructions, "sass",
                          compiled["num_warps"], compiled["regs"], compiled["smem_static"] + compiled["smem_dynamic"])
    b_pad = 1 << max(0, B - 1).bit_length()
    target_instructions = 4 if need_target_residual else 2
    lane_instructions = K * bitonic_steps(b_pad) * (targets * target_instructions + views * 4)
    warps = kernels.sort_config(B, K, need_target_residual)["num_warps"]
    return KernelCost("_sort_residual_kernel", programs, 0.0, "lanes", dram_bytes,
                      {"int_alu": lane_instructions}, "formula", warps)


def torch_sort_costs(views, targets, B, K, residual_programs, need_target_residual):
    rows = (views + targets) * K * B
    sort = KernelCost("torch.sort", 0, 0.0, "lanes", rows * (4 + 4 + 8))
    written = views + (targets if need_target_residual else 0)
    residual = KernelCost("_residual_kernel", residual_programs, 0.0, "lanes", rows * (4 + 8) + written * K * B * 4)
    return [sort, residual]


def backward_cost(views, B, D, K, dtype_bytes, allow_tf32, unit=None, programs=0):
    """The views' gradient, ``_project_backward_kernel``: the fp32 residual read, P read, the gradient written."""
    return KernelCost("_project_backward_kernel", programs, 2.0 * views * K * B * D,
                      unit or _matmul_unit(dtype_bytes, allow_tf32),
                      views * K * B * 4 + K * D * dtype_bytes + views * B * D * dtype_bytes)


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


def project_programs(sources, shape, dtype, allow_tf32, arch=90):
    """Programs of one ``_project_kernel`` launch, from the launcher's own tile choice at ``arch``."""
    cfg = kernels.project_config(sources, shape.B, shape.D, shape.K, dtype, allow_tf32, arch)
    return sources * triton.cdiv(shape.K, cfg["BLOCK_K"]) * triton.cdiv(shape.B, cfg["BLOCK_B"])


def path_costs(shape, path, *, dtype=torch.bfloat16, allow_tf32=False, views=2, targets=1,
               need_target_residual=False, with_backward=True, with_target_draw=True, sort_compiled=None, arch=90):
    """The kernels of one (projection path, sort path) for ``shape``: what ``RDMReg`` launches.

    Forward: the draw (``with_target_draw``: the Triton sampler writes the target and the
    Gaussian directions in the features' dtype in one launch; without it, given targets,
    the directions' torch draw, 3 kernels, and their cast to fp16 / bf16), the projections
    of the views and the targets in one launch (the Triton kernel reads two views and a
    shared target where they lie; more sources, or the cuBLAS path, first copy them into
    one stack), the sort and residual, the reduction; backward (``with_backward``): the
    views' gradient in one ``_project_backward_kernel`` (the residual rounded, times the
    loss's gradient, in the views' dtype). Program counts come from the launchers'
    configs; cuBLAS, torch.sort and torch's elementwise kernels count as filling every SM.
    sort_compiled: the compiled register sort's measure (``register_sort_cost``), or None.
    arch: the GPU's compute capability, for the projection's tiles and units (``matmul_unit``).
    """
    B, D, K = shape.B, shape.D, shape.K
    projection_path, sort_path = path
    dtype_bytes = dtype.itemsize
    if with_target_draw:
        costs = [KernelCost("rgg sampler + directions", 0, 0.0, "lanes", (targets * B * D + K * D) * dtype_bytes)]
    else:
        costs = direction_draw_costs(shape)
        if dtype_bytes != 4:
            costs.append(_elementwise("cast P", K * D, 4 + dtype_bytes))
    sources = views + targets
    if projection_path != "triton" or targets != 1 or sources > kernels.MAX_SOURCE_POINTERS:
        costs.append(_elementwise("stack the sources", sources * B * D, 2 * dtype_bytes))
    unit = matmul_unit(dtype, allow_tf32, arch, triton_dot=projection_path == "triton")
    if projection_path == "triton":
        programs = project_programs(sources, shape, dtype, allow_tf32, arch)
        costs.append(projection_cost("_project_kernel", sources, B, D, K, dtype_bytes, allow_tf32, programs, unit))
    else:
        costs.append(projection_cost("cuBLAS", sources, B, D, K, dtype_bytes, allow_tf32, 0, unit))
    if sort_path == "registers":
        programs = triton.cdiv(K, kernels.sort_config(B, K, need_target_residual)["ROWS"])
        costs.append(register_sort_cost(views, targets, B, K, programs, need_target_residual, sort_compiled))
    else:
        cfg = kernels.residual_config(B, K)
        programs = triton.cdiv(K, cfg["BLOCK_K"]) * triton.cdiv(B, cfg["BLOCK_B"])
        costs += torch_sort_costs(views, targets, B, K, programs, need_target_residual)
    costs.append(mean_cost())
    if with_backward:
        cfg = kernels.project_backward_config(views, B, D, K, dtype, allow_tf32, arch)
        programs = views * triton.cdiv(B, cfg["BLOCK_B"]) * triton.cdiv(D, cfg["BLOCK_D"])
        costs.append(backward_cost(views, B, D, K, dtype_bytes, allow_tf32, matmul_unit(dtype, allow_tf32, arch,
                                                                                      triton_dot=True), programs))
    return costs


def total_bound_us(costs, gpu):
    """(roofline bound in microseconds, launches, launch floor in microseconds) of a kernel sequence."""
    bound = sum(kernel_bound_us(cost, gpu) for cost in costs)
    return bound, len(costs), len(costs) * LAUNCH_US


def host_plan_us(shape, path=("triton", "registers"), *, dtype=torch.bfloat16, allow_tf32=False, views=2,
                 device="meta", repeats=200):
    """Median host time, in microseconds, of building one loss step's launch plans, measured here and now.

    The plans the Triton backend builds per step: the draw of the target and the directions
    (``rgg_launch``), the projections of the views and the shared target (``project_plan``,
    three sources read where they lie), the sort and residual (``sort_residual_plan``) and
    the views' gradient (``project_backward_plan``), on ``device`` tensors of ``shape`` (the
    plans allocate their outputs; on ``meta`` that costs nothing, so this is the Python work
    alone). ``repeats`` rounds of all four, timed with ``time.perf_counter``.
    """
    from lpjepa.kernels.rgg_sample import rgg_launch

    projection_path, sort_path = path
    sources = tuple(torch.empty((shape.B, shape.D), dtype=dtype, device=device) for _ in range(views + 1))
    directions = torch.empty((shape.K, shape.D), dtype=dtype, device=device)
    proj = torch.empty((views, shape.K, shape.B), dtype=torch.float32, device=device)
    proj_t = torch.empty((1, shape.K, shape.B), dtype=torch.float32, device=device)
    scale = torch.empty((), dtype=torch.float32, device=device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        rgg_launch(sources[-1], p=1.0, mu=0.0, sigma=1.0, seed=12345, offset=0, directions=directions)
        kernels.project_plan(sources if len(sources) <= kernels.MAX_SOURCE_POINTERS else torch.stack(sources),
                             directions, path=projection_path, allow_tf32=allow_tf32)
        kernels.sort_residual_plan(proj, proj_t, path=sort_path)
        kernels.project_backward_plan(proj, directions, scale, out_dtype=dtype, allow_tf32=allow_tf32)
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


class StepBound(NamedTuple):
    """A step's lower bound: the GPU's (the kernels in sequence) and the host's (plans + launches)."""

    gpu_us: float
    host_us: float
    launches: int

    @property
    def step_us(self):
        """The host must issue everything the GPU runs: the larger of the two."""
        return max(self.gpu_us, self.host_us)


def step_bound_us(costs, gpu, plan_us):
    """StepBound of a kernel sequence: host time = ``plan_us`` (``host_plan_us``) + launches x ``LAUNCH_US``."""
    bound, launches, launch_floor = total_bound_us(costs, gpu)
    return StepBound(bound, plan_us + launch_floor, launches)
