"""What a kernel benchmark is, and how one (provider, pass, size) is timed.

Each kernel's file (``gptfast/bench/layer_norm.py``...) describes its sizes, its providers (our Triton
kernel and the baselines) and the work it must do, as a :class:`KernelBench`. The passes are
timed the same way for every kernel: the forward alone, the backward alone (from a recorded
forward, ``retain_graph``), and the forward then the backward.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gptfast import kernels

from .harness import REP_MS, WARMUP_MS, Record, Unavailable, measure_record

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
    work: Callable[[dict, int], tuple[float, float]]  # (size, element bytes) -> forward's, backward's bytes or FLOPs
    baseline: str = "torch"  # the provider the others are compared with
    passes: tuple[str, ...] = PASSES  # what is timed; an inference-only kernel has the forward alone
    targets: tuple[dict, ...] = ()  # other full sizes with a target of their own: the GPU run times them early

    def sweeps(self, mode: str) -> list[Sweep]:
        if mode not in SIZE_MODES:
            raise ValueError(f"unknown size mode {mode!r}: choose one of {', '.join(SIZE_MODES)}")
        if mode == "headline":
            return [Sweep("headline", next(iter(self.headline)), [self.headline])]
        return self.full if mode == "full" else self.small

    def sizes(self, mode: str) -> list[dict]:
        """The sizes of all sweeps, each once (sweeps may share a point)."""
        sizes: list[dict] = []
        for sweep in self.sweeps(mode):
            sizes += [s for s in sweep.sizes if s not in sizes]
        return sizes

    def pass_work(self, size: dict, pass_: str, element_bytes: int) -> float:
        forward, backward = self.work(size, element_bytes)
        return {"forward": forward, "backward": backward, "forward+backward": forward + backward}[pass_]


def pass_call(forward: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], pass_: str
              ) -> Callable[[], object]:
    """A call doing ``pass_`` on ``inputs`` (the timing clears their gradients between calls)."""
    if pass_ == "forward":
        return lambda: forward(*inputs)
    out = forward(*inputs)
    grad_out = torch.randn_like(out)
    if pass_ == "backward":
        return lambda: out.backward(grad_out, retain_graph=True)
    return lambda: forward(*inputs).backward(grad_out)


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
