#!/usr/bin/env bash
# One prepared GPU check for issue 9, about 8 minutes on one GPU, run from anywhere:
#
#   bash benchmarks/gpu_check.sh            # PYTHON=/path/to/python to pick the interpreter
#
# 1. the test suite's CUDA-marked tests (pytest -m cuda);
# 2. benchmarks/bench_speed.py on CUDA, ours forced to a bf16 warm start and channels-last;
# 3. one epoch of `pcdeq-bench compare --device cuda --amp bf16` on mnist5k (seed 0);
# then one summary table (step, status, seconds) followed by the two result tables.
# Results are written to $GPU_CHECK_OUT (default: $OUT if set, else a fresh temp dir).
# Exits 2 at once if CUDA is unavailable, 1 if any step failed or ran out of time.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python3
fi
RESULTS="${GPU_CHECK_OUT:-${OUT:-$(mktemp -d)}}"
mkdir -p "$RESULTS" || exit 1

if ! "$PY" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: CUDA is not available (torch {torch.__version__}, "
             f"built for CUDA {torch.version.cuda}); this check needs a GPU")
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, bf16 supported: {torch.cuda.is_bf16_supported()}")
EOF
then
    echo "gpu_check: FAILED: no CUDA device" >&2
    exit 2
fi

STEPS=()
FAILED=0

# run_step NAME SECONDS LOGFILE COMMAND...: run with a time limit, record status and time
run_step() {
    local name="$1" limit="$2" log="$3"
    shift 3
    local start=$SECONDS status
    echo "gpu_check: ${name} (limit ${limit}s) ..."
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    local rc=$?
    if [[ $rc -eq 0 ]]; then
        status="ok"
    elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
        status="TIMEOUT after ${limit}s"
        FAILED=1
    else
        status="FAILED (exit ${rc})"
        FAILED=1
    fi
    STEPS+=("| ${name} | ${status} | $((SECONDS - start)) | ${log} |")
    [[ $rc -eq 0 ]] || tail -n 30 "$log" >&2
}

# pytest exits 5 when nothing is collected: a CUDA check that ran no test has failed too
run_step "pytest -m cuda" 110 "$RESULTS/pytest_cuda.log" \
    "$PY" -m pytest -q -m cuda tests -p no:cacheprovider

run_step "bench_speed.py --device cuda" 200 "$RESULTS/bench_speed.log" \
    "$PY" benchmarks/bench_speed.py --device cuda --threads all --repeats 3 \
    --warmup-steps 10 --option warm_start=bf16 --option memory_format=channels_last

run_step "pcdeq-bench compare (1 epoch, bf16)" 170 "$RESULTS/compare.log" \
    "$PY" -m pcdeq_plugin.bench.cli compare --device cuda --amp bf16 --dataset mnist5k \
    --epochs 1 --seeds 0 --in-process --no-plots --out "$RESULTS/compare"

# compare exits 0 even when some runs failed (it reports them in its table): check here
run_step "compare: every run ok" 30 "$RESULTS/compare_runs.log" \
    "$PY" - "$RESULTS/compare/compare.json" <<'EOF'
import json
import sys
rows = json.load(open(sys.argv[1]))["rows"]
bad = [f"{r['model']}: {r['ok']}/{r['runs']} ok ({r['status']})" for r in rows if r["ok"] < r["runs"]]
print("\n".join(bad) or f"all {len(rows)} models ran")
sys.exit(1 if bad or not rows else 0)
EOF

echo
echo "## GPU check ($(date -u +%Y-%m-%d), $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))'))"
echo
echo "| step | status | seconds | log |"
echo "|---|---|---|---|"
printf '%s\n' "${STEPS[@]}"
echo
echo "### pytest -m cuda"
tail -n 3 "$RESULTS/pytest_cuda.log"
echo
echo "### bench_speed.py (CUDA)"
sed -n '/^# pcDEQ vs/,$p' "$RESULTS/bench_speed.log"
echo
echo "### pcdeq-bench compare (CUDA, bf16 autocast, 1 epoch, seed 0)"
if [[ -f "$RESULTS/compare/compare.md" ]]; then
    cat "$RESULTS/compare/compare.md"
else
    echo "(no compare.md: see $RESULTS/compare.log)"
fi
if [[ $FAILED -ne 0 ]]; then
    echo "gpu_check: FAILED (see the table above)" >&2
    exit 1
fi
echo "gpu_check: all steps passed; results in $RESULTS"
