#!/usr/bin/env bash
# GPU check, on a machine with CUDA, in one go for a short GPU window: the GPU-only tests
# (pytest -m cuda), the path sweep that fills the self-tuning cache (benchmarks/swd_paths.py),
# the benchmark report of the loss (forward + backward and the regularizer step; every provider,
# the official recipe's included, each time beside the static model's bound), the training
# throughput (benchmarks/train_throughput.py: PIL workers vs device-resident batches, and whole
# training steps of the seed recipe per data path and speed switch), then a summary
# short enough to paste into a note. Sized for under 5 minutes on one H100 (not yet run on one).
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
# The sweep's decisions go with the report: the report's Triton provider then runs the chosen paths.
export LPJEPA_CACHE_DIR=${LPJEPA_CACHE_DIR:-$OUT/cache}

"$PYTHON" - <<'PY' || exit 1
import importlib.util, sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device")
missing = [m for m in ("triton", "numpy", "timm", "torchvision", "pytest", "matplotlib") if importlib.util.find_spec(m) is None]
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
"$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tee "$OUT/tests.log" | tail -n 15
tests_rc=${PIPESTATUS[0]}
if [ "$tests_rc" -eq 5 ]; then
    echo "(no GPU-only tests were collected)"
    tests_rc=0
fi

echo "== path sweep: python -m benchmarks.swd_paths --out $OUT (fills $LPJEPA_CACHE_DIR)"
"$PYTHON" -m benchmarks.swd_paths --out "$OUT" > "$OUT/paths.log" 2>&1
paths_rc=$?
if [ "$paths_rc" -ne 0 ]; then tail -n 30 "$OUT/paths.log"; fi

echo "== benchmark report: python -m benchmarks.report --device cuda --ops forward_backward,step --budget 1 --out $OUT"
"$PYTHON" -m benchmarks.report --device cuda --ops forward_backward,step --budget 1 --out "$OUT" > "$OUT/report.log" 2>&1
report_rc=$?

echo "== training throughput: python -m benchmarks.train_throughput --device cuda --out $OUT/throughput"
"$PYTHON" -m benchmarks.train_throughput --device cuda --out "$OUT/throughput" > "$OUT/throughput.log" 2>&1
throughput_rc=$?

echo
echo "== summary"
if [ "$tests_rc" -eq 0 ]; then echo "GPU-only tests: passed ($(tail -n 1 "$OUT/tests.log"))"; else echo "GPU-only tests: FAILED (exit $tests_rc; $OUT/tests.log)"; fi
if [ "$paths_rc" -eq 0 ]; then
    echo "Chosen paths (ms; model bound ms):"
    grep "| yes |" "$OUT/paths.md" | awk -F'|' '{printf "  %s %s V=%s %s: %s, %s ms (bound %s)\n", $2, $3, $4, $5, $6, $7, $8}'
else
    echo "path sweep: FAILED (exit $paths_rc; $OUT/paths.log)"
fi
if [ "$report_rc" -eq 0 ]; then
    "$PYTHON" - "$OUT/results.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
print("Loss times (median ms; x model bound):")
for r in rows:
    if r["provider"] in ("compiled_reference", "official", "triton", "reference"):
        bound = f", {r['x_bound']:.1f}x bound" if r.get("x_bound") else ""
        print(f"  {r['shape']:<9} {r['op']:<17} {r['provider']:<19} {r['median_ms']:.4g} ms{bound}")
PY
    sed -n '/^GPU targets:/,/^$/p' "$OUT/table.md"
else
    echo "benchmark report: FAILED (exit $report_rc)"
    tail -n 30 "$OUT/report.log"
fi
if [ "$throughput_rc" -eq 0 ]; then
    echo "Training throughput (images/s; one image = two views):"
    grep -E '^\| |^- ' "$OUT/throughput/table.md"
else
    echo "training throughput: FAILED (exit $throughput_rc)"
    tail -n 30 "$OUT/throughput.log"
fi
[ "$tests_rc" -eq 0 ] && [ "$paths_rc" -eq 0 ] && [ "$report_rc" -eq 0 ] && [ "$throughput_rc" -eq 0 ]
