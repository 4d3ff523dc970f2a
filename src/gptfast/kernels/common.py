"""What every operation's file shares: the Triton import guard, the dtypes the kernels take, row
views and the row kernels' configuration, the SM count, and :func:`kernel_op`, which makes a launcher
a PyTorch custom operator.

A launcher allocates its outputs, launches its kernels through :func:`launch` and returns the
outputs. :func:`kernel_op` registers it as ``gptfast::<name>`` and derives the fake implementation
(the output shapes and dtypes ``torch.compile`` traces with) by running the same launcher on fake
tensors with the launches skipped: the allocation is written once, in the launcher.

Two hooks serve the kernel lab (``gptfast.lab``), which the kernels know nothing of:
:func:`capture_launches` records launches instead of running them, and :func:`targeting` makes the
launchers size grids (:func:`sm_count`) and pick configurations (:func:`target_gpu`) for a GPU that
need not be there.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from .backend import HAS_TRITON

T = TypeVar("T")

if HAS_TRITON:  # without Triton the kernels are defined but never launched (backend.route)
    import triton
    import triton.language as tl

    LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E): softmaxes run in base 2
    LN2 = tl.constexpr(0.6931471805599453)
else:
    triton = tl = None
    LOG2E, LN2 = 1.4426950408889634, 0.6931471805599453


def jit(fn=None, **options):
    """``triton.jit``, as ``@jit`` or ``@jit(do_not_specialize=[...])``; without Triton the function itself."""
    if fn is None:
        return lambda fn: jit(fn, **options)
    return triton.jit(fn, **options) if HAS_TRITON else fn


def jit_variant(kernel, **options):
    """A second handle on a jitted kernel's source, compiled with other ``triton.jit`` options (its
    own cache): for the rare argument values where the first handle's specialisation compiles badly."""
    return triton.jit(kernel.fn, **options) if HAS_TRITON else kernel


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Machine epsilon of TF32 (10 mantissa bits), in which tensor cores multiply float32 where a kernel
# lets them (``OpSpec.tf32``); float32's is torch.finfo(torch.float32).eps.
TF32_EPS = 2.0**-10

_fake = threading.local()  # .active: the launcher is running as a fake implementation
_lab = threading.local()  # .launches: the list capture_launches records into; .gpu: the targeted GPU


def tracing() -> bool:
    """True while a launcher runs as its op's fake implementation (tensors without data)."""
    return getattr(_fake, "active", False)


@dataclass(frozen=True)
class Launch:
    """One kernel launch as a launcher asked for it: ``kernel[grid](*args, **meta)``."""

    kernel: Callable
    grid: tuple[int, ...]
    args: tuple
    meta: dict


@dataclass(frozen=True, order=True)
class RowConfig:
    """The launch configuration of a row kernel (LayerNorm, bias + GELU): tiles of ``block_m`` rows by
    ``block_n`` columns, ``num_warps`` warps per program."""

    block_m: int
    block_n: int
    num_warps: int


ROW_FIELDS = ("BLOCK_M", "BLOCK_N", "num_warps")  # RowConfig's fields as launch parameters (the lab's --config)


@dataclass(frozen=True)
class GPU:
    """A GPU to choose launch configurations for without having one (the kernel lab's ``--arch``):
    compute capability ``arch`` (90 for 9.0), streaming multiprocessors, and the shared memory one
    block may use (the opt-in maximum, bytes)."""

    arch: int
    sm_count: int
    shared_memory: int


def launch(kernel, grid: tuple[int, ...], *args, **meta) -> None:
    """``kernel[grid](*args, **meta)``; recorded instead inside :func:`capture_launches`, skipped
    while the launcher runs as a fake implementation."""
    captured = getattr(_lab, "launches", None)
    if captured is not None:
        captured.append(Launch(kernel, tuple(grid), args, meta))
    elif not tracing():
        kernel[grid](*args, **meta)


@contextlib.contextmanager
def capture_launches() -> Iterator[list[Launch]]:
    """Within the block launches are not run but recorded, in order, in the list it yields. Run a
    launcher on tensors of device "meta" inside it to see exactly what it would launch."""
    previous, _lab.launches = getattr(_lab, "launches", None), []
    try:
        yield _lab.launches
    finally:
        _lab.launches = previous


@contextlib.contextmanager
def targeting(gpu: GPU) -> Iterator[GPU]:
    """Within the block launchers choose grids and configurations for ``gpu``, whatever the tensors'
    device (:func:`target_gpu`, :func:`sm_count`)."""
    previous, _lab.gpu = getattr(_lab, "gpu", None), gpu
    try:
        yield gpu
    finally:
        _lab.gpu = previous


class Switch(Generic[T]):
    """A setting that benchmarks change for a block (``with switch.set(value):``), read as ``switch.value``:
    how one path is timed against another. An attribute of a module-level object, not a ContextVar, so
    that torch.compile traces a model's read of it (and guards on it)."""

    def __init__(self, value: T) -> None:
        self.value = value

    @contextlib.contextmanager
    def set(self, value: T) -> Iterator[None]:
        before, self.value = self.value, value
        try:
            yield
        finally:
            self.value = before


def target_gpu() -> GPU | None:
    """The GPU set by :func:`targeting`, or None: then launchers configure for the tensors' device."""
    return getattr(_lab, "gpu", None)


def kernel_op(name: str) -> Callable[[Callable], torch.library.CustomOpDef]:
    """Decorator: the launcher becomes the custom operator ``gptfast::<name>`` (its schema read from
    the type hints), with the launcher itself, launches skipped, as its fake implementation."""
    def register(launcher: Callable) -> torch.library.CustomOpDef:
        op = torch.library.custom_op(f"gptfast::{name}", mutates_args=())(launcher)

        @functools.wraps(launcher)
        def fake(*args, **kwargs):
            previous, _fake.active = tracing(), True  # restored after: fakes nest (an op calling ops)
            try:
                return launcher(*args, **kwargs)
            finally:
                _fake.active = previous

        op.register_fake(fake)
        return op
    return register


def dtype_problem(tensors: dict[str, torch.Tensor | None], dtypes: tuple = KERNEL_DTYPES) -> str | None:
    """The first named tensor whose dtype the kernel does not take, as a reason, or None."""
    for name, t in tensors.items():
        if t is not None and t.dtype not in dtypes:
            takes = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            return f"{name} has dtype {t.dtype}; the kernel takes {takes}"
    return None


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device, or of the :func:`targeting` GPU; 4 under the
    interpreter, so that grids sized by it still have several programs to combine."""
    gpu = target_gpu()
    return gpu.sm_count if gpu is not None else _device_sm_count(device)


@functools.cache
def _device_sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a (rows, n) matrix with unit column stride, a view whenever the strides allow."""
    t = t.reshape(t.shape[:-1].numel(), t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1). Launchers use these two plain-Python helpers
    rather than Triton's, which change form between versions, so traced shapes work with any."""
    return 1 << max(int(n) - 1, 0).bit_length()


def cdiv(n: int, d: int) -> int:
    """n / d rounded up: the number of blocks of d that cover n."""
    return (n + d - 1) // d
