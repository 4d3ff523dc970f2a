"""What every operation's file shares: the Triton import guard, the dtypes the kernels take, row
views, the SM count, and :func:`kernel_op`, which makes a launcher a PyTorch custom operator.

A launcher allocates its outputs, launches its kernels through :func:`launch` and returns the
outputs. :func:`kernel_op` registers it as ``gptfast::<name>`` and derives the fake implementation
(the output shapes and dtypes ``torch.compile`` traces with) by running the same launcher on fake
tensors with the launches skipped: the allocation is written once, in the launcher.
"""

from __future__ import annotations

import functools
import threading
from typing import Callable

import torch

from .backend import HAS_TRITON

if HAS_TRITON:  # without Triton the kernels are defined but never launched (backend.route)
    import triton
    import triton.language as tl

    LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E): softmaxes run in base 2
    LN2 = tl.constexpr(0.6931471805599453)
else:
    triton = tl = None
    LOG2E, LN2 = 1.4426950408889634, 0.6931471805599453

jit = triton.jit if HAS_TRITON else (lambda fn: fn)

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_fake = threading.local()  # .active: the launcher is running as a fake implementation


def tracing() -> bool:
    """True while a launcher runs as its op's fake implementation (tensors without data)."""
    return getattr(_fake, "active", False)


def launch(kernel, grid: tuple[int, ...], *args, **meta) -> None:
    """``kernel[grid](*args, **meta)``, skipped while the launcher runs as a fake implementation."""
    if not tracing():
        kernel[grid](*args, **meta)


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


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 under the interpreter, so that grids sized by it
    still have several programs to combine."""
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
