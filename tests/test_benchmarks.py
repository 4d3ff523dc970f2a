"""The benchmark suite: ``pytest --benchmark`` (plain pytest skips it; see conftest.py).

The report's own cases (``report.tasks``: every kernel's passes for each provider, GPT-2 training
steps and generation), each measured by the report's harness (``triton.testing.do_bench`` on a GPU)
inside one pytest-benchmark round. pytest-benchmark's columns therefore time a whole measurement
(first call, warm-up and repeats); the figures per call are in each benchmark's extra info (the
report's record: median and 20th/80th percentile ms, the figure in GB/s, TFLOP/s or tokens/s, its
percent of the device's measured ceiling), which ``--benchmark-json`` carries. Full sizes on a GPU,
small ones on a CPU (where the Triton kernels run under the interpreter: the times keep the code
working, they measure nothing). A provider that cannot run here is skipped with the reason.
"""

import pytest
import torch

from gptfast.bench import report
from gptfast.bench.ceilings import measure_ceilings
from gptfast.bench.harness import OK, UNAVAILABLE

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZES = "full" if DEVICE.type == "cuda" else "small"
TIMING = {} if DEVICE.type == "cuda" else dict(warmup_ms=0.0, rep_ms=5.0)  # the CPU runs check the code only
TASKS = report.tasks(report.Settings(sizes=SIZES, **TIMING), DEVICE)
# On a CPU, cases whose code other tests run already, left out for the suite's time (seconds each in the
# interpreter): the compiled model on the Triton kernels, by test_flash_attention.py's
# test_torch_compile_fullgraph_model (the harness's compile path stays in torch+compile's case).
CPU_COVERED_ELSEWHERE = {("train", "triton+compile")}


@pytest.fixture(scope="session")
def ceilings():
    return measure_ceilings(DEVICE, small=SIZES == "small")


@pytest.mark.parametrize("task", TASKS, ids=lambda task: str(task).replace(" ", "-"))
def test_benchmark(benchmark, ceilings, task):
    if DEVICE.type == "cpu" and (task.group, task.provider) in CPU_COVERED_ELSEWHERE:
        pytest.skip("run on a CPU by test_flash_attention.py::test_torch_compile_fullgraph_model")
    record = benchmark.pedantic(task.measure, rounds=1, iterations=1)
    if record.status == UNAVAILABLE:
        pytest.skip(record.note)
    assert record.status == OK, record.note
    record.pct_of_ceiling = ceilings.percent(record)
    benchmark.extra_info.update(record.to_dict(), dtype=str(report.bench_dtype(DEVICE)), device=DEVICE.type)
    assert record.value > 0 and 0 < record.p20_ms <= record.ms <= record.p80_ms
