"""benchmarks/gpu_check.sh from the command line: its dry run (no GPU needed), --help and a bad flag."""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("install", "collect", "gpu", "gpu tests", "path sweep", "report", "throughput", "host cost")


def _run(*args, timeout=240):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user's shell has it
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_dry_run_installs_collects_and_stops_before_cuda(tmp_path):
    result = _run("--dry-run", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for number, step in enumerate(STEPS, start=1):  # every step listed with its estimate and limit
        assert f"step {number}/{len(STEPS)} {step}" in out and "~" in out, (step, out)
    estimates = [int(line.split("~")[1].split("s")[0]) for line in out.splitlines() if line.strip().startswith("step ")]
    assert len(estimates) == len(STEPS) and sum(estimates) < 6 * 60  # sized for under 6 minutes on one H100
    assert "install: ok" in out and "collect: ok" in out
    assert " tests collected" in out  # every test module imports
    assert "stopping before step 3 (gpu)" in out
    assert f"== step 3/{len(STEPS)}" not in out and not (tmp_path / "tests.log").exists()  # nothing that needs CUDA ran
    steps = (tmp_path / "steps.txt").read_text()
    assert steps.startswith("install") and "total:" in steps


def test_help_and_a_bad_flag():
    shown = _run("--help")
    assert shown.returncode == 0 and "--dry-run" in shown.stdout and "gpu tests" in shown.stdout
    bad = _run("--bogus")
    assert bad.returncode == 2
    assert bad.stdout.strip().splitlines() == [
        "gpu_check: unknown option --bogus; it takes --dry-run, --help and an output folder"]
