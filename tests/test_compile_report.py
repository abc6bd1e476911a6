"""The compile report: every kernel compiles for sm_75 to sm_120 without spills, with tensor cores where they exist.

The test process runs under TRITON_INTERPRET=1 (no GPU); the report must drop it for
its own compile, which this test exercises by launching it from here as is.
"""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from benchmarks.compile_report import ARCHES, SHARED_LIMIT, TENSOR_CORE_SASS, _cuobjdump, report_problems
from benchmarks.perf_model import MODEL_GPUS

CLEAN = dict(regs=64, spill_st=0, spill_ld=0, stack=0, local=0, smem_static=0, smem_dynamic=4096)


# The quick subset CI compiles: Turing, Ampere, Hopper and Blackwell (the full report: all of ARCHES).
QUICK_ARCHES = (75, 80, 90, 100)


@pytest.mark.skipif(_cuobjdump() is None, reason="cuobjdump (bundled with Triton's NVIDIA backend) is missing")
def test_quick_report_compiles_every_kernel_cleanly_and_models_the_paths():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.compile_report", "--quick", "--model",
         "--arch", *map(str, QUICK_ARCHES)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if " sm_" in line and not line[0].isdigit()]
    kernels = ("rgg p=1.5", "_project_kernel", "_project_backward_kernel", "_sort_residual_kernel", "_residual_kernel",
               "_mean_of_partials_kernel")
    for kernel in kernels:
        for arch in QUICK_ARCHES:
            assert any(row.startswith(kernel) and f" sm_{arch} " in row for row in rows), (kernel, arch, result.stdout)
    assert all(row.rstrip().endswith("ok") for row in rows), result.stdout
    assert "0 failing" in result.stdout
    # bf16 projections: tensor-core instructions from sm_80 on (HMMA, HGMMA, Blackwell's UTCHMMA), none on
    # sm_75, where Triton's tl.dot runs on the FMA units and the launcher takes the 64 x 64 x 16 FMA tile.
    for arch in QUICK_ARCHES:
        bf16 = [row.split() for row in rows if row.startswith("_project_kernel") and f" sm_{arch} " in row
                and "bfloat16" in row]
        assert bf16, (arch, result.stdout)
        assert all((int(fields[-2]) > 0) == (arch >= 80) for fields in bf16), (arch, bf16)
        # From sm_80 the tile is 64 x 64 x 64, or 128 x 128 x 64 where that still fills half an H100's SMs.
        tiles = {"64x64x16"} if arch < 80 else {"64x64x64", "128x128x64"}
        assert all(fields[6] in tiles for fields in bf16), (arch, bf16)
        # The views' gradient likewise: the residual rounded to bf16 goes to the tensor cores from sm_80.
        backward = [row.split() for row in rows if row.startswith("_project_backward_kernel") and f" sm_{arch} " in row
                    and "bfloat16" in row]
        assert backward and all((int(fields[-2]) > 0) == (arch >= 80) for fields in backward), (arch, backward)
    model = result.stdout.split("Static performance model")[1].splitlines()
    # bf16 projections run on the tensor cores: HMMA / HGMMA in the SASS of both GPUs.
    for gpu in ("H100", "A100"):
        projections = [line.split() for line in model if line.startswith(gpu) and "_project_kernel" in line]
        assert projections and all(int(fields[-4]) > 0 for fields in projections), projections
        # The seed's shape already spreads its sorts over more programs than an H100 has SMs.
        sorts = [line.split() for line in model if line.startswith(gpu) and " seed " in line
                 and "_sort_residual_kernel" in line]
        assert sorts and all(int(fields[-7]) >= 132 for fields in sorts), sorts
        assert any(line.startswith(gpu) and "seed sequence" in line for line in model)
        # The register sort is charged its compiled instruction mix, and every path total its host time too.
        assert all(fields[-10] == "sass" for fields in sorts), sorts
    totals = [line for line in model if "= path total" in line]
    assert len(totals) == len(MODEL_GPUS) * 3 * 4  # GPUs x shapes x paths
    assert all("GPU bound" in line and "host >=" in line and "step >=" in line for line in totals), totals


def test_tensor_core_instructions_are_counted_on_every_architecture():
    sass = """
        /*0100*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0110*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*0120*/              @P0  UTCHMMA gdesc[UR16], gdesc[UR18], tmem[UR6], tmem[UR20], idesc[UR21], UPT ;
        /*0130*/                   UTCQMMA gdesc[UR16], gdesc[UR18], tmem[UR6], idesc[UR21], UPT ;
        /*0140*/                   UTCBAR [UR4], URZ ;
        /*0150*/                   FFMA R7, R6, R6, R7 ;
        /*0160*/                   UTCATOMSWS.AND URZ, UR4 ;
    """
    assert TENSOR_CORE_SASS.findall(sass) == ["HMMA", "HGMMA", "UTCHMMA", "UTCQMMA"]


@pytest.mark.skipif(_cuobjdump() is None, reason="cuobjdump (bundled with Triton's NVIDIA backend) is missing")
def test_the_default_architectures_are_those_this_triton_compiles_for():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    probe = "from benchmarks.compile_report import supported_arches; print(supported_arches())"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    supported = eval(result.stdout.strip())
    assert set(supported) <= set(ARCHES) and {80, 90} <= set(supported), supported


def test_every_architecture_has_a_shared_memory_limit():
    assert ARCHES == (75, 80, 86, 89, 90, 100, 120)
    assert SHARED_LIMIT[75] == 64 * 1024 and SHARED_LIMIT[90] == SHARED_LIMIT[100] == 227 * 1024
    assert SHARED_LIMIT[86] == SHARED_LIMIT[89] == SHARED_LIMIT[120] == 99 * 1024


def test_report_problems_flags_spills_local_memory_and_shared_memory():
    assert report_problems(CLEAN, 80) == []
    assert report_problems(dict(CLEAN, spill_st=4), 90) == ["SPILL"]
    assert report_problems(dict(CLEAN, local=8), 90) == ["SPILL"]
    assert report_problems(dict(CLEAN, smem_dynamic=SHARED_LIMIT[80] + 1), 80) == ["SMEM>LIMIT"]
    # 200 KiB fits sm_90's 227 KiB but not sm_80's 163 KiB.
    big = dict(CLEAN, smem_static=1024, smem_dynamic=200 * 1024)
    assert report_problems(big, 90) == [] and report_problems(big, 80) == ["SMEM>LIMIT"]


def test_residency_follows_the_datasheet_rule():
    from benchmarks.perf_model import GPUS, residency

    h100 = GPUS["H100"]
    # 8 warps of 128 registers: 32768 registers a program, 2 fit in 65536.
    assert residency(128, 8, 0, h100) == 2
    # Registers are allocated per warp in 256s: 129 registers a thread count as 136.
    assert residency(129, 8, 0, h100) == 1
    # Shared memory, threads and the 32-block cap.
    assert residency(32, 4, 100 * 1024, h100) == 2
    assert residency(16, 16, 0, h100) == 4
    assert residency(16, 1, 0, h100) == 32


def test_bounds_scale_with_the_work():
    from benchmarks import perf_model as pm

    h100 = pm.GPUS["H100"]
    seed = pm.MODEL_SHAPES[0]
    official = pm.MODEL_SHAPES[1]
    cost = pm.projection_cost("p", 1, official.B, official.D, official.K, 2, False, programs=h100.sms)
    assert cost.flops == 2 * official.K * official.B * official.D
    # Compute-bound there: half the SMs busy, twice the bound.
    half = cost._replace(programs=h100.sms // 2)
    assert pm.kernel_bound_us(half, h100) == pytest.approx(2 * pm.kernel_bound_us(cost, h100))
    assert pm.bitonic_steps(8) == 8 * 3 * 4 / 2
    fwd = pm.path_costs(seed, ("triton", "registers"), with_backward=False)
    both = pm.path_costs(seed, ("triton", "registers"))
    assert pm.total_bound_us(both, h100)[0] > pm.total_bound_us(fwd, h100)[0]
    # path_costs' count (benchmarks/perf_model.py): one draw of the target and the directions, one projection of
    # the two views and the target, the sort-residual and the mean forward; one views' gradient kernel backward.
    assert [cost.name for cost in both] == ["rgg sampler + directions", "_project_kernel", "_sort_residual_kernel",
                                            "_mean_of_partials_kernel", "_project_backward_kernel"]
    assert pm.total_bound_us(fwd, h100)[1:] == (4, 4 * pm.LAUNCH_US)
    assert pm.total_bound_us(both, h100)[1:] == (5, 5 * pm.LAUNCH_US)
    # Given targets: the directions' torch draw (3 kernels) and their cast to bf16 come back; on the cuBLAS path,
    # or with a target per view, the sources are stacked first.
    given = pm.path_costs(seed, ("triton", "registers"), with_target_draw=False)
    assert pm.total_bound_us(given, h100)[1] == 5 - 1 + 3 + 1
    assert "stack the sources" in [c.name for c in pm.path_costs(seed, ("cublas", "registers"))]
    assert "stack the sources" in [c.name for c in pm.path_costs(seed, ("triton", "registers"), targets=2)]


# A hand-written dump in cuobjdump's format: 3 instructions before a loop of 5 (its
# backward branch included), 2 after, the terminal self-branch and padding.
SASS_SNIPPET = """
	code for sm_90a
		Function : _toy_kernel
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                    /* 0x00000a00ff017b82 */
                                                                             /* 0x000e220000000800 */
        /*0010*/                   IMAD.SHL.U32 R56, R0, 0x4, RZ ;           /* 0x0000000400387824 */
        /*0020*/              @!P1 BRA 0x90 ;                                /* 0x000000f8005c9947 */
        /*0030*/                   ISETP.GT.U32.AND P0, PT, R3, R4, PT ;     /* 0x000000040300720c */
        /*0040*/                   SEL R5, R3, R4, P0 ;                      /* 0x0000000403057207 */
        /*0050*/                   SHFL.BFLY PT, R6, R5, 0x1, 0x1f ;         /* 0x0c201f0005067f89 */
        /*0060*/                   FFMA R7, R6, R6, R7 ;                     /* 0x0000000606077223 */
        /*0070*/               @P3 BRA 0x30 ;                                /* 0xffffff0c00883947 */
        /*0080*/                   STG.E desc[UR4][R2.64], R7 ;              /* 0x0000000702007986 */
        /*0090*/                   EXIT ;                                    /* 0x000000000000794d */
        /*00a0*/                   BRA 0xa0;                                 /* 0xfffffffc00fc7947 */
        /*00b0*/                   NOP;                                      /* 0x0000000000007918 */
"""


def test_sass_instruction_mix_classifies_opcodes_and_splits_the_loop():
    from benchmarks.compile_report import sass_class, sass_instruction_mix
    from benchmarks.perf_model import ISSUE_CLASSES

    mix = sass_instruction_mix(SASS_SNIPPET)
    assert mix["loops"] == 1 and mix["static"] == 10  # the self-branch and the padding NOP are not code
    assert mix["loop"] == {"int_alu": 2, "shuffle": 1, "fp32": 1, "control": 1}
    assert mix["once"] == {"other": 1, "int_mul": 1, "control": 2, "global": 1}
    assert sass_class("LOP3.LUT") == sass_class("IADD3") == sass_class("VIMNMX.S32") == "int_alu"
    assert sass_class("ULDC.64") == "uniform" and sass_class("LDS.128") == "shared" and sass_class("MUFU.EX2") == "other"
    assert {sass_class(op) for op in ("FADD", "IMAD.WIDE", "BAR.SYNC", "LDG.E", "S2UR", "HMMA.16816")} <= set(ISSUE_CLASSES)


def _sort_measure(once, loop, loops=1, warps=16):
    return dict(mix=dict(once=once, loop=loop, loops=loops), num_warps=warps, regs=64, smem_static=0, smem_dynamic=0)


def test_register_sort_charges_its_sass_mix_once_plus_views_times_the_loop():
    from benchmarks import perf_model as pm

    h100, a100 = pm.GPUS["H100"], pm.GPUS["A100"]
    measure = _sort_measure({"int_alu": 100, "fp32": 10}, {"int_alu": 1000, "shuffle": 200})
    cost = pm.register_sort_cost(3, 1, 1024, 8192, 2048, False, measure)
    threads = 2048 * 16 * 32
    assert cost.source == "sass"
    assert cost.instructions == {"int_alu": 3100 * threads, "fp32": 10 * threads, "shuffle": 600 * threads}
    # Integer ALU ops are the bottleneck: 3100 per thread at 64 lanes a clock over the 132 SMs, at the boost clock.
    expected_us = 3100 * threads / h100.sms / 64 / (h100.clock_ghz * 1e3)
    assert pm.kernel_bound_us(cost._replace(dram_bytes=0), h100) == pytest.approx(expected_us)
    # Without a compiled mix, or with a loop structure the views' split does not fit: the bitonic formula.
    for fallback in (pm.register_sort_cost(3, 1, 1024, 8192, 2048, False),
                     pm.register_sort_cost(3, 1, 1024, 8192, 2048, False, _sort_measure({}, {}, loops=2))):
        assert fallback.source == "formula"
        assert fallback.instructions == {"int_alu": 8192 * pm.bitonic_steps(1024) * (2 + 3 * 4)}
    # The same integer work on an FP32 pipe issues twice as fast on an H100 (128 FP32 lanes, 64 INT32), alike on an A100.
    ints, floats = (pm.KernelCost("k", 1000, 0.0, "lanes", 0.0, {cls: 1e9}) for cls in ("int_alu", "fp32"))
    assert pm.kernel_bound_us(ints, h100) == pytest.approx(2 * pm.kernel_bound_us(floats, h100))
    assert pm.kernel_bound_us(ints, a100) == pytest.approx(pm.kernel_bound_us(floats, a100))


def test_one_warp_programs_leave_warp_schedulers_idle():
    from benchmarks import perf_model as pm

    h100 = pm.GPUS["H100"]
    work = {"int_alu": 1e9}
    # 264 programs: 2 per SM. One warp each keeps 2 of the 4 schedulers busy; 4 warps each, all 4.
    one_warp = pm.KernelCost("sort", 264, 0.0, "lanes", 0.0, work, warps=1, regs=64)
    four_warps = one_warp._replace(warps=4)
    assert pm.scheduler_fraction(one_warp, h100) == 0.5 and pm.scheduler_fraction(four_warps, h100) == 1.0
    assert pm.kernel_bound_us(one_warp, h100) == pytest.approx(2 * pm.kernel_bound_us(four_warps, h100))
    # Enough one-warp programs resident per SM fill the schedulers; registers can cap the residency.
    assert pm.scheduler_fraction(one_warp._replace(programs=132 * 8), h100) == 1.0
    greedy = pm.KernelCost("sort", 132 * 8, 0.0, "lanes", 0.0, work, warps=2, regs=255, smem=114 * 1024)
    assert pm.residency(255, 2, 114 * 1024, h100) == 2 and pm.scheduler_fraction(greedy, h100) == 1.0
    assert pm.scheduler_fraction(greedy._replace(warps=1, smem=200 * 1024), h100) == 0.25


def test_a_step_takes_at_least_its_host_time():
    from benchmarks import perf_model as pm

    h100 = pm.GPUS["H100"]
    seed, official = pm.MODEL_SHAPES[:2]
    plan_us = pm.host_plan_us(seed, repeats=5)
    assert 0 < plan_us < 1e5
    small = pm.step_bound_us(pm.path_costs(seed, ("triton", "registers")), h100, plan_us)
    assert small.launches == 5 and small.host_us == pytest.approx(plan_us + 5 * pm.LAUNCH_US)
    assert small.step_us == small.host_us > small.gpu_us  # the seed's shape is host-bound
    big = pm.step_bound_us(pm.path_costs(official, ("triton", "registers")), h100, plan_us)
    assert big.step_us == big.gpu_us > big.host_us
    assert pm.step_bound_us([], h100, 90.0).step_us == 90.0


def test_gpu_table_is_consistent_and_keeps_the_datasheet_figures():
    from benchmarks.perf_model import GPUS

    for gpu in GPUS.values():
        # The FP32 peak is SMs x FP32 lanes x 2 flops (an FMA) x the boost clock.
        assert gpu.fp32_tflops == pytest.approx(gpu.sms * gpu.fp32_lanes * 2 * gpu.clock_ghz / 1e3, rel=0.02), gpu
        assert gpu.fp16_tflops >= gpu.tf32_tflops >= gpu.fp32_tflops / 2 and gpu.source, gpu
    figures = lambda g: (g.arch, g.sms, g.fp32_tflops, g.tf32_tflops, g.fp16_tflops, g.hbm_tbps, g.smem_per_sm // 1024)
    assert figures(GPUS["A100"]) == (80, 108, 19.5, 156.0, 312.0, 2.04, 164)
    assert figures(GPUS["H100"]) == (90, 132, 66.9, 494.7, 989.4, 3.35, 228)
    assert figures(GPUS["H200"]) == (90, 132, 66.9, 494.7, 989.4, 4.8, 228)
    assert GPUS["H100"].int32_lanes * 2 == GPUS["H100"].fp32_lanes and GPUS["A100"].int32_lanes == GPUS["A100"].fp32_lanes


def _fake_device(patch, name, sms, major=9, minor=0):
    import torch

    props = SimpleNamespace(name=name, multi_processor_count=sms, major=major, minor=minor, regs_per_multiprocessor=65536,
                            shared_memory_per_multiprocessor=233472, max_threads_per_multi_processor=2048)
    patch.setattr(torch.cuda, "is_available", lambda: True)
    patch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    patch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)


def test_device_gpu_takes_the_figures_of_the_device_it_runs_on(patch):
    import torch

    from benchmarks.perf_model import GPUS, device_gpu

    _fake_device(patch, "NVIDIA H200", 132)
    assert device_gpu() is GPUS["H200"]
    _fake_device(patch, "NVIDIA H100 PCIe", 114)
    assert device_gpu() is GPUS["H100 PCIe"] and device_gpu().hbm_tbps == 2.0
    _fake_device(patch, "NVIDIA A100-SXM4-80GB", 108, 8, 0)
    assert device_gpu() is GPUS["A100"]
    # A MIG slice of an H100 SXM: its peaks scaled to the SMs it has.
    _fake_device(patch, "NVIDIA H100 80GB HBM3", 66)
    sliced = device_gpu()
    assert sliced.sms == 66 and sliced.fp16_tflops == pytest.approx(989.4 / 2) and "66 of 132" in sliced.name
    # An unknown sm_90 GPU with 100 SMs: the nearest known sm_90 by SM count (H100 PCIe, 114), scaled, and labelled.
    _fake_device(patch, "NVIDIA Future GPU", 100)
    unknown = device_gpu()
    assert unknown.name.startswith("unknown GPU NVIDIA Future GPU") and "H100 PCIe" in unknown.name
    assert unknown.sms == 100 and unknown.fp32_tflops == pytest.approx(51.2 * 100 / 114)
    assert unknown.smem_per_sm == 233472 and unknown.source.startswith("estimate")
    patch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="GPUS"):
        device_gpu()


_SPLIT_CHECK = """
import tempfile, torch
from triton import knobs
from benchmarks.compile_report import _Compiler, _cuobjdump
from lpjepa.kernels.sliced_wasserstein import sort_residual_plan
knobs.compilation.always_compile = True
knobs.nvidia.dump_ptxas_log = True
with tempfile.TemporaryDirectory() as workdir:
    compiler = _Compiler(_cuobjdump(), workdir)
    proj = torch.empty((2, 256, 256), device="meta")
    for targets in (1, 2):
        mix = compiler.measure(sort_residual_plan(proj, torch.empty((targets, 256, 256), device="meta"))[1][0], 90)["mix"]
        print("MIX", mix["loops"], sum(mix["once"].values()), sum(mix["loop"].values()))
"""


@pytest.mark.skipif(_cuobjdump() is None, reason="cuobjdump (bundled with Triton's NVIDIA backend) is missing")
def test_the_register_sort_sass_splits_at_the_loop_over_the_views():
    # A shared target is sorted once before the views' loop; one target per view is sorted inside it.
    # If the split is the views' loop, the target's sort moves from outside to inside, same size.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _SPLIT_CHECK], capture_output=True, text=True, timeout=300, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr
    (loops_1, once_1, loop_1), (loops_2, once_2, loop_2) = (
        [int(n) for n in line.split()[1:]] for line in result.stdout.splitlines() if line.startswith("MIX"))
    assert loops_1 == loops_2 == 1
    moved_out, moved_in = once_1 - once_2, loop_2 - loop_1
    assert moved_out > 0.3 * loop_1 and moved_in == pytest.approx(moved_out, rel=0.02), (once_1, loop_1, once_2, loop_2)
