"""Fused kernel against fallback for the Triton sliced-Wasserstein forward: the data for FUSED_MAX_BATCH.

``lpjepa.kernels.sliced_wasserstein`` runs batches of up to ``FUSED_MAX_BATCH`` rows through its fused
kernel: one program per 16 directions, so few programs when K is small. Larger batches
take the fallback: cuBLAS projections, ``torch.sort``, and the Triton residual kernel.
This script times ``swd_forward`` on both paths over a grid of batch sizes and numbers of
directions. It prints a Markdown table and, for each K, the largest batch size up to which
the fused path wins at every tested size. That is the threshold to put in
``FUSED_MAX_BATCH``, or to make depend on K.

    python -m benchmarks.swd_paths                          # CUDA; about a minute, most of it compiling
    python -m benchmarks.swd_paths --out bench_out/paths    # also writes paths.json and paths.md
    python -m benchmarks.swd_paths --device cpu --batches 8,20 --projections 16 --dim 8 --reps 1 --rounds 1
                                                            # Triton's interpreter: checks the script, not speed

Times come from CUDA events around ``--reps`` back-to-back calls. The two paths alternate
round by round, and the table gives the median over ``--rounds``.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cuda (default), or cpu for Triton's interpreter (a smoke run, not a timing)")
    parser.add_argument("--batches", default="64,128,256,512,1024,2048",
                        help="batch sizes B, comma-separated, each at most the fused kernel's limit (2048)")
    parser.add_argument("--projections", default="256,1024,8192", help="numbers of directions K, comma-separated")
    parser.add_argument("--dim", type=int, default=512, help="feature dimension D (default 512, the seed's)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--reps", type=int, default=20, help="calls per timed round (default 20)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per path (default 7)")
    parser.add_argument("--out", help="folder for paths.json and paths.md (default: print only)")
    args = parser.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
        args.projections = [int(k) for k in args.projections.split(",")]
    except ValueError:
        parser.error("--batches and --projections take comma-separated integers, e.g. --batches 256,1024")
    if min(args.batches) < 2 or min(args.projections) < 1 or args.dim < 1:
        parser.error("every batch size must be >= 2, every K >= 1 and --dim >= 1")
    if args.reps < 1 or args.rounds < 1:
        parser.error("--reps and --rounds must be >= 1")
    return args


def _time_ms(run, reps, device):
    """Milliseconds per call of ``run`` over ``reps`` back-to-back calls."""
    import torch

    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        run()
    return (time.perf_counter() - t0) * 1e3 / reps


def measure(args, log=print):
    """One row per (B, K): the medians of both paths, in ms, and their ratio."""
    import torch

    from lpjepa.kernels import sliced_wasserstein as swd

    dtype = getattr(torch, args.dtype)
    too_big = [b for b in args.batches if b > swd.FUSED_MAX_BATCH]
    if too_big:
        raise SystemExit(f"--batches {too_big} exceed what the fused kernel sorts (FUSED_MAX_BATCH = {swd.FUSED_MAX_BATCH})")
    generator = torch.Generator().manual_seed(0)
    limits = {"fused": swd.FUSED_MAX_BATCH, "fallback": 0}
    rows = []
    for K in args.projections:
        for B in args.batches:
            z = torch.randn(B, args.dim, generator=generator).relu_().to(args.device, dtype)
            target = torch.rand(B, args.dim, generator=generator).to(args.device, dtype)
            P = torch.nn.functional.normalize(torch.randn(K, args.dim, generator=generator), dim=1).to(args.device)
            times = {"fused": [], "fallback": []}

            def call(path):
                swd.swd_forward(z, target, P, fused_max_batch=limits[path])

            for path in times:  # warm: compiles each path's kernels once
                call(path)
                call(path)
            for round_ in range(args.rounds):
                order = ("fused", "fallback") if round_ % 2 == 0 else ("fallback", "fused")
                for path in order:
                    times[path].append(_time_ms(lambda: call(path), args.reps, args.device))
            fused, fallback = (statistics.median(times[p]) for p in ("fused", "fallback"))
            rows.append(dict(B=B, K=K, D=args.dim, dtype=args.dtype, fused_ms=fused, fallback_ms=fallback,
                             fused_over_fallback=fused / fallback))
            log(f"B={B} K={K}: fused {fused:.4g} ms, fallback {fallback:.4g} ms", flush=True)
    return rows


def thresholds(rows):
    """{K: the largest tested B such that the fused path wins at every tested B <= it (0: never)}."""
    best = {}
    for K in sorted({r["K"] for r in rows}):
        limit = 0
        for row in sorted((r for r in rows if r["K"] == K), key=lambda r: r["B"]):
            if row["fused_ms"] >= row["fallback_ms"]:
                break
            limit = row["B"]
        best[K] = limit
    return best


def markdown(rows, device_name):
    lines = [
        f"Fused vs fallback, `swd_forward` on {device_name} (median ms per call):",
        "",
        "| B | K | D | dtype | fused ms | fallback ms | fused / fallback |",
        "|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['B']} | {r['K']} | {r['D']} | {r['dtype']} | {r['fused_ms']:.4g} | "
                     f"{r['fallback_ms']:.4g} | {r['fused_over_fallback']:.2f}x |")
    lines.append("")
    for K, limit in thresholds(rows).items():
        verdict = f"fused wins up to B = {limit}" if limit else "the fallback wins at every tested B"
        lines.append(f"- K = {K}: {verdict}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cpu":
        # The interpreter is chosen when Triton is first imported, so before lpjepa.kernels.
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("swd_paths: torch sees no CUDA device; --device cpu runs Triton's interpreter (no timing)")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "the CPU (Triton's interpreter)"
    rows = measure(args, log=lambda *a, **k: print(*a, file=sys.stderr, **k))
    table = markdown(rows, device_name)
    print(table, end="")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "paths.json").write_text(json.dumps(dict(device=device_name, rows=rows,
                                                        thresholds=thresholds(rows)), indent=2))
        (out / "paths.md").write_text(table)


if __name__ == "__main__":
    main()
