#!/usr/bin/env bash
# The GPU machine's commands: the test suite's log and the full benchmark report, each within 10
# minutes on an H100. Run from anywhere: it installs the checkout in place first (offline, no
# dependencies: the GPU image has them), so that gptfast.kernels and gptfast.bench import. Writes into
# $OUT (default out/gpu):
#   tests.log, tests.xml      `pytest tests` on the GPU (log, JUnit XML), kernel and model tests first
#   report.log                nvidia-smi, then `python -m gptfast.bench` (progress, tables)
#   <date>-<device>/          results.json, results.md and one PNG per kernel
# On a fresh GPU machine Triton compiles every kernel specialisation the tests meet (seconds each),
# so run the two halves as two commands, each with the whole limit:
#   bash bench/gpu.sh tests       then       bash bench/gpu.sh report
# (`bash bench/gpu.sh` runs both in one limit, the tests cut at 150 s.) Then copy <date>-<device>/
# into bench/results/ and run `python -m gptfast.bench --readme-from` to update the README's table.
# Liger-Kernel is not in the GPU image: `pip download liger-kernel --no-deps -d bench/wheels` here,
# carry bench/wheels along (it is gitignored), and this script installs it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
what=${1:-all}
limit_s=${BENCH_LIMIT_S:-570}  # the whole script's wall-clock budget
start=$SECONDS

if compgen -G "bench/wheels/liger_kernel-*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/bench-site bench/wheels/liger_kernel-*.whl \
        && export PYTHONPATH="/tmp/bench-site${PYTHONPATH:+:$PYTHONPATH}"
fi

if [[ $what == all || $what == tests ]]; then
    tests_s=$([[ $what == all ]] && echo 150 || echo $((limit_s - 10)))
    # The kernels' and the model's tests first (bf16 and memory checks run only on a GPU), then the
    # rest. Files are named one by one: pytest would sort them if given the tests folder.
    first=(tests/test_layer_norm.py tests/test_bias_gelu.py tests/test_cross_entropy.py tests/test_model.py
           tests/test_train.py tests/test_flash_attention.py tests/test_generate.py)
    rest=$(ls tests/test_*.py | grep -vxF "$(printf '%s\n' "${first[@]}")")
    # SIGINT at the limit: pytest stops as on Ctrl-C and still writes its summary and tests.xml.
    timeout -s INT -k 20 "$tests_s" $PY -m pytest -q -p no:cacheprovider --durations=10 \
        --junitxml "$OUT/tests.xml" "${first[@]}" $rest 2>&1 | tee "$OUT/tests.log"
    echo "tests: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s (124: stopped at the ${tests_s} s limit)" | tee -a "$OUT/tests.log"
fi

if [[ $what == all || $what == report ]]; then
    left=$((limit_s - (SECONDS - start)))
    {
        nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,power.limit --format=csv
        # Cases still queued after the budget are recorded as skipped; 60 s are kept for writing.
        timeout "$left" $PY -m gptfast.bench --results-root "$OUT" --warmup-ms 10 --rep-ms 50 --budget-s $((left - 60))
        echo "report: exit $? after $((SECONDS - start)) s"
    } 2>&1 | tee "$OUT/report.log"
fi
