"""One-command benchmark report: speed and memory of every provider against the seed's reference.

    python -m benchmarks.report [--device cpu|cuda] [--quick] [--out bench_out]

For each shape and operation it builds every provider (``benchmarks.cases``), times them
alternately in this one process, then measures each one's memory peak
(``benchmarks.measure``), and prints a Markdown table: median time, min-max, speedup
over the reference, peak memory and its ratio to the reference's (on CUDA also the
matmul floor, the static model's lower bound for the Triton backend's best path on the
figures of the GPU it runs on, and each time as a multiple of both). It writes
``table.md``, ``results.json`` and ``speedup.png`` to ``--out``.
"""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from . import cases as bench_cases
from . import measure

# The CPU targets of the benchmark issue: (operation, what is compared, threshold).
CPU_TARGETS = (
    ("step", "speedup", 3.0),
    ("forward_backward", "speedup", 1.5),
    ("sample", "speedup", 3.0),
    ("step", "memory_ratio", 0.6),
    ("forward_backward", "memory_ratio", 0.6),
)
TARGET_SHAPES = ("seed", "official")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and rounds (CPU: a few minutes)")
    parser.add_argument("--shapes", help=f"comma-separated, from {', '.join(bench_cases.SHAPES)}")
    parser.add_argument("--ops", help=f"comma-separated, from {', '.join(bench_cases.OPERATIONS)}")
    parser.add_argument("--providers", help=f"comma-separated, from {', '.join(bench_cases.PROVIDERS)}")
    parser.add_argument("--out", default="bench_out", help="folder for table.md, results.json, speedup.png")
    parser.add_argument("--min-rounds", type=int, default=None, help="timed rounds at least (default 5, --quick 3)")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timing per shape and operation")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--floor", action="store_true", help="also time the matmul floor off CUDA (always on CUDA)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    try:
        args.shapes = bench_cases.parse_list(args.shapes, bench_cases.SHAPES, "shape") if args.shapes else None
        args.ops = bench_cases.parse_list(args.ops, bench_cases.OPERATIONS, "operation") if args.ops else None
        args.providers = (
            bench_cases.parse_list(args.providers, bench_cases.PROVIDERS, "provider") if args.providers else None
        )
    except ValueError as error:
        parser.error(str(error))
    return args


def cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device):
    """What the numbers were measured on, as a dict and a one-line summary."""
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = round(os.getloadavg()[0], 2)  # other work sharing the machine
    where = info.get("gpu") or f"{info['cores']}-core {info['machine']} {info['cpu']}"
    line = (
        f"{where}; torch {info['torch']} ({info['torch_threads']} threads), "
        f"triton {info['triton']}, python {info['python']}"
    )
    if "load_average_1min" in info:
        line += f"; load average {info['load_average_1min']} at start"
    return info, line


def run(args, log=print):
    """Time and measure every case; returns (rows, notes)."""
    device = args.device
    shapes = args.shapes or bench_cases.default_shapes(device, args.quick)
    ops = args.ops or list(bench_cases.OPERATIONS)
    providers = args.providers or bench_cases.default_providers(device, args.quick)
    if "reference" not in providers:
        providers = ["reference"] + providers  # every speedup is over the reference
    min_rounds = args.min_rounds or (3 if args.quick else 5)
    budget = args.budget if args.budget is not None else (1.0 if args.quick else 3.0)
    with_floor = device == "cuda" or args.floor

    notes = []
    bound_gpu = None
    if device == "cuda":
        from benchmarks.perf_model import device_gpu

        bound_gpu = device_gpu()
        notes.append(f"Model bound: {bound_gpu.name}'s figures ({bound_gpu.source}).")
    for provider in bench_cases.PROVIDERS:
        reason = bench_cases.skip_reason(provider, device, args.quick) if provider not in providers else None
        if reason:
            notes.append(f"`{provider}` not run: {reason}.")
    rows, kept, skipped = [], [], {}
    for shape_name in shapes:
        shape = bench_cases.SHAPES[shape_name]
        for op in ops:
            built = {}
            for provider in providers:
                torch.manual_seed(0)
                try:
                    built[provider] = bench_cases.build(op, provider, shape, device)
                except bench_cases.Unavailable as why:
                    skipped.setdefault((provider, str(why)), []).append(f"{op} at {shape_name}")
            floor = bench_cases.floor_case(op, shape, device) if with_floor else None
            timed = dict(built, **({"matmul floor": floor} if floor else {}))
            times = measure.time_alternating(timed, min_rounds=min_rounds, budget_s=budget)
            floor_ms = measure.summary_ms(times.pop("matmul floor"))[0] if floor else None
            bound_ms = bench_cases.model_bound_ms(op, shape, gpu=bound_gpu) if bound_gpu else None
            group = []
            for provider, case in built.items():
                median, low, high = measure.summary_ms(times[provider])
                rows.append(
                    dict(
                        shape=shape_name, B=shape.B, D=shape.D, K=shape.K, op=op, provider=provider,
                        median_ms=median, min_ms=low, max_ms=high, rounds=len(times[provider]),
                        first_call_s=case.first_call_s, floor_ms=floor_ms, bound_ms=bound_ms,
                    )
                )
                kept.append((rows[-1], case))
                group.append(f"{provider} {median:.3g} ms")
            log(f"  timed {op:<16} at {shape}: " + ", ".join(group))
    for (provider, why), where in skipped.items():
        notes.append(f"`{provider}` skipped ({', '.join(where)}): {why}")

    # Memory after the timings: on CUDA here, on the CPU in a fresh process with glibc pinned (measure.py).
    if device == "cuda":
        for row, case in kept:
            row["peak_bytes"] = measure.peak_bytes(case)
        notes.append(measure.CUDA_METHOD + ".")
    else:
        log("  measuring CPU peak memory in a fresh process ...")
        memory = measure.cpu_peaks_in_fresh_process(
            [(row["op"], row["provider"], row["shape"]) for row, _ in kept], threads=torch.get_num_threads()
        )
        for (row, _), peak in zip(kept, memory["peaks"]):
            row["peak_bytes"] = peak
        if memory["check"] is None:
            notes.append("CPU peak memory not measured: it needs Linux's /proc/self/clear_refs.")
        else:
            notes.append(f"{measure.CPU_METHOD}; self-check: a 40.0 MB tensor reads {memory['check'] / 1e6:.1f} MB.")
    for row in rows:
        if row["provider"] == "compiled_reference":
            notes.append(
                f"torch.compile took {row['first_call_s']:.1f} s for {row['op']} at {row['shape']} "
                "(first call, not timed; less when inductor's on-disk cache is warm)."
            )
    _add_ratios(rows)
    return rows, notes


def _add_ratios(rows):
    reference = {(r["shape"], r["op"]): r for r in rows if r["provider"] == "reference"}
    for row in rows:
        ref = reference.get((row["shape"], row["op"]))
        row["speedup"] = ref["median_ms"] / row["median_ms"] if ref else None
        peak, ref_peak = row.get("peak_bytes"), ref and ref.get("peak_bytes")
        row["memory_ratio"] = peak / ref_peak if peak is not None and ref_peak else None
        row["x_floor"] = row["median_ms"] / row["floor_ms"] if row.get("floor_ms") else None
        row["x_bound"] = row["median_ms"] / row["bound_ms"] if row.get("bound_ms") else None


def _ms(value):
    return f"{value:.3g}" if value >= 1 else f"{value:.2g}"


def markdown_table(rows):
    with_floor = any(r.get("floor_ms") for r in rows)
    header = ["shape (B, D, K)", "operation", "provider", "median ms", "min–max ms", "speedup", "peak MB", "memory vs ref"]
    with_bound = any(r.get("bound_ms") for r in rows)
    if with_floor:
        header += ["matmul floor ms", "× floor"]
    if with_bound:
        header += ["model bound ms", "× bound"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|"]
    for r in rows:
        peak = r.get("peak_bytes")
        cells = [
            f"{r['shape']} ({r['B']}, {r['D']}, {r['K']})",
            bench_cases.OPERATIONS[r["op"]],
            r["provider"],
            _ms(r["median_ms"]),
            f"{_ms(r['min_ms'])}–{_ms(r['max_ms'])}",
            f"{r['speedup']:.2f}×" if r.get("speedup") else "–",
            f"{peak / 1e6:.1f}" if peak is not None else "n/a",
            f"{r['memory_ratio']:.2f}×" if r.get("memory_ratio") is not None else "–",
        ]
        if with_floor:
            cells += [_ms(r["floor_ms"]) if r.get("floor_ms") else "–", f"{r['x_floor']:.1f}×" if r.get("x_floor") else "–"]
        if with_bound:
            cells += [_ms(r["bound_ms"]) if r.get("bound_ms") else "–", f"{r['x_bound']:.1f}×" if r.get("x_bound") else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _verdict(met):
    return "met" if met else "MISSED"


def gpu_target_lines(rows):
    """The GPU targets: fwd + bwd >= 3x torch.compile of the seed, <= 1.5x the model's bound at the
    official shape, and never slower than the official recipe's provider."""
    found = {(r["shape"], r["op"], r["provider"]): r for r in rows}
    lines = []
    for (shape, op, provider), row in found.items():
        if provider != "triton":
            continue
        compiled = found.get((shape, op, "compiled_reference"))
        if op == "forward_backward" and compiled:
            ratio = compiled["median_ms"] / row["median_ms"]
            lines.append(f"- {_verdict(ratio >= 3.0)}: triton {bench_cases.OPERATIONS[op]} at {shape}: "
                         f"{ratio:.2f}x faster than torch.compile of the seed (>= 3x)")
        if op == "forward_backward" and shape == "official" and row.get("x_bound"):
            lines.append(f"- {_verdict(row['x_bound'] <= 1.5)}: triton {bench_cases.OPERATIONS[op]} at {shape}: "
                         f"{row['x_bound']:.2f}x the model's lower bound (<= 1.5x)")
        official = found.get((shape, op, "official"))
        if official:
            ratio = official["median_ms"] / row["median_ms"]
            lines.append(f"- {_verdict(ratio >= 1.0)}: triton {bench_cases.OPERATIONS[op]} at {shape}: "
                         f"{ratio:.2f}x the speed of the official recipe's provider (>= 1x)")
    return lines


def cpu_conditions():
    """What moves CPU timings, said beside a missed target: torch's threads, the cores, the 1-minute load average."""
    threads = torch.get_num_threads()
    text = f"{threads} torch thread{'s' if threads != 1 else ''} on {os.cpu_count()} cores"
    if hasattr(os, "getloadavg"):
        text += f", load average {os.getloadavg()[0]:.2f}"
    return text


# Said once after the CPU targets when one is missed: timings of a shared machine move with its load.
STABLE_FIGURES_ADVICE = (
    "a target missed on a loaded machine may be met on an idle one (the speedups move with the load): for "
    "stable figures run on an idle machine (load average well under the core count); --threads 1 helps "
    "under moderate load, not on an overloaded machine"
)


def target_lines(rows, device, conditions=None):
    """The issue's CPU targets, met or missed, for the torch backend at the seed's and official shapes.

    ``conditions``: the machine's state (``cpu_conditions()``), said beside each missed target and
    followed by the advice for stable figures.
    """
    if device != "cpu":
        return gpu_target_lines(rows)
    found = {(r["shape"], r["op"]): r for r in rows if r["provider"] == "torch"}
    lines = []
    for op, metric, threshold in CPU_TARGETS:
        for shape in TARGET_SHAPES:
            row = found.get((shape, op))
            if row is None or row.get(metric) is None:
                continue
            value = row[metric]
            if metric == "speedup":
                met, want = value >= threshold, f">= {threshold:g}x faster"
                miss = f", missed by {threshold / value:.2f}x" if not met else ""
            else:
                met, want = value <= threshold, f"<= {threshold:g}x the reference's peak memory"
                miss = f", missed by {value / threshold:.2f}x" if not met else ""
            verdict = _verdict(met)
            measured = f"; measured with {conditions}" if conditions and not met else ""
            lines.append(f"- {verdict}: torch {bench_cases.OPERATIONS[op]} at {shape}: {value:.2f}x ({want}{miss}{measured})")
    if conditions and any(line.startswith("- MISSED") for line in lines):
        lines.append(f"- {STABLE_FIGURES_ADVICE}")
    return lines


def plot(rows, path, title=""):
    """speedup.png: one panel per operation, bars per shape and provider, log scale, 1x line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ops = [op for op in bench_cases.OPERATIONS if any(r["op"] == op for r in rows)]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    providers = [p for p in bench_cases.PROVIDERS if p != "reference" and any(r["provider"] == p for r in rows)]
    fig, axes = plt.subplots(1, len(ops), figsize=(4.2 * len(ops), 3.8), squeeze=False)
    width = 0.8 / max(1, len(providers))
    for ax, op in zip(axes[0], ops):
        for i, provider in enumerate(providers):
            xs, ys = [], []
            for j, shape in enumerate(shapes):
                for r in rows:
                    if (r["op"], r["shape"], r["provider"]) == (op, shape, provider) and r.get("speedup"):
                        xs.append(j + (i - (len(providers) - 1) / 2) * width)
                        ys.append(r["speedup"])
            bars = ax.bar(xs, ys, width, label=provider)
            ax.bar_label(bars, fmt="%.1f×", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}×"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(range(len(shapes)), shapes)
        ax.set_title(bench_cases.OPERATIONS[op], fontsize=9)
        ax.set_ylabel("speedup over the reference")
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    info, machine_line = machine(args.device)
    command = "python -m benchmarks.report " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"# lpjepa benchmark on {args.device}\n", flush=True)
    start = time.perf_counter()
    rows, notes = run(args, log=lambda text: print(text, file=sys.stderr, flush=True))
    table = markdown_table(rows)
    # The load at the end of the run: the 1-minute average then covers the timings' last minute.
    targets = target_lines(rows, args.device, cpu_conditions() if args.device == "cpu" else None)
    text = [f"Machine: {machine_line}", f"Command: `{command.strip()}`", "", table, ""]
    if targets:
        title = "CPU targets (torch backend vs the seed's reference):" if args.device == "cpu" else "GPU targets:"
        text += [title, *targets, ""]
    text += ["Notes:", *[f"- {note}" for note in notes]]
    text = "\n".join(text) + "\n"

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    meta = dict(device=args.device, quick=args.quick, command=command.strip(), machine=info, notes=notes)
    (out / "results.json").write_text(json.dumps(dict(meta, rows=rows), indent=2) + "\n")
    written = [out / "table.md", out / "results.json"]
    try:
        plot(rows, out / "speedup.png", title=f"lpjepa vs the seed's reference: {machine_line}")
        written.append(out / "speedup.png")
    except ImportError as error:  # matplotlib is a dependency, but a bare GPU box may lack it
        print(f"No plot: {error}", file=sys.stderr)
    print(text)
    print(f"Wrote {', '.join(map(str, written))} in {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
