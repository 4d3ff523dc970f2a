"""What a kernel benchmark is, and how one (provider, pass, size) is timed.

Each kernel's file (``bench/layer_norm.py``...) describes its sizes, its providers (our Triton
kernel and the baselines) and the work it must do, as a :class:`KernelBench`. The passes are
timed the same way for every kernel: the forward alone, the backward alone (from a recorded
forward, ``retain_graph``), and the forward then the backward.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass
from typing import Callable

import torch

from gptfast import kernels

from .records import Record, failure_status
from .timing import (REP_MS, WARMUP_MS, Unavailable, input_sets, peak_memory_mb, reset_peak_memory, synchronize,
                     time_calls)

PASSES = ("forward", "backward", "forward+backward")
SIZE_MODES = ("small", "full", "headline")


def bench_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU, as training runs; float32 on a CPU (the interpreter's bf16 dot is unreliable)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# A provider's factory returns the forward function for a device, or raises Unavailable.
ProviderFactory = Callable[[torch.device], Callable[..., torch.Tensor]]


@dataclass(frozen=True)
class Sweep:
    """Sizes that vary one parameter ``x`` (the plot's horizontal axis)."""

    name: str
    x: str
    sizes: list[dict]


@dataclass(frozen=True)
class KernelBench:
    name: str
    unit: str  # "GB/s" (work counts bytes) or "TFLOP/s" (work counts FLOPs)
    full: list[Sweep]  # GPU sizes
    small: list[Sweep]  # CPU sizes: keep the code working, the numbers mean little
    headline: dict  # the full size quoted in the README
    providers: dict[str, ProviderFactory]
    make_inputs: Callable[[dict, torch.device, torch.dtype], tuple[torch.Tensor, ...]]
    work: Callable[[dict, str, int], float]  # (size, pass, element bytes) -> bytes or FLOPs
    baseline: str = "torch"  # the provider the others are compared with

    def sweeps(self, mode: str) -> list[Sweep]:
        if mode not in SIZE_MODES:
            raise ValueError(f"unknown size mode {mode!r}: choose one of {', '.join(SIZE_MODES)}")
        if mode == "headline":
            return [Sweep("headline", next(iter(self.headline)), [self.headline])]
        return self.full if mode == "full" else self.small


def _pass_calls(forward: Callable[..., torch.Tensor], input_sets_: list[tuple[torch.Tensor, ...]],
                pass_: str) -> list[Callable[[], object]]:
    """One callable per input set doing ``pass_``; gradients are cleared so none accumulate."""
    if pass_ == "forward":
        return [lambda a=a: forward(*a) for a in input_sets_]
    calls = []
    for args in input_sets_:
        out = forward(*args)
        grad_out = torch.randn_like(out)

        def clear(args=args):
            for t in args:
                t.grad = None

        if pass_ == "backward":
            calls.append(lambda out=out, g=grad_out, clear=clear: (clear(), out.backward(g, retain_graph=True)))
        else:
            calls.append(lambda args=args, g=grad_out, clear=clear: (clear(), forward(*args).backward(g)))
    return calls


@dataclass
class PreparedCase:
    """A case ready to time: one callable per input set, each already run once, and its work."""

    calls: list[Callable[[], object]]
    work: float  # bytes or FLOPs of one call
    scale: float  # work per second over this is ``unit``
    first_calls_s: float  # the first run of every call: compilation and autotuning show here

    def figure(self, seconds: float) -> float:
        return self.work / seconds / self.scale


_built: dict[tuple, Callable[..., torch.Tensor]] = {}  # the last provider built, shared by its passes


def _provider(bench: KernelBench, provider: str, size: dict, device: torch.device) -> Callable[..., torch.Tensor]:
    """The provider's forward for this size; the three passes of a size share one (one compilation)."""
    key = (bench.name, provider, json.dumps(size, sort_keys=True), str(device))
    if key not in _built:
        _built.clear()
        _built[key] = bench.providers[provider](device)
    return _built[key]


def prepare_case(bench: KernelBench, provider: str, pass_: str, size: dict, device: torch.device,
                 dtype: torch.dtype) -> PreparedCase:
    """Build inputs and the provider's calls, and run each once (compiling, or raising if it cannot run)."""
    forward = _provider(bench, provider, size, device)
    one_set = bench.make_inputs(size, device, dtype)
    n_sets = input_sets(sum(t.numel() * t.element_size() for t in one_set), device)
    sets = [one_set] + [bench.make_inputs(size, device, dtype) for _ in range(n_sets - 1)]
    calls = _pass_calls(forward, sets, pass_)
    start = time.perf_counter()
    for call in calls:
        call()
    synchronize(device)
    return PreparedCase(calls, bench.work(size, pass_, one_set[0].element_size()),
                        1e9 if bench.unit == "GB/s" else 1e12, first_calls_s=time.perf_counter() - start)


def run_case(bench: KernelBench, provider: str, pass_: str, size: dict, device: torch.device,
             dtype: torch.dtype, ceiling: float | None, *, warmup_ms: float = WARMUP_MS,
             rep_ms: float = REP_MS) -> Record:
    """Time one (provider, pass, size); a provider that cannot run gives a record saying why."""
    record = Record(bench.name, provider, pass_, dict(size), unit=bench.unit)
    try:
        reset_peak_memory(device)
        case = prepare_case(bench, provider, pass_, size, device, dtype)
        timing = time_calls(case.calls, device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    except Exception as error:  # recorded, never raised: one broken provider must not stop a report
        record.status, record.note = failure_status(error)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return record
    record.ms = timing.median_ms
    record.value = case.figure(timing.median_ms * 1e-3)
    record.pct_of_ceiling = 100.0 * record.value / ceiling if ceiling else None
    record.peak_mb = peak_memory_mb(device)
    record.extra = {"min_ms": timing.min_ms, "max_ms": timing.max_ms, "repeats": timing.repeats,
                    "input_sets": len(case.calls), "first_calls_s": case.first_calls_s}
    return record


def compiled(eager: Callable[..., torch.Tensor]) -> ProviderFactory:
    """A provider factory: ``torch.compile`` of the eager code, compiled afresh for each size.

    Resetting Dynamo per size keeps every size static and away from the recompile limit, past
    which Dynamo would silently run the eager code.
    """
    def factory(device: torch.device) -> Callable[..., torch.Tensor]:
        torch._dynamo.reset()
        return torch.compile(eager, dynamic=False)
    return factory


def triton_backend(op: Callable[..., torch.Tensor]) -> ProviderFactory:
    """A provider factory: ``op`` of ``kernels`` under the "triton" backend (BackendError if it cannot)."""
    def factory(device: torch.device) -> Callable[..., torch.Tensor]:
        def forward(*args: torch.Tensor) -> torch.Tensor:
            with kernels.use_backend("triton"):
                return op(*args)
        return forward
    return factory


def eager(fn: Callable[..., torch.Tensor]) -> ProviderFactory:
    """A provider factory that returns ``fn`` as it is."""
    return lambda device: fn


def liger(import_path: str, attribute: str, extra_args: tuple = (), output: int | None = None) -> ProviderFactory:
    """A provider factory for a Liger-Kernel autograd function, Unavailable when Liger is missing.
    ``output``: the index of the result in the tuple the function returns, if it returns one."""
    def factory(device: torch.device) -> Callable[..., torch.Tensor]:
        if device.type != "cuda":
            raise Unavailable("Liger-Kernel runs on CUDA only")
        try:
            module = importlib.import_module(import_path)
        except ImportError as error:
            raise Unavailable(f"Liger-Kernel is not installed ({error})") from error
        function = getattr(module, attribute)
        if output is None:
            return lambda *args: function.apply(*args, *extra_args)
        return lambda *args: function.apply(*args, *extra_args)[output]
    return factory
