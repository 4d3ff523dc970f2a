"""How one (provider, pass, size) of an op's benchmark is timed.

Each op's spec declares its benchmarks (``gptfast.kernels.benchmark.KernelBench``: sizes, providers, the
work each pass must do). The passes are timed the same way for every kernel: the forward alone, the
backward alone (from a recorded forward, ``retain_graph``), and the forward then the backward.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch

from gptfast.kernels.benchmark import (  # noqa: F401  (the benchmark vocabulary, re-exported)
    PASSES,
    SIZE_MODES,
    KernelBench,
    ProviderFactory,
    Sweep,
    compiled,
    eager,
    liger,
    triton_backend,
)

from .harness import REP_MS, WARMUP_MS, Record, measure_record


def bench_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU, as training runs; float32 on a CPU (the interpreter's bf16 dot is unreliable)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def pass_call(forward: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]], inputs: tuple[torch.Tensor, ...],
              pass_: str) -> Callable[[], object]:
    """A call doing ``pass_`` on ``inputs`` (the timing clears their gradients between calls); a forward
    giving several tensors gets a gradient for each."""
    if pass_ == "forward":
        return lambda: forward(*inputs)
    out = forward(*inputs)
    grad_out = tuple(torch.randn_like(t) for t in out) if isinstance(out, tuple) else torch.randn_like(out)
    if pass_ == "backward":
        return lambda: torch.autograd.backward(out, grad_out, retain_graph=True)
    return lambda: torch.autograd.backward(forward(*inputs), grad_out)


_built: dict[tuple, Callable[..., torch.Tensor]] = {}  # the last provider built, shared by its passes


def _provider(bench: KernelBench, provider: str, size: dict, device: torch.device) -> Callable[..., torch.Tensor]:
    """The provider's forward for this size; the three passes of a size share one (one compilation)."""
    key = (bench.name, provider, json.dumps(size, sort_keys=True), str(device))
    if key not in _built:
        _built.clear()
        _built[key] = bench.providers[provider](device)
    return _built[key]


def run_case(bench: KernelBench, provider: str, pass_: str, size: dict, device: torch.device,
             dtype: torch.dtype, *, warmup_ms: float = WARMUP_MS, rep_ms: float = REP_MS) -> Record:
    """Time one (provider, pass, size); a provider that cannot run gives a record saying why."""
    def build() -> tuple[Callable[[], object], list[torch.Tensor]]:
        forward = _provider(bench, provider, size, device)
        inputs = bench.make_inputs(size, device, dtype)
        return pass_call(forward, inputs, pass_), [t for t in inputs if t.requires_grad]

    scale = 1e9 if bench.unit == "GB/s" else 1e12
    work = bench.pass_work(size, pass_, dtype.itemsize) / scale
    return measure_record(Record(bench.name, provider, pass_, dict(size), unit=bench.unit), build, work, device,
                          warmup_ms=warmup_ms, rep_ms=rep_ms)
