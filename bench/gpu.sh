#!/usr/bin/env bash
# The benchmark run for a GPU rented by the minute: every headline figure within 510 s of stage budgets
# (give the job 540 s), into $OUT (default out/gpu), at most 8 files:
#   gpu.log        what the run printed         stages.json   each stage's budget, time, status, compilation
#   smoke.json     the correctness smoke         results.json, results.md   the benchmark report, as it goes
#   tuned.tar.gz   the tables `gptfast lab tune` wrote
#   report.tar.gz  the results folder to commit: tar -xzf report.tar.gz -C bench/results
# The stages, their budgets and what a stopped run keeps: bench/gpu_run.py (the scripts bench/gpu_run*.py
# are the checkout's, not the package's). It installs the checkout in place first (offline, no dependencies:
# the machine's image has them). A Triton cache prepared ahead without a GPU (python bench/gpu_run_prepare.py,
# see the README) is used when the checkout holds it in bench/triton-cache; Liger-Kernel, when not in the
# image, when it holds its wheel in bench/wheels (pip download liger-kernel --no-deps -d bench/wheels).
# `bash bench/gpu.sh --rehearse` runs the same stages on a CPU at tiny sizes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
PY=${PYTHON:-python3}
if [[ -e "$OUT/stages.json" ]]; then
    echo "bench/gpu.sh: $OUT holds an earlier run (stages.json): set OUT to an empty folder" >&2
    exit 2
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OUT
rehearse=0
[[ " $* " == *" --rehearse "* ]] && rehearse=1
{
    if ((rehearse)); then
        export TRITON_INTERPRET=1  # the kernels on the CPU; set before anything imports triton
        echo "rehearsal: no install (the checkout must be installed already)"
    else
        $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
        if compgen -G "bench/wheels/liger_kernel-*.whl" >/dev/null; then
            $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/bench-site \
                bench/wheels/liger_kernel-*.whl && export PYTHONPATH="/tmp/bench-site${PYTHONPATH:+:$PYTHONPATH}"
        fi
    fi
    $PY bench/gpu_run.py --out "$OUT" "$@"
} 2>&1 | tee "$OUT/gpu.log"
exit "${PIPESTATUS[0]}"
