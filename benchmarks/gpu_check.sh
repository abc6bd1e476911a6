#!/usr/bin/env bash
# GPU check, on a machine with CUDA: the GPU-only tests (pytest -m cuda), the fused-vs-fallback
# sweep (benchmarks/swd_paths.py), then the benchmark report on the GPU, ending with the
# summary. Sized for under 5 minutes on one H100-class GPU (not yet run on one).
# Works from a fresh checkout where torch, triton and the package's other dependencies are
# installed: it installs this checkout without dependencies and downloads nothing.
#
#   benchmarks/gpu_check.sh [OUT]        # OUT: the report's folder, default bench_out/gpu
#   PYTHON=/path/to/python benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${1:-bench_out/gpu}
mkdir -p "$OUT"

"$PYTHON" - <<'PY' || exit 1
import importlib.util, sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device")
missing = [m for m in ("triton", "numpy", "timm", "pytest", "matplotlib") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing Python packages {missing}; install them first (this script downloads nothing)")
print(f"gpu_check: {torch.cuda.get_device_name()}, torch {torch.__version__}")
PY

# lpjepa.kernels is mapped from kernels/ by setup.py, so the checkout must be installed to import it.
if ! "$PYTHON" -c "import lpjepa, lpjepa.kernels, pathlib, sys; sys.exit(pathlib.Path(lpjepa.__file__).parents[1] != pathlib.Path.cwd())" 2>/dev/null; then
    echo "gpu_check: installing this checkout (pip install -e . --no-deps --no-build-isolation)"
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . || exit 1
fi

echo "== GPU-only tests: pytest -m cuda tests"
"$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests
tests_rc=$?
if [ "$tests_rc" -eq 5 ]; then
    echo "(no GPU-only tests were collected)"
    tests_rc=0
fi

echo "== fused kernel vs fallback: python -m benchmarks.swd_paths --out $OUT (the data for FUSED_MAX_BATCH)"
"$PYTHON" -m benchmarks.swd_paths --out "$OUT" 2> "$OUT/paths.log"
paths_rc=$?
if [ "$paths_rc" -ne 0 ]; then tail -n 30 "$OUT/paths.log"; fi

echo "== benchmark report: python -m benchmarks.report --device cuda --budget 1 --out $OUT (progress below, table at the end)"
"$PYTHON" -m benchmarks.report --device cuda --budget 1 --out "$OUT" > "$OUT/report.log"
report_rc=$?

echo
echo "== summary"
if [ "$tests_rc" -eq 0 ]; then echo "GPU-only tests: passed"; else echo "GPU-only tests: FAILED (exit $tests_rc)"; fi
if [ "$paths_rc" -eq 0 ]; then cat "$OUT/paths.md"; else echo "fused vs fallback: FAILED (exit $paths_rc)"; fi
if [ "$report_rc" -eq 0 ]; then
    cat "$OUT/table.md"
else
    echo "benchmark report: FAILED (exit $report_rc)"
    tail -n 30 "$OUT/report.log"
fi
[ "$tests_rc" -eq 0 ] && [ "$paths_rc" -eq 0 ] && [ "$report_rc" -eq 0 ]
