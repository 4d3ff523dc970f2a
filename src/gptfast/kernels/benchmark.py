"""What an op's benchmark is: its sizes, its providers (our Triton kernel and the baselines) and the
work each pass must do, as a :class:`KernelBench` that the op's spec declares. ``gptfast.bench`` times
them (``kernel_bench.run_case``) and writes the report; nothing here measures.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import backend

PASSES = ("forward", "backward", "forward+backward")
SIZE_MODES = ("small", "full", "headline")


class Unavailable(Exception):
    """A provider (a baseline, a kernel, a compiler) cannot run here; the message says why."""


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
    shape_of: Callable[[dict], tuple[int, ...]] | None = None  # a size as the op's shape; None: its values in order
    size_of: Callable[[tuple[int, ...]], dict] | None = None  # its inverse; None: the headline's keys in order

    def shape_for(self, size: dict) -> tuple[int, ...]:
        """``size`` as the op's shape (its spec's ``shape_names`` order)."""
        return self.shape_of(size) if self.shape_of else tuple(size.values())

    def size_for(self, shape: tuple[int, ...]) -> dict:
        """The size of the op's ``shape`` (``lab bench``, ``lab tune``)."""
        return self.size_of(shape) if self.size_of else dict(zip(self.headline, shape))

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
            with backend.use_backend("triton"):
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
