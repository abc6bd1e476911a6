"""Compile every kernel for sm_80 / sm_90 and report registers, spills and shared memory.

Usage::

    python -m lpjepa.kernels.compile_report [--arch 80 90] [--quick]

No GPU is needed: Triton compiles for a ``GPUTarget`` without one. The launches are
the ones the launchers really make: ``rgg_launch`` and ``swd_forward_plan`` are called
on ``meta``-device tensors, and every launch is specialised the way Triton's JIT would
specialise it (argument types, ``== 1`` constants, 16-byte divisibility) before being
compiled. Shapes: B in {256, 1024, 4096}, D in {512, 2048}, K = 256, fp32 and bf16
inputs, with and without the target residual, plus B = ``FUSED_MAX_BATCH`` (the
largest fused batch). ``--quick``: B in {256, 4096} (fused and fallback), D = 512,
fp32, the Gamma sampler only.

One row per kernel, arch and shape: registers per thread, ptxas spill stores / loads
(bytes), stack frame and local memory (bytes, cuobjdump), static and dynamic shared
memory (bytes). Exits 1 on any spill or local memory, or when static + dynamic shared
memory is over the architecture's per-block limit; 2 when cuobjdump is missing.

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

# Largest static + dynamic shared memory one block may use (opt-in), in bytes.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

REPORT_BATCHES = (256, 1024, 4096)  # plus the fused path's threshold, FUSED_MAX_BATCH
REPORT_DIMS = (512, 2048)
REPORT_PROJECTIONS = 256

_WORKER_FLAG = "--_worker"


def _cuobjdump():
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


def _report_cases(quick):
    """(label, shape text, KernelLaunch) for every launch the report compiles."""
    import torch

    from lpjepa.kernels.rgg_sample import rgg_launch
    from lpjepa.kernels.sliced_wasserstein import FUSED_MAX_BATCH, swd_forward_plan

    dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16)
    batches = (256, 4096) if quick else sorted({*REPORT_BATCHES, FUSED_MAX_BATCH})
    dims = (512,) if quick else REPORT_DIMS
    sampler_ps = (1.5,) if quick else (1.0, 2.0, 1.5)
    seed, offset = 2**62 + 12345, 2**33  # 64-bit values: the JIT's i64 specialisation
    cases = []
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        for batch in batches:
            for dim in dims:
                shape = f"B={batch} D={dim} {dname}"
                for p in sampler_ps:
                    out = torch.empty((batch, dim), dtype=dtype, device="meta")
                    launch = rgg_launch(out, p=p, mu=0.0, sigma=1.0, seed=seed, offset=offset)
                    cases.append((f"rgg p={p:g}", shape, launch))
                z = torch.empty((batch, dim), dtype=dtype, device="meta")
                projections = torch.empty((REPORT_PROJECTIONS, dim), dtype=dtype, device="meta")
                for need_target in (False, True):
                    _, launches = swd_forward_plan(z, z, projections, need_target_residual=need_target)
                    suffix = " +target" if need_target else ""
                    for launch in launches:
                        if need_target and launch.kernel.__name__ == "_mean_of_partials_kernel":
                            continue  # the same launch as without the target residual
                        cases.append((launch.kernel.__name__ + suffix, f"{shape} K={REPORT_PROJECTIONS}", launch))
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
    return dict(
        regs=int(fields["REG"]),
        spill_st=int(spills.group(1)),
        spill_ld=int(spills.group(2)),
        stack=int(fields["STACK"]),
        local=int(fields["LOCAL"]),
        smem_static=int(fields["SHARED"]),
        smem_dynamic=int(compiled.metadata.shared),
        num_warps=compiled.metadata.num_warps,
    )


def report_problems(measure, arch):
    """What is wrong with one compiled kernel: [] or some of "SPILL", "SMEM>LIMIT"."""
    problems = []
    if measure["spill_st"] or measure["spill_ld"] or measure["local"]:
        problems.append("SPILL")
    if measure["smem_static"] + measure["smem_dynamic"] > SHARED_LIMIT[arch]:
        problems.append("SMEM>LIMIT")
    return problems


def _run_worker(arches, quick):
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        print("cuobjdump not found (neither bundled with Triton nor on PATH)", file=sys.stderr)
        return 2
    knobs.compilation.always_compile = True
    knobs.nvidia.dump_ptxas_log = True
    cases = _report_cases(quick)
    header = (f"{'kernel':<34} {'arch':>5} {'shape':<28} {'warps':>5} {'regs':>4} {'spill st/ld':>11} "
              f"{'stack':>5} {'local':>5} {'smem static+dyn':>15}  verdict")
    print(header)
    print("-" * len(header))
    failures = 0
    memo = {}
    with tempfile.TemporaryDirectory() as workdir:
        for arch in arches:
            target = GPUTarget("cuda", arch, 32)
            backend = make_backend(target)
            for label, shape, launch in cases:
                specialisation = _specialise(launch, backend)
                # Shapes that specialise alike compile to the same binary: compile it once.
                key = (arch, launch.kernel.__name__, repr(specialisation[:3]), repr(specialisation[3].__dict__))
                if key not in memo:
                    memo[key] = _compile_and_measure(launch, specialisation, target, cuobjdump, workdir)
                m = memo[key]
                problems = report_problems(m, arch)
                failures += bool(problems)
                print(f"{label:<34} {'sm_' + str(arch):>5} {shape:<28} {m['num_warps']:>5} {m['regs']:>4} "
                      f"{m['spill_st']:>5}/{m['spill_ld']:<5} {m['stack']:>5} {m['local']:>5} "
                      f"{m['smem_static']:>6}+{m['smem_dynamic']:<8}  {' '.join(problems) or 'ok'}", flush=True)
    print(f"{len(cases) * len(arches)} rows, {failures} failing; "
          f"shared limits: " + ", ".join(f"sm_{a} {SHARED_LIMIT[a]} B" for a in arches))
    return 1 if failures else 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m lpjepa.kernels.compile_report", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_LIMIT))
    parser.add_argument("--quick", action="store_true", help="a small subset, for CI")
    parser.add_argument(_WORKER_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        return _run_worker(args.arch, args.quick)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = [sys.executable, "-m", "lpjepa.kernels.compile_report", _WORKER_FLAG, *[a for a in argv if a != _WORKER_FLAG]]
    return subprocess.run(child, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
