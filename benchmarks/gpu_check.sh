#!/usr/bin/env bash
# GPU check: what a session with a CUDA GPU runs first, from a bare clone, in one go.
#
#   benchmarks/gpu_check.sh [--dry-run] [OUT]    # OUT: the report's folder, default bench_out/gpu
#   PYTHON=/path/to/python benchmarks/gpu_check.sh
#
# Steps (estimated wall time on one H100 with a 16-core host; not yet measured on one):
#   1. install       pip install -e ".[test]" unless this checkout is installed with its test extras  ~40 s (3 s if installed)
#   2. collect       pytest --collect-only: every test module imports                                ~15 s
#   3. gpu           torch sees a CUDA device; its name, capability, torch and Triton versions       ~5 s
#   4. gpu tests     pytest -m cuda tests: every GPU path against the fp64 reference                 ~120 s
#   5. path sweep    python -m benchmarks.swd_paths: every path timed, the path cache filled          ~35 s
#   6. report        python -m benchmarks.report: the loss and the step, every provider, vs the bound ~80 s
#   7. throughput    python -m benchmarks.train_throughput: data paths and training steps             ~40 s
#   8. host cost     python -m benchmarks.host_overhead: the Triton step's Python vs plain torch's     ~15 s
# About 5.8 minutes (350 s) in all. Each step has a time limit (about 1.5x its estimate; 590 s in
# all), so a hung step cannot hold the GPU: the script ends within 10 minutes whatever happens. A failing step is
# reported and the later steps still run; the exit status is nonzero if any step failed.
# --dry-run prints the steps, runs steps 1 and 2 for real (a bare clone gets installed), and stops
# before the first step that needs CUDA (exit 0): it runs on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHON

usage() {
    sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
}

DRY_RUN=0
OUT=bench_out/gpu
OUT_GIVEN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu_check: unknown option $arg; it takes --dry-run, --help and an output folder"; exit 2 ;;
        *)
            if [ "$OUT_GIVEN" -eq 1 ]; then
                echo "gpu_check: one output folder only; got $OUT and $arg"; exit 2
            fi
            OUT=$arg; OUT_GIVEN=1 ;;
    esac
done
mkdir -p "$OUT"
# The sweep's decisions go with the report: the report's Triton provider then runs the chosen paths.
export LPJEPA_CACHE_DIR=${LPJEPA_CACHE_DIR:-$OUT/cache}

STEPS=("install" "collect" "gpu" "gpu tests" "path sweep" "report" "throughput" "host cost")
ESTIMATES=(40 15 5 120 35 80 40 15)
LIMITS=(90 45 20 170 55 120 60 30)
SUMMARY=()  # one line per step run: name, status, seconds, estimate
FAILED=0
SCRIPT_START=$(date +%s)

echo "gpu_check: $(pwd), output in $OUT"
for i in "${!STEPS[@]}"; do
    printf '  step %d/%d %-11s ~%3d s (limit %d s)\n' $((i + 1)) ${#STEPS[@]} "${STEPS[$i]}" "${ESTIMATES[$i]}" "${LIMITS[$i]}"
done

# run_step INDEX LOG COMMAND...: runs COMMAND under the step's time limit, output to LOG (and its tail
# to the screen on failure); records and prints its wall time.
run_step() {
    local i=$1 log=$2
    shift 2
    local start rc
    start=$(date +%s)
    echo "== step $((i + 1))/${#STEPS[@]}: ${STEPS[$i]} ($*)"
    # Through bash -c so that COMMAND may be one of the functions below (exported).
    timeout "${LIMITS[$i]}" bash -c '"$@"' _ "$@" > "$log" 2>&1
    rc=$?
    local took=$(( $(date +%s) - start ))
    local status=ok
    if [ "$rc" -eq 124 ]; then status="TIMED OUT after ${LIMITS[$i]} s"; elif [ "$rc" -ne 0 ]; then status="FAILED (exit $rc)"; fi
    if [ "$status" != ok ]; then FAILED=1; tail -n 30 "$log"; fi
    echo "   ${STEPS[$i]}: $status in $took s (estimate ${ESTIMATES[$i]} s; log $log)"
    SUMMARY+=("$(printf '%-11s %-24s %4d s  (estimate %3d s)' "${STEPS[$i]}" "$status" "$took" "${ESTIMATES[$i]}")")
    return "$rc"
}

installed() {
    # This checkout, installed (lpjepa.kernels is mapped from kernels/ by setup.py), with the test extras.
    "$PYTHON" - <<'PY' 2>/dev/null
import importlib.util, pathlib, sys
import lpjepa, lpjepa.kernels
here = pathlib.Path(lpjepa.__file__).resolve().parents[1] == pathlib.Path.cwd().resolve()
extras = all(importlib.util.find_spec(m) for m in ("pytest", "pytest_benchmark", "scipy", "mpmath", "triton", "timm"))
sys.exit(0 if here and extras else 1)
PY
}

install() {
    if installed; then
        echo "this checkout is installed with its test extras"
    else
        "$PYTHON" -m pip install -q -e ".[test]"
    fi
}

export -f installed install

summary() {
    local total=$(( $(date +%s) - SCRIPT_START ))
    echo
    echo "== steps (wall time)"
    printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/steps.txt"
    echo "total: $total s" | tee -a "$OUT/steps.txt"
}

run_step 0 "$OUT/install.log" install
run_step 1 "$OUT/collect.log" "$PYTHON" -m pytest --collect-only -q -p no:cacheprovider tests
echo "   $(tail -n 1 "$OUT/collect.log")"

if [ "$DRY_RUN" -eq 1 ]; then
    echo
    echo "dry run: stopping before step 3 (${STEPS[2]}), the first that needs CUDA"
    summary
    exit "$FAILED"
fi

gpu() {
    "$PYTHON" - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device")
import triton
major, minor = torch.cuda.get_device_capability()
print(f"{torch.cuda.get_device_name()}, sm_{major}{minor}, torch {torch.__version__}, Triton {triton.__version__}")
PY
}
export -f gpu
if ! run_step 2 "$OUT/gpu.log" gpu; then
    echo "gpu_check: no usable CUDA device; the GPU steps are skipped"
    summary
    exit 1
fi
echo "   $(cat "$OUT/gpu.log")"

run_step 3 "$OUT/tests.log" "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests
tests_rc=$?
echo "   $(tail -n 1 "$OUT/tests.log")"
run_step 4 "$OUT/paths.log" "$PYTHON" -m benchmarks.swd_paths --out "$OUT"
paths_rc=$?
run_step 5 "$OUT/report.log" "$PYTHON" -m benchmarks.report --device cuda --ops forward_backward,step --budget 1 --out "$OUT"
report_rc=$?
run_step 6 "$OUT/throughput.log" "$PYTHON" -m benchmarks.train_throughput --device cuda --out "$OUT/throughput"
throughput_rc=$?
run_step 7 "$OUT/host.log" "$PYTHON" -m benchmarks.host_overhead --out "$OUT"
host_rc=$?

echo
echo "== results"
echo "$(cat "$OUT/gpu.log")"
if [ "$tests_rc" -eq 0 ]; then echo "GPU-only tests: passed ($(tail -n 1 "$OUT/tests.log"))"; else echo "GPU-only tests: FAILED ($OUT/tests.log)"; fi
if [ "$paths_rc" -eq 0 ]; then
    echo "Chosen paths (ms; model bound ms):"
    grep "| yes |" "$OUT/paths.md" | awk -F'|' '{printf "  %s %s V=%s %s: %s, %s ms (bound %s)\n", $2, $3, $4, $5, $6, $7, $8}'
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
fi
if [ "$throughput_rc" -eq 0 ]; then
    echo "Training throughput (images/s; one image = two views):"
    grep -E '^\| |^- ' "$OUT/throughput/table.md"
fi
if [ "$host_rc" -eq 0 ]; then
    echo "Host cost of one regularizer step (launches stubbed):"
    sed 's/^/  /' "$OUT/host.log"
fi
summary
exit "$FAILED"
