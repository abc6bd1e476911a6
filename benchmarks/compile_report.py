"""Compile every kernel for sm_75 to sm_120 and report registers, spills, shared memory and tensor-core use.

Usage::

    python -m benchmarks.compile_report [--arch 75 80 86 89 90 100 120] [--quick] [--model]

No GPU is needed: Triton compiles for a ``GPUTarget`` without one. The launches are
the ones the launchers really make: ``rgg_launch``, ``project_plan``, ``project_backward_plan`` and
``sort_residual_plan`` are called on ``meta``-device tensors, and every launch is
specialised the way Triton's JIT would specialise it (argument types, ``== 1``
constants, 16-byte divisibility) before being compiled. Shapes: B in {256, 1024, 4096,
``register_sort_max_batch()``}, D in {512, 2048}, K in {256, 8192}, fp32 (IEEE and TF32), fp16
and bf16 inputs, two views against a shared target, with and without the target residual.
The sampler also draws the loss's directions in the same launch (p = 1, K directions of D and of
``DIRECTIONS_CHUNKED_DIM``, the chunked path).
``--quick``: B in {256, 4096}, D = 512, K = 256, fp32 IEEE and bf16, the Gamma sampler only
(and the p = 1 draw with directions).
The launches are built for each architecture (``project_plan(arch=...)``: its tiles), by
default every one of ``ARCHES`` that this Triton's ptxas compiles for (Turing T4 to
Blackwell B200 and RTX 50xx).

One row per kernel, arch and shape: its tile (the projection's BLOCK_K x BLOCK_B x BLOCK_D,
the register sort's directions per program), warps, registers per thread, ptxas spill
stores / loads (bytes), stack frame and local memory (bytes, cuobjdump), static and
dynamic shared memory (bytes), and the tensor-core instructions in its SASS (``TENSOR_CORE_SASS``:
HMMA on sm_75 to sm_89 and sm_120, HGMMA on sm_90, UTC*MMA (tcgen05) on sm_100). Exits 1 on
any spill or local memory, or when static + dynamic shared memory is over the
architecture's per-block limit; 2 when cuobjdump is missing. ``--model`` adds the static
performance model of ``benchmarks.perf_model`` (a roofline lower bound per path).

The compile must not run under the Triton interpreter (``TRITON_INTERPRET=1`` turns
every ``@triton.jit`` into an interpreted function when the kernel modules are
imported), so the work always runs in a child process with that variable removed and
Triton's cache bypassed (a cached kernel would not run ptxas and print no log).
"""
import argparse
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Largest static + dynamic shared memory one block may use (opt-in), in bytes (CUDA C++
# Programming Guide, technical specifications per compute capability).
SHARED_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024,
                120: 99 * 1024}
ARCHES = tuple(SHARED_LIMIT)
# Tensor-core instructions in SASS: HMMA (mma.sync), HGMMA (Hopper's wgmma), and Blackwell's
# tcgen05.mma: UTCHMMA (fp16 / bf16 / tf32), UTCQMMA (fp8), UTCIMMA (int8), UTCOMMA (fp4).
TENSOR_CORE_SASS = re.compile(r"\b(?:HG?MMA|UTC[HQIO]MMA)\b")

REPORT_BATCHES = (256, 1024, 4096)  # plus the register sort's largest batch, register_sort_max_batch()
REPORT_DIMS = (512, 2048)
REPORT_PROJECTIONS = (256, 8192)
REPORT_VIEWS = 2
# The directions' D of the sampler's chunked path (rows longer than one chunk of DIRECTIONS_MAX_BLOCK).
DIRECTIONS_CHUNKED_DIM = 8192

_WORKER_FLAG = "--_worker"


def _cuobjdump():
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


def _report_cases(quick, arch):
    """(label, shape text, KernelLaunch) for every launch the report compiles for ``arch``, each specialisation once."""
    import torch

    from lpjepa.kernels.rgg_sample import rgg_launch
    from lpjepa.kernels.sliced_wasserstein import (
        project_backward_plan, project_plan, register_sort_max_batch, sort_paths_for, sort_residual_plan,
    )

    modes = ((torch.float32, False), (torch.bfloat16, False)) if quick else (
        (torch.float32, False), (torch.float32, True), (torch.float16, False), (torch.bfloat16, False)
    )
    batches = (256, 4096) if quick else sorted({*REPORT_BATCHES, register_sort_max_batch()})
    dims = (512,) if quick else REPORT_DIMS
    projection_counts = REPORT_PROJECTIONS[:1] if quick else REPORT_PROJECTIONS
    # (p, rectify): every method rectified, and the dense target (no ReLU) of the Gamma path.
    sampler_cases = ((1.5, True),) if quick else ((1.0, True), (2.0, True), (1.5, True), (1.5, False))
    seed, offset = 2**62 + 12345, 2**33  # 64-bit values: the JIT's i64 specialisation
    cases = []
    meta = dict(device="meta")
    for dtype, allow_tf32 in modes:
        dname = str(dtype).replace("torch.", "") + (" tf32" if allow_tf32 else "")
        for batch in batches:
            for dim in dims:
                if not allow_tf32:
                    for p, rectify in sampler_cases:
                        out = torch.empty((batch, dim), dtype=dtype, **meta)
                        launch = rgg_launch(out, p=p, mu=0.0, sigma=1.0, seed=seed, offset=offset, rectify=rectify)
                        target = "" if rectify else " dense"
                        cases.append((f"rgg p={p:g}{target}", f"B={batch} D={dim} {dname}", launch))
                    # The loss's draw: a (B, D) target and (K, D) directions in one launch; at D = 8192 the
                    # directions' rows are walked in chunks.
                    k = projection_counts[0]
                    for draw_dim in (dim, DIRECTIONS_CHUNKED_DIM) if batch == batches[0] else ():
                        out = torch.empty((batch, draw_dim), dtype=dtype, **meta)
                        directions = torch.empty((k, draw_dim), dtype=dtype, **meta)
                        launch = rgg_launch(out, p=1.0, mu=0.0, sigma=1.0, seed=seed, offset=offset,
                                            directions=directions)
                        cases.append(("rgg p=1 +directions", f"B={batch} D={draw_dim} K={k} {dname}", launch))
                for k in projection_counts:
                    views = torch.empty((REPORT_VIEWS, batch, dim), dtype=dtype, **meta)
                    directions = torch.empty((k, dim), dtype=dtype, **meta)
                    _, launches = project_plan(views, directions, allow_tf32=allow_tf32, arch=arch)
                    cases.append(("_project_kernel", f"B={batch} D={dim} K={k} {dname}", launches[0]))
                    # The loss's step: two views and the target read where they lie (3 source pointers).
                    separate = tuple(torch.empty((batch, dim), dtype=dtype, **meta) for _ in range(3))
                    _, launches = project_plan(separate, directions, allow_tf32=allow_tf32, arch=arch)
                    cases.append(("_project_kernel", f"B={batch} D={dim} K={k},3src {dname}", launches[0]))
                    # The views' gradient: the fp32 residual onto the directions, written in the views' dtype.
                    residual = torch.empty((REPORT_VIEWS, k, batch), dtype=torch.float32, **meta)
                    scale = torch.empty((), dtype=torch.float32, **meta)
                    _, launches = project_backward_plan(residual, directions, scale, out_dtype=dtype,
                                                        allow_tf32=allow_tf32, arch=arch)
                    cases.append(("_project_backward_kernel", f"B={batch} D={dim} K={k} {dname}", launches[0]))
        for batch in batches:
            for k in projection_counts:
                if allow_tf32 or dtype != torch.float32:
                    continue  # the sort reads fp32 projections whatever the features were
                proj = torch.empty((REPORT_VIEWS, k, batch), dtype=torch.float32, **meta)
                proj_t = torch.empty((1, k, batch), dtype=torch.float32, **meta)
                shape = f"V={REPORT_VIEWS} B={batch} K={k}"
                for need_target in (False, True):
                    suffix = " +target" if need_target else ""
                    for path in sort_paths_for(batch, need_target):
                        _, launches = sort_residual_plan(proj, proj_t, need_target_residual=need_target, path=path)
                        cases.append((launches[0].kernel.__name__ + suffix, shape, launches[0]))
                        if not need_target and path == "registers":
                            cases.append((launches[1].kernel.__name__, shape, launches[1]))
    return cases


def _specialise(launch, backend):
    """(signature, constexprs, attrs, options) exactly as Triton's JIT derives them at launch."""
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    kwargs = dict(launch.meta, debug=False)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def _compile_and_measure(launch, specialisation, target, cuobjdump, workdir):
    import triton

    signature, constexprs, attrs, options = specialisation
    src = triton.compiler.ASTSource(launch.kernel, signature, constexprs, attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=target, options=options.__dict__)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    if spills is None:
        raise RuntimeError(f"no ptxas log for {launch.kernel.__name__}:\n{log.getvalue()}")
    path = os.path.join(workdir, f"{compiled.metadata.hash}.cubin")
    with open(path, "wb") as f:
        f.write(compiled.asm["cubin"])
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True, check=True)
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage.stdout))
    sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
    return dict(
        mma=len(TENSOR_CORE_SASS.findall(sass)),
        regs=int(fields["REG"]),
        spill_st=int(spills.group(1)),
        spill_ld=int(spills.group(2)),
        stack=int(fields["STACK"]),
        local=int(fields["LOCAL"]),
        smem_static=int(fields["SHARED"]),
        smem_dynamic=int(compiled.metadata.shared),
        num_warps=compiled.metadata.num_warps,
        **_instruction_fields(sass),
    )


# SASS opcodes (before the first '.') by the pipe they issue to; anything else is "other".
# Integer ALU: add, compare, logic, select, shift, min / max, moves (the ALU pipe, not IMAD).
_SASS_CLASSES = {
    "int_alu": {"IADD3", "IADD", "IADD32I", "LOP3", "LOP", "LOP32I", "SHF", "SHL", "SHR", "ISETP", "ISET", "SEL",
                "PRMT", "LEA", "IABS", "IMNMX", "VIMNMX", "VIMNMX3", "VIADD", "VIADDMNMX", "SGXT", "BMSK", "POPC",
                "FLO", "BREV", "PLOP3", "P2R", "R2P", "MOV", "MOV32I", "ISCADD", "BFE", "BFI", "ICMP", "VABSDIFF",
                "VABSDIFF4", "CS2R"},
    "int_mul": {"IMAD", "IMAD32I", "IMUL", "IMUL32I", "IDP", "IDP4A", "IMADSP"},
    "fp32": {"FADD", "FADD32I", "FMUL", "FMUL32I", "FFMA", "FFMA32I", "FSETP", "FSET", "FMNMX", "FSEL", "FCHK",
             "FSWZADD", "FMNMX3", "FFMA2", "FADD2", "FMUL2"},
    "shuffle": {"SHFL"},
    "shared": {"LDS", "STS", "LDSM", "STSM", "ATOMS", "REDS"},
    "global": {"LDG", "STG", "LD", "ST", "LDL", "STL", "RED", "REDG", "ATOM", "ATOMG", "LDGSTS", "LDGDEPBAR"},
    "control": {"BRA", "BRX", "JMP", "JMX", "CALL", "RET", "EXIT", "BSSY", "BSYNC", "WARPSYNC", "BAR", "NANOSLEEP",
                "YIELD", "BPT", "BREAK", "KILL", "DEPBAR", "MEMBAR", "ERRBAR", "FENCE", "NOP", "PREEXIT", "VOTE"},
}
_SASS_CLASS_OF = {opcode: cls for cls, opcodes in _SASS_CLASSES.items() for opcode in opcodes}
# "  /*0a30*/   @!P1 ISETP.GT.U32.AND P0, PT, R3, R4, PT ;": address, optional predicate, opcode.
_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)[^;]*?(?:\s(0x[0-9a-f]+))?\s*;")


def sass_class(opcode):
    """The issue class (perf_model.ISSUE_CLASSES) of one SASS opcode, without its '.' modifiers."""
    base = opcode.split(".")[0]
    if base in _SASS_CLASS_OF:
        return _SASS_CLASS_OF[base]
    if base.startswith("U") or base in ("S2UR", "R2UR"):
        return "uniform"  # the uniform datapath: one per warp, through the scheduler
    return "other"


def sass_instruction_mix(sass):
    """Instructions per thread of the first kernel in ``cuobjdump -sass`` text, by issue class, split by loops.

    Returns dict(once={class: n}, loop={class: n}, loops=k, static=n): ``loop`` counts
    the instructions inside a loop body (between a backward branch and its target, once
    each), ``once`` the rest, ``loops`` the backward branches found. The dump ends at the
    branch to itself after the last EXIT (what follows is padding). A runtime loop's body
    runs its trip count times: the dynamic count is once + trips x loop (one loop) when no
    path inside is skipped.
    """
    rows = []  # (address, opcode, branch target or None)
    for line in sass.split("Function :", 2)[1 if "Function :" in sass else 0].splitlines():
        match = _SASS_LINE.match(line)
        if match is None:
            continue
        address, opcode, target = int(match.group(1), 16), match.group(2), match.group(3)
        target = int(target, 16) if target is not None and opcode in ("BRA", "JMP") else None
        if target == address:
            break  # the terminal self-branch
        rows.append((address, opcode, target))
    loops = [(target, address) for address, _, target in rows if target is not None and target < address]
    mix = dict(once={}, loop={}, loops=len(loops), static=len(rows))
    for address, opcode, _ in rows:
        part = mix["loop"] if any(start <= address <= end for start, end in loops) else mix["once"]
        cls = sass_class(opcode)
        part[cls] = part.get(cls, 0) + 1
    return mix


def _instruction_fields(sass):
    """The fields of the instruction mix added to a compiled kernel's measure."""
    return dict(mix=sass_instruction_mix(sass))


def report_problems(measure, arch):
    """What is wrong with one compiled kernel: [] or some of "SPILL", "SMEM>LIMIT"."""
    problems = []
    if measure["spill_st"] or measure["spill_ld"] or measure["local"]:
        problems.append("SPILL")
    if measure["smem_static"] + measure["smem_dynamic"] > SHARED_LIMIT[arch]:
        problems.append("SMEM>LIMIT")
    return problems


class _Compiler:
    """Compiles launches for one arch at a time, each distinct specialisation once."""

    def __init__(self, cuobjdump, workdir):
        self.cuobjdump, self.workdir = cuobjdump, workdir
        self.memo = {}

    def measure(self, launch, arch):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        target = GPUTarget("cuda", arch, 32)
        specialisation = _specialise(launch, make_backend(target))
        # Shapes that specialise alike compile to the same binary: compile it once.
        key = (arch, launch.kernel.__name__, repr(specialisation[:3]), repr(specialisation[3].__dict__))
        if key not in self.memo:
            self.memo[key] = _compile_and_measure(launch, specialisation, target, self.cuobjdump, self.workdir)
        return self.memo[key]


def _tile(launch):
    """The tile of a launch, as the report's rows show it: the projection's K x B x D block, the sort's rows."""
    meta = launch.meta
    if "BLOCK_D" in meta:  # both projections' tiles read K x B x D (the backward's reduction is over K)
        return f"{meta['BLOCK_K']}x{meta['BLOCK_B']}x{meta['BLOCK_D']}"
    if "ROWS" in meta:
        return f"rows={meta['ROWS']}"
    if "BLOCK_K" in meta and "BLOCK_B" in meta:
        return f"{meta['BLOCK_K']}x{meta['BLOCK_B']}"
    return "-"


def _resource_table(compiler, arches, quick):
    """Prints the resource row of every case; returns the number of failing rows."""
    header = (f"{'kernel':<34} {'arch':>6} {'shape':<30} {'tile':>11} {'warps':>5} {'regs':>4} {'spill st/ld':>11} "
              f"{'stack':>5} {'local':>5} {'smem static+dyn':>15} {'mma':>4}  verdict")
    print(header)
    print("-" * len(header))
    failures = rows = 0
    for arch in arches:
        for label, shape, launch in _report_cases(quick, arch):
            m = compiler.measure(launch, arch)
            problems = report_problems(m, arch)
            failures += bool(problems)
            rows += 1
            print(f"{label:<34} {'sm_' + str(arch):>6} {shape:<30} {_tile(launch):>11} {m['num_warps']:>5} "
                  f"{m['regs']:>4} {m['spill_st']:>5}/{m['spill_ld']:<5} {m['stack']:>5} {m['local']:>5} "
                  f"{m['smem_static']:>6}+{m['smem_dynamic']:<8} {m['mma']:>4}  {' '.join(problems) or 'ok'}", flush=True)
    print(f"{rows} rows, {failures} failing; "
          f"shared limits: " + ", ".join(f"sm_{a} {SHARED_LIMIT[a]} B" for a in arches))
    return failures


def supported_arches(arches=ARCHES):
    """The architectures of ``arches`` this Triton's ptxas compiles for (a one-line kernel tried on each)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    @triton.jit
    def _probe(out_ptr):
        tl.store(out_ptr, 1.0)

    supported = []
    for arch in arches:
        try:
            triton.compile(triton.compiler.ASTSource(_probe, {"out_ptr": "*fp32"}, {}), target=GPUTarget("cuda", arch, 32))
        except Exception:  # this ptxas (or Triton's backend) does not know the architecture
            continue
        supported.append(arch)
    return supported


def _model_launches(shape, dtype, allow_tf32, arch, views=REPORT_VIEWS):
    """{kernel name: the KernelLaunch the launchers make for ``arch``} at ``shape``, on meta tensors (both sort paths)."""
    import torch

    from lpjepa.kernels.sliced_wasserstein import project_plan, sort_paths_for, sort_residual_plan

    meta = dict(device="meta")
    x = torch.empty((views, shape.B, shape.D), dtype=dtype, **meta)
    directions = torch.empty((shape.K, shape.D), dtype=dtype, **meta)
    launches = {"_project_kernel": project_plan(x, directions, allow_tf32=allow_tf32, arch=arch)[1][0]}
    proj = torch.empty((views, shape.K, shape.B), **meta)
    proj_t = torch.empty((1, shape.K, shape.B), **meta)
    for path in sort_paths_for(shape.B):
        main, mean = sort_residual_plan(proj, proj_t, path=path)[1]
        launches[main.kernel.__name__] = main
        launches[mean.kernel.__name__] = mean
    return launches


def _model_kernel_row(prefix, cost, launches, compiler, gpu):
    """One kernel's row of the model: issue source, instructions, scheduler share, residency, waves, bound."""
    from . import perf_model as pm

    resident = waves = mma = "-"
    if cost.name in launches:
        m = compiler.measure(launches[cost.name], gpu.arch)
        res = pm.residency(m["regs"], m["num_warps"], m["smem_static"] + m["smem_dynamic"], gpu)
        resident, mma = res, m["mma"]
        waves = -(-cost.programs // max(1, gpu.sms * res))
    instructions = f"{sum(cost.instructions.values()) / 1e9:.3f}" if cost.instructions else "-"
    return (f"{prefix} {cost.name:<26} {cost.source or '-':>7} {instructions:>7} "
            f"{pm.scheduler_fraction(cost, gpu):>5.2f} {cost.programs or '-':>8} {resident:>6} {waves:>5} {mma:>4} "
            f"{cost.flops / 1e9:>8.3f} {cost.dram_bytes / 1e6:>8.2f} {pm.kernel_bound_us(cost, gpu):>9.2f}")


def _model_total_row(prefix, label, step):
    """A path's total: the GPU bound, the host time (plans + launches) and the step's bound, their max."""
    return (f"{prefix} {label:<26} {step.launches:>8} launches: GPU bound {step.gpu_us:.2f} us, host >= "
            f"{step.host_us:.1f} us, step >= {step.step_us:.2f} us")


def _model_report(compiler, dtype_names):
    """Prints the static performance model (benchmarks.perf_model) for the GPUs of ``perf_model.MODEL_GPUS``.

    The register sort's instructions come from its compiled SASS (``sass_instruction_mix``)
    for each GPU's arch; the host time of the plans is measured here, on meta tensors.
    """
    import torch

    from . import perf_model as pm
    from lpjepa.kernels.sliced_wasserstein import PROJECTION_PATHS, sort_paths_for

    modes = {"bf16": (torch.bfloat16, False), "fp32-tf32": (torch.float32, True), "fp32": (torch.float32, False)}
    print("\nStatic performance model: a roofline LOWER BOUND per path (datasheet peaks), not a measurement.")
    print("The whole regularizer step on both sides: the target and the directions drawn, two views against one")
    print("shared target, forward and backward (elementwise kernels charged their memory traffic alone).")
    print("issue: where the sort's instructions come from (sass: its compiled mix, the views' loop x V; formula:")
    print("bitonic steps); Ginst: lane instructions (1e9); sched: share of the 4 warp schedulers kept busy.")
    print(f"Host: the plans of one loss call built on this machine (meta tensors, median) + {pm.LAUNCH_US:g} us a launch;")
    print("a step takes at least the larger of the GPU bound and the host time.\n")
    print(f"{'gpu':<10} {'shape':<9} {'mode':<10} {'path':<22} {'kernel':<26} {'issue':>7} {'Ginst':>7} {'sched':>5} "
          f"{'programs':>8} {'res/SM':>6} {'waves':>5} {'mma':>4} {'GFLOP':>8} {'MB':>8} {'bound us':>9}")
    plan_us = {}
    for gpu in (pm.GPUS[key] for key in pm.MODEL_GPUS):
        for shape in pm.MODEL_SHAPES:
            for mode in dtype_names:
                dtype, allow_tf32 = modes[mode]
                launches = _model_launches(shape, dtype, allow_tf32, gpu.arch)
                sort = launches.get("_sort_residual_kernel")
                sort_compiled = compiler.measure(sort, gpu.arch) if sort is not None else None
                for path in ((p, s) for p in PROJECTION_PATHS for s in sort_paths_for(shape.B)):
                    costs = pm.path_costs(shape, path, dtype=dtype, allow_tf32=allow_tf32, sort_compiled=sort_compiled,
                                          arch=gpu.arch)
                    prefix = f"{gpu.name[:10]:<10} {shape.name:<9} {mode:<10} {'/'.join(path):<22}"
                    for cost in costs:
                        print(_model_kernel_row(prefix, cost, launches, compiler, gpu))
                    key = (shape, mode, path)
                    if key not in plan_us:
                        plan_us[key] = pm.host_plan_us(shape, path, dtype=dtype, allow_tf32=allow_tf32)
                    print(_model_total_row(prefix, "= path total", pm.step_bound_us(costs, gpu, plan_us[key])),
                          flush=True)
            prefix = f"{gpu.name[:10]:<10} {shape.name:<9} {'fp16 amp':<10} {'seed sequence':<22}"
            print(_model_total_row(prefix, "= total", pm.step_bound_us(pm.seed_costs(shape), gpu, 0.0)), flush=True)


def _run_worker(arches, quick, model):
    from triton import knobs

    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        print("cuobjdump not found (neither bundled with Triton nor on PATH)", file=sys.stderr)
        return 2
    knobs.compilation.always_compile = True
    if arches is None:
        arches = supported_arches()
        skipped = [a for a in ARCHES if a not in arches]
        if skipped:
            print("this Triton cannot compile for " + ", ".join(f"sm_{a}" for a in skipped) + "; skipped")
    knobs.nvidia.dump_ptxas_log = True
    with tempfile.TemporaryDirectory() as workdir:
        compiler = _Compiler(cuobjdump, workdir)
        failures = _resource_table(compiler, arches, quick)
        if model:
            _model_report(compiler, ("bf16",) if quick else ("bf16", "fp32-tf32", "fp32"))
    return 1 if failures else 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_report", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=None, choices=ARCHES,
                        help="compute capabilities to compile for (default: every one this Triton supports)")
    parser.add_argument("--quick", action="store_true", help="a small subset, for CI")
    parser.add_argument("--model", action="store_true", help="add the static performance model (H100, A100, H200)")
    parser.add_argument(_WORKER_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        return _run_worker(args.arch, args.quick, args.model)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = [sys.executable, "-m", "benchmarks.compile_report", _WORKER_FLAG, *[a for a in argv if a != _WORKER_FLAG]]
    # benchmarks is a folder of the checkout, not an installed package: the child runs from its root.
    return subprocess.run(child, env=env, cwd=Path(__file__).resolve().parents[1]).returncode


if __name__ == "__main__":
    sys.exit(main())
