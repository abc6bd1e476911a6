"""The benchmarks still run: the pytest-benchmark suite and the report, at the tiny shape.

Checks that the code works (every provider that can run here is built and called, the
report writes its table, JSON and plot), not its timings. torch.compile is left out
here: compiling costs ~20 s cold on a 2-core machine; the report exercises it.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import requires_cuda

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=300):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the benchmarks never run Triton's interpreter
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_benchmark_suite_runs_once_per_case():
    out = _run(
        "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
        "--shapes", "tiny", "--providers", "reference,torch,triton",
    )
    # 4 operations x (reference, torch) run; triton skips without CUDA (and runs with it).
    assert "failed" not in out and ("8 passed" in out or "12 passed" in out), out[-2000:]


def test_report_writes_table_json_and_plot(tmp_path):
    out_dir = tmp_path / "bench"
    stdout = _run(
        "-m", "benchmarks.report", "--device", "cpu", "--shapes", "tiny", "--providers", "reference,torch",
        "--min-rounds", "2", "--budget", "0", "--floor", "--out", str(out_dir),
    )
    table = (out_dir / "table.md").read_text()
    assert (out_dir / "speedup.png").stat().st_size > 1000
    rows = json.loads((out_dir / "results.json").read_text())["rows"]
    from_json = {(r["op"], r["provider"]) for r in rows}
    ops = ("sample", "forward", "forward_backward", "step")
    assert from_json == {(op, p) for op in ops for p in ("reference", "torch")}
    for row in rows:
        assert row["median_ms"] > 0 and row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert row["peak_bytes"] is not None and row["speedup"] > 0
        assert (row["floor_ms"] is None) == (row["op"] == "sample")
    table_rows = [line for line in table.splitlines() if line.startswith("| tiny")]
    assert len(table_rows) == 8 and table in stdout
    # The CPU peak is a real measure: a known 40 MB allocation reads ~40 MB (Linux).
    if sys.platform.startswith("linux"):
        check = re.search(r"a 40.0 MB tensor reads ([0-9.]+) MB", table)
        assert check and 38 <= float(check.group(1)) <= 43, table



@requires_cuda
def test_report_on_cuda(tmp_path):
    """The CUDA path: Triton provider (or its skip note), max_memory_allocated, the matmul floor."""
    _run(
        "-m", "benchmarks.report", "--device", "cuda", "--shapes", "tiny", "--providers", "reference,torch,triton",
        "--min-rounds", "2", "--budget", "0", "--out", str(tmp_path),
    )
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {r["provider"] for r in rows} >= {"reference", "torch"}
    assert all(r["peak_bytes"] is not None and (r["floor_ms"] is None) == (r["op"] == "sample") for r in rows)


def test_fused_vs_fallback_sweep_runs_on_the_interpreter(tmp_path):
    # The interpreter times nothing useful; this checks the script that tunes FUSED_MAX_BATCH on a GPU.
    stdout = _run(
        "-m", "benchmarks.swd_paths", "--device", "cpu", "--batches", "4,9", "--projections", "16", "--dim", "4",
        "--reps", "1", "--rounds", "1", "--out", str(tmp_path),
    )
    rows = json.loads((tmp_path / "paths.json").read_text())["rows"]
    assert [(r["B"], r["K"]) for r in rows] == [(4, 16), (9, 16)]
    assert all(r["fused_ms"] > 0 and r["fallback_ms"] > 0 for r in rows)
    assert "| 9 | 16 | 4 | float32 |" in stdout and "- K = 16: " in stdout


def test_fused_threshold_is_the_last_batch_of_an_unbroken_win():
    from benchmarks.swd_paths import thresholds

    def row(B, K, fused, fallback):
        return dict(B=B, K=K, fused_ms=fused, fallback_ms=fallback)

    rows = [row(64, 256, 1, 2), row(256, 256, 1, 2), row(1024, 256, 3, 2), row(2048, 256, 1, 2),
            row(64, 8192, 3, 2), row(256, 8192, 1, 2)]
    # A loss at 1024 ends the run for K = 256 even though 2048 wins again; a first loss means never.
    assert thresholds(rows) == {256: 256, 8192: 0}
