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
# interpreter or in inductor), with where it runs: (group, provider) or (group, provider, pass).
CPU_COVERED_ELSEWHERE = {
    # The compiled model on the Triton kernels (the harness's compile path stays in torch+compile's case).
    ("train", "triton+compile"): "test_flash_attention.py::test_torch_compile_fullgraph_model",
    # The model's unfused head on the Triton kernels, forward and backward (the step: train triton's case).
    ("train", "triton/unfused-head"): "test_linear_cross_entropy.py::test_model_fused_head_equals_the_unfused_head",
    # Generation without the cache re-runs the Triton model's forward (the harness's no-cache path stays in
    # torch's case; the triton forward in triton's cache case and test_flash_attention.py's model tests).
    ("generate", "triton", "no cache"): "test_generate.py::test_greedy_cache_no_cache_and_simple_loop_agree and "
                                        "the generate triton cache case",
    # The compiled decode step on the Triton kernels (the harness's compiled path stays in torch's case).
    ("generate", "triton", "compiled"): "test_generate.py::test_compiled_prefill_of_a_long_prompt_runs_on_the_"
                                        "triton_backend",
}


def covered_elsewhere(task: report.Task) -> str | None:
    """Where a CPU run's case is run by another test, or None (a GPU runs every case). A kernel's cases on a
    CPU are at its first small size only: at the others they run the same code (torch.compile's compiled
    again, about 2 s a case), and the kernels' own tests check them at many shapes (tests/test_layer_norm.py,
    test_flash_attention.py's decode tests, ...)."""
    if DEVICE.type != "cpu":
        return None
    if task.group in report.KERNELS and task.size != report.KERNELS[task.group].sizes(SIZES)[0]:
        return f"the {task.group} {task.provider} {task.pass_} case at its first size (the shapes: the kernel's tests)"
    return CPU_COVERED_ELSEWHERE.get((task.group, task.provider, task.pass_)) or CPU_COVERED_ELSEWHERE.get(
        (task.group, task.provider))


@pytest.fixture(scope="session")
def ceilings():
    return measure_ceilings(DEVICE, small=SIZES == "small")


@pytest.mark.parametrize("task", TASKS, ids=lambda task: str(task).replace(" ", "-"))
def test_benchmark(benchmark, ceilings, task):
    if (elsewhere := covered_elsewhere(task)) is not None:
        pytest.skip(f"run on a CPU by {elsewhere}")
    record = benchmark.pedantic(task.measure, rounds=1, iterations=1)
    if record.status == UNAVAILABLE:
        pytest.skip(record.note)
    assert record.status == OK, record.note
    record.pct_of_ceiling = ceilings.percent(record)
    benchmark.extra_info.update(record.to_dict(), dtype=str(report.bench_dtype(DEVICE)), device=DEVICE.type)
    assert record.value > 0 and 0 < record.p20_ms <= record.ms <= record.p80_ms
