"""Timing providers alternately, and the memory peak of one call.

Time: each round calls every provider once, in an order rotated round by round, so a
machine that drifts (thermal, a neighbour) cannot favour one; medians are reported.

Memory, CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before.
Memory, CPU (Linux): growth of the resident set's high-water mark (VmHWM, reset through
/proc/self/clear_refs) above the resident set before the call. It runs in a fresh
process started with glibc's mmap threshold fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_), so
every buffer of 64 KiB or more is mapped when allocated and unmapped when freed: the
resident set then follows the live buffers, torch's and numpy's alike (torch's CPU
allocations are invisible to tracemalloc, and the torch profiler misses numpy's). In a
process that has run with glibc's default threshold, freed buffers linger in the heap and
reading varies by whole buffers from run to run. ``check_cpu_peak`` verifies the method
on a known 40 MB tensor.
"""
import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

CPU_METHOD = (
    "CPU peak memory = growth of the resident set's high-water mark during one call, measured in a "
    "fresh process whose glibc maps every buffer >= 64 KiB on its own (VmHWM reset via "
    "/proc/self/clear_refs; median of 3 calls); it counts torch's and numpy's buffers alike"
)
CUDA_METHOD = (
    "CUDA peak memory = torch.cuda.max_memory_allocated() during one call, above the memory allocated "
    "before it (median of 3 calls)"
)
# glibc reads these when the process starts; mallopt later cannot evict big chunks already in the heap.
PINNED_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "MALLOC_TRIM_THRESHOLD_": str(128 * 1024)}
ROOT = Path(__file__).resolve().parents[1]


def time_alternating(cases, *, min_rounds=5, max_rounds=200, budget_s=2.0, warmup_rounds=1):
    """{name: [seconds per call]} for ``cases`` ({name: Case}), called in rotating order.

    Runs ``warmup_rounds`` untimed rounds, then at least ``min_rounds`` timed rounds and
    more until ``budget_s`` seconds have passed (or ``max_rounds``).
    """
    names = list(cases)
    for _ in range(warmup_rounds):
        for name in names:
            cases[name].fn()
    times = {name: [] for name in names}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget_s):
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            case = cases[name]
            case.reset()
            t0 = time.perf_counter()
            case.fn()  # ends with a device synchronize on CUDA
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return times


def summary_ms(seconds):
    """Median, min and max in milliseconds of a list of seconds."""
    ms = [s * 1e3 for s in seconds]
    return statistics.median(ms), min(ms), max(ms)


def _status_bytes(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def cpu_peak_supported():
    return sys.platform.startswith("linux") and os.path.exists("/proc/self/clear_refs")


def cpu_peak_bytes(fn):
    """Peak bytes of resident memory ``fn()`` added (Linux; exact only under PINNED_MALLOC_ENV)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current resident set
    baseline = _status_bytes("VmRSS")
    fn()
    return max(0, _status_bytes("VmHWM") - baseline)


def cuda_peak_bytes(fn):
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - baseline


def peak_bytes(case, repeats=3):
    """Median over ``repeats`` calls of the peak memory one call of ``case`` adds on its device, or None."""
    if torch.device(case.device).type == "cuda":
        measure_once = cuda_peak_bytes
    elif cpu_peak_supported():
        measure_once = cpu_peak_bytes
    else:
        return None
    peaks = []
    for _ in range(repeats):
        case.reset()
        peaks.append(measure_once(case.fn))
    return statistics.median(peaks)


def check_cpu_peak(megabytes=40):
    """What ``cpu_peak_bytes`` reads for a function that allocates and fills ``megabytes`` MB (expect ~that)."""

    def allocate():
        buffer = torch.ones(megabytes * 250_000)  # float32: 4 bytes each
        del buffer

    return cpu_peak_bytes(allocate)


def cpu_peaks_in_fresh_process(work, threads=None):
    """{"peaks": [bytes or None per (op, provider, shape name)], "check": bytes} from a pinned-malloc process.

    ``work`` lists (op, provider, shape name); each is built, called once, then measured.
    """
    if not cpu_peak_supported():
        return {"peaks": [None] * len(work), "check": None}
    env = dict(os.environ, **PINNED_MALLOC_ENV)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    command = [sys.executable, "-m", "benchmarks.measure", json.dumps(work)]
    if threads:
        command += ["--threads", str(threads)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the memory process failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _main():
    """``python -m benchmarks.measure '[["step", "torch", "seed"], ...]'``: CPU peaks as JSON on stdout."""
    from . import cases

    parser = argparse.ArgumentParser(prog="python -m benchmarks.measure", description=_main.__doc__)
    parser.add_argument("work", help="JSON list of [operation, provider, shape name]")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if any(os.environ.get(k) != v for k, v in PINNED_MALLOC_ENV.items()):
        sys.exit(f"run with {PINNED_MALLOC_ENV} in the environment (cpu_peaks_in_fresh_process does)")
    peaks = []
    for op, provider, shape_name in json.loads(args.work):
        torch.manual_seed(0)
        try:
            case = cases.build(op, provider, cases.SHAPES[shape_name], "cpu")
        except cases.Unavailable:
            peaks.append(None)
            continue
        peaks.append(peak_bytes(case))
        del case
    print(json.dumps({"peaks": peaks, "check": check_cpu_peak(40)}))


if __name__ == "__main__":
    _main()
