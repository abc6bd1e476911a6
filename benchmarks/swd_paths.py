"""The Triton backend's paths timed at the benchmark shapes: fills the self-tuning cache and shows each beside its bound.

``lpjepa.ops.path_choice`` times the paths of each step (projection: 'triton' or
'cublas'; sort and residual: 'registers' or 'torch_sort') on the first CUDA call of a
shape and keeps the fastest in its cache file. This script makes those first calls
for the shapes a run meets (the benchmark shapes, one and two views, fp32 and bf16),
so later processes start with every decision made, and prints what was measured: the
median ms of every path, the one chosen, and the static model's lower bound for it
(``benchmarks.perf_model``, on the device's figures; the H100's on ``--device cpu``).
It measures afresh: the cache file then holds this sweep's decisions (other shapes are
measured again at their first call).

    python -m benchmarks.swd_paths                       # CUDA; a minute or two, most of it compiling
    python -m benchmarks.swd_paths --out bench_out/gpu   # also writes paths.json and paths.md
    python -m benchmarks.swd_paths --device cpu --shapes tiny --dtypes float32
                                                         # Triton's interpreter: checks the script, not speed

Paths are timed with CUDA events over back-to-back calls, alternating round by round
(the cache's own timer). On ``--device cpu`` a wall clock stands in, and nothing is
written to the user's cache unless ``LPJEPA_CACHE_DIR`` says where.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None):
    from benchmarks.cases import SHAPES

    parser = argparse.ArgumentParser(prog="python -m benchmarks.swd_paths", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cuda (default), or cpu for Triton's interpreter (a smoke run, not a timing)")
    parser.add_argument("--shapes", default="seed,official,large", help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, float16, bfloat16")
    parser.add_argument("--views", default="1,2", help="numbers of views, comma-separated (default 1,2)")
    parser.add_argument("--out", help="folder for paths.json and paths.md (default: print only)")
    args = parser.parse_args(argv)
    try:
        args.shapes = [SHAPES[name] for name in args.shapes.split(",")]
        args.views = [int(v) for v in args.views.split(",")]
    except (KeyError, ValueError):
        parser.error(f"--shapes takes names from {', '.join(SHAPES)}; --views takes integers, e.g. 1,2")
    args.dtypes = args.dtypes.split(",")
    if any(d not in ("float32", "float16", "bfloat16") for d in args.dtypes):
        parser.error("--dtypes takes float32, float16 and bfloat16")
    if min(args.views) < 1:
        parser.error("--views must be >= 1")
    return args


def _wall_clock_timer(run):
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3


def bound_gpu(device):
    """The GPU figures of the bound: the CUDA device's (``perf_model.device_gpu``), the H100's off CUDA."""
    from benchmarks import perf_model as pm

    return pm.device_gpu() if device == "cuda" else pm.GPUS["H100"]


def _bound_us(shape, step, path, dtype, allow_tf32, views, gpu):
    """The model's bound of one step on one path on ``gpu`` (a ``perf_model.GPU``), in microseconds."""
    from benchmarks import perf_model as pm

    model_shape = pm.Shape(shape.name, shape.B, shape.D, shape.K)
    if step == "projection":
        programs = pm.project_programs(views, model_shape, dtype, allow_tf32, gpu.arch) if path == "triton" else 0
        unit = pm.matmul_unit(dtype, allow_tf32, gpu.arch, triton_dot=path == "triton")
        cost = pm.projection_cost(path, views, shape.B, shape.D, shape.K, dtype.itemsize, allow_tf32, programs, unit)
        return pm.kernel_bound_us(cost, gpu)
    costs = pm.path_costs(model_shape, ("triton", path), dtype=dtype, allow_tf32=allow_tf32, views=views,
                          with_backward=False, with_target_draw=False, arch=gpu.arch)
    sort_kernels = ("_sort_residual_kernel", "torch.sort", "_residual_kernel", "_mean_of_partials_kernel")
    return pm.total_bound_us([c for c in costs if c.name in sort_kernels], gpu)[0]


def sweep(args, log=print):
    """One row per (shape, dtype, views, step, path): the measured median ms, whether chosen, the bound."""
    import torch

    from lpjepa.ops import path_choice
    from lpjepa.ops import sliced_wasserstein as op
    from lpjepa.ops.path_choice import CHOOSER

    if args.device != "cuda":
        CHOOSER.timer = _wall_clock_timer
    CHOOSER.forget()  # measure every path again, whatever an earlier run decided
    gpu = bound_gpu(args.device)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    generator = torch.Generator().manual_seed(0)
    rows = []
    for shape in args.shapes:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for views in args.views:
                x = torch.randn(views, shape.B, shape.D, generator=generator).relu_().to(args.device, dtype)
                target = torch.rand(1, shape.B, shape.D, generator=generator).to(args.device, dtype)
                P = torch.nn.functional.normalize(torch.randn(shape.K, shape.D, generator=generator), dim=1)
                P = P.to(args.device, dtype)
                # The op projects the views and the shared target in one launch (views + 1 sources).
                stacked = torch.cat([x, target])
                path_choice.projection_path(stacked, P, allow_tf32, timing_allowed=True)
                projected = op.triton_project(stacked, P, allow_tf32)
                path_choice.sort_path(projected[:views], projected[views:], False, timing_allowed=True)
                for key, medians in CHOOSER.measured.items():
                    step = key.split("|")[0]
                    sources = views + 1 if step == "projection" else views
                    what = "sort" if step == "sort" else "project views and target"
                    for path, ms in medians.items():
                        rows.append(dict(shape=shape.name, B=shape.B, D=shape.D, K=shape.K, dtype=dtype_name,
                                         views=views, step=what, path=path, ms=ms,
                                         chosen=path == CHOOSER.decisions[key],
                                         bound_us=_bound_us(shape, step, path, dtype, allow_tf32, sources, gpu),
                                         bound_gpu=gpu.name))
                log(f"{shape.name} {dtype_name} V={views}: " + ", ".join(
                    f"{key.split('|')[0]} {CHOOSER.decisions[key]}" for key in CHOOSER.measured), flush=True)
                CHOOSER.measured.clear()
    return rows


def markdown(rows, device_name, cache_file):
    figures = rows[0]["bound_gpu"] if rows else "no"
    lines = [
        f"Triton backend paths on {device_name} (median ms per call; bound: the static model's lower bound, "
        f"{figures} figures):",
        "",
        "| shape (B, D, K) | dtype | views | step | path | ms | bound ms | × bound | chosen |",
        "|---|---|---:|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        bound_ms = r["bound_us"] / 1e3
        lines.append(f"| {r['shape']} ({r['B']}, {r['D']}, {r['K']}) | {r['dtype']} | {r['views']} | {r['step']} | "
                     f"{r['path']} | {r['ms']:.4g} | {bound_ms:.3g} | {r['ms'] / bound_ms:.1f}× | "
                     f"{'yes' if r['chosen'] else ''} |")
    lines += ["", f"Decisions kept in {cache_file}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cpu":
        # The interpreter is chosen when Triton is first imported, so before lpjepa.kernels.
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ.setdefault("LPJEPA_CACHE_DIR", tempfile.mkdtemp(prefix="lpjepa-paths-"))
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("swd_paths: torch sees no CUDA device; --device cpu runs Triton's interpreter (no timing)")
    from lpjepa.ops.path_choice import cache_path

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "the CPU (Triton's interpreter)"
    rows = sweep(args, log=lambda *a, **k: print(*a, file=sys.stderr, **k))
    table = markdown(rows, device_name, cache_path())
    print(table, end="")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "paths.json").write_text(json.dumps(dict(device=device_name, rows=rows), indent=2))
        (out / "paths.md").write_text(table)


if __name__ == "__main__":
    main()
