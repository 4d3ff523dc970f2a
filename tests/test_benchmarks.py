"""The benchmark suite: ``pytest --benchmark`` (plain pytest skips it; see conftest.py).

Every kernel's forward, backward and forward+backward for each provider, GPT-2 training steps and
generation, timed by pytest-benchmark around calls that end in a device synchronisation, after a
warm-up. Each benchmark's extra info holds its figure (GB/s, TFLOP/s or tokens/s) and its percent
of the device's measured ceiling, so ``--benchmark-json`` carries them. Full sizes on a GPU, small
ones on a CPU (where the Triton kernels run under the interpreter: the times keep the code working,
they measure nothing). A provider that cannot run here is skipped with the reason.
"""

import itertools
import math

import pytest
import torch

from gptfast.bench import end_to_end
from gptfast.bench.ceilings import measure_ceilings
from gptfast.bench.kernel_bench import PASSES, bench_dtype, prepare_case
from gptfast.bench.records import FAILED, failure_status
from gptfast.bench.report import KERNELS, unique_sizes
from gptfast.bench.timing import synchronize
from gptfast.train import model_flops_per_token

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZES = "full" if DEVICE.type == "cuda" else "small"
DTYPE = bench_dtype(DEVICE)
ROUNDS, WARMUP_ROUNDS = (20, 3) if DEVICE.type == "cuda" else (3, 1)
E2E_ROUNDS = 10 if DEVICE.type == "cuda" else 2  # a whole step or generation per round


@pytest.fixture(scope="session")
def ceilings():
    return measure_ceilings(DEVICE, small=SIZES == "small")


def _or_skip(build):
    """Run ``build()``; skip the test if what it builds is unavailable here, re-raise a real failure."""
    try:
        return build()
    except Exception as error:
        status, note = failure_status(error)
        if status == FAILED:
            raise
        pytest.skip(note)


def _time(benchmark, call, rounds: int = ROUNDS) -> float:
    """Median seconds per call, each call ending in a device synchronisation."""
    def timed():
        call()
        synchronize(DEVICE)

    synchronize(DEVICE)
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=WARMUP_ROUNDS, iterations=1)
    if benchmark.disabled:
        pytest.skip("ran once untimed (--benchmark-disable)")
    median = benchmark.stats.stats.median
    assert math.isfinite(median) and median > 0
    return median


KERNEL_CASES = [pytest.param(bench, provider, pass_, size,
                             id=f"{name}-{provider}-{pass_}-" + "-".join(map(str, size.values())))
                for name, bench in KERNELS.items() for size in unique_sizes(bench, SIZES)
                for provider in bench.providers for pass_ in PASSES]


@pytest.mark.parametrize("bench, provider, pass_, size", KERNEL_CASES)
def test_kernel(benchmark, ceilings, bench, provider, pass_, size):
    case = _or_skip(lambda: prepare_case(bench, provider, pass_, size, DEVICE, DTYPE))
    calls = itertools.cycle(case.calls)
    value = case.figure(_time(benchmark, lambda: next(calls)()))
    ceiling = ceilings.copy_gbps if bench.unit == "GB/s" else ceilings.matmul_tflops
    benchmark.extra_info.update(unit=bench.unit, value=value, pct_of_ceiling=100 * value / ceiling,
                                size=size, dtype=str(DTYPE), device=DEVICE.type)
    assert value > 0


@pytest.mark.parametrize("provider", end_to_end.TRAIN_PROVIDERS)
def test_train_step(benchmark, ceilings, provider):
    size = end_to_end.TRAIN_SIZES[SIZES]
    step, config = _or_skip(lambda: end_to_end.make_train_step(provider, size, DEVICE))
    _or_skip(step)  # the first step compiles, or shows that the provider cannot run
    tokens_per_s = size.batch * size.context / _time(benchmark, step, E2E_ROUNDS)
    benchmark.extra_info.update(unit="tokens/s", value=tokens_per_s, size=size.as_dict())
    flops = model_flops_per_token(config)
    benchmark.extra_info["pct_of_ceiling"] = 100 * tokens_per_s * flops / 1e12 / ceilings.matmul_tflops  # MFU
    assert tokens_per_s > 0


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("provider", end_to_end.GENERATE_PROVIDERS)
@pytest.mark.parametrize("size", end_to_end.GENERATE_SIZES[SIZES], ids=lambda z: f"batch{z.prompts}")
def test_generate(benchmark, provider, use_cache, size):
    run = _or_skip(lambda: end_to_end.generate_call(provider, use_cache, size, DEVICE))
    outputs = _or_skip(run)
    assert [len(tokens) for tokens in outputs] == [size.new_tokens] * size.prompts
    tokens_per_s = size.prompts * size.new_tokens / _time(benchmark, run, E2E_ROUNDS)
    benchmark.extra_info.update(unit="tokens/s", value=tokens_per_s, size=size.as_dict())
