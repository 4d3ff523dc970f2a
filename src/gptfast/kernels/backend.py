"""The backend switch: the one place that decides whether an operation runs its Triton kernel.

Three backends:

* ``"auto"`` (default): the Triton kernel for CUDA tensors the kernel supports, eager PyTorch otherwise.
* ``"triton"``: always the Triton kernel; an input it cannot take raises :class:`BackendError`, so a
  benchmark can never measure the eager path by accident. CPU tensors work only under the Triton
  interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is imported), which is how tests run kernels.
* ``"torch"``: always eager PyTorch.

Set it with :func:`set_backend`, the context manager :func:`use_backend`, or the environment
variable ``GPTFAST_BACKEND`` (read at import, checked when first needed, so that a bad value names
itself in one ValueError rather than breaking ``import gptfast``). :func:`explain` tells which path an
operation takes for given inputs and why, :class:`Route` whether that path runs or is refused. Each
operation registers a check that names what its kernel cannot take (:func:`routed`,
:func:`kernel_problem`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "triton", "torch")

# Read once: Triton decides at import time whether kernels are interpreted.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None


class BackendError(RuntimeError):
    """The "triton" backend was asked to run an input its kernel cannot take."""


def _validate(name: str, source: str = "") -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    return name


ENVIRONMENT_VARIABLE = "GPTFAST_BACKEND"
_ENVIRONMENT = os.environ.get(ENVIRONMENT_VARIABLE, "").strip().lower() or "auto"
_backend: str | None = None  # None: $GPTFAST_BACKEND's, checked by the first get_backend()


def get_backend() -> str:
    """The backend in force: "auto", "triton" or "torch"; a ValueError naming $GPTFAST_BACKEND when it
    holds none of them and no backend was set."""
    global _backend
    if _backend is None:
        _backend = _validate(_ENVIRONMENT, f"{ENVIRONMENT_VARIABLE}: ")
    return _backend


def set_backend(name: str) -> None:
    """Select the backend for every operation from now on."""
    global _backend
    _backend = _validate(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Select a backend inside a ``with`` block, restoring the previous one afterwards."""
    global _backend
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        _backend = previous


@dataclass(frozen=True)
class Route:
    """Which path an operation takes for some inputs, and why."""

    op: str
    backend: str
    use_triton: bool
    reason: str

    @property
    def refused(self) -> bool:
        """The "triton" backend cannot run these inputs: the operation raises :class:`BackendError`."""
        return self.backend == "triton" and not self.use_triton

    def __str__(self) -> str:
        if self.refused:
            return f"{self.op}: refused, the 'triton' backend cannot run it ({self.reason})"
        return f"{self.op}: {'triton' if self.use_triton else 'torch'} ({self.reason})"


_CHECKS: dict[Callable, Callable[..., str | None]] = {}


def routed(check: Callable[..., str | None]) -> Callable[[Callable], Callable]:
    """Decorator of a public operation: ``check(*args, **kwargs)``, called with the operation's
    arguments, returns None when the Triton kernel takes them, else the reason it cannot.
    :func:`route` and :func:`explain` consult it, keyed by the operation itself."""
    def register(op: Callable) -> Callable:
        _CHECKS[op] = check
        return op
    return register


def _operation(op: Callable | str) -> Callable:
    """The registered operation ``op``, given as itself or by its name."""
    by_name = {registered.__name__: registered for registered in _CHECKS}
    found = by_name.get(op) if isinstance(op, str) else op
    if found not in _CHECKS:
        name = op if isinstance(op, str) else getattr(op, "__name__", repr(op))
        raise ValueError(f"unknown operation {name!r}: known are {', '.join(sorted(by_name))}")
    return found


def _device_problem(tensors: list[torch.Tensor]) -> str | None:
    """Why Triton cannot run on these tensors' device, or None."""
    if not HAS_TRITON:
        return "Triton is not installed"
    devices = {t.device for t in tensors}
    if not devices:
        return None
    if len(devices) > 1:
        return f"inputs are on different devices: {sorted(str(d) for d in devices)}"
    device = next(iter(devices))
    if device.type == "cuda":
        return None
    if device.type == "cpu" and TRITON_INTERPRET:
        return None
    return f"tensors on {device.type} (Triton kernels need CUDA, or TRITON_INTERPRET=1 for CPU tensors)"


def kernel_problem(op: Callable | str, *args, **kwargs) -> str | None:
    """What ``op``'s Triton kernel cannot take in these arguments (its registered check), whatever the
    backend and the tensors' device; None when it takes them."""
    return _CHECKS[_operation(op)](*args, **kwargs)


def explain(op: Callable | str, *args, **kwargs) -> Route:
    """Which path ``op`` takes for these arguments under the current backend, and why.

    ``op`` is a public operation or its name, the arguments are its own, e.g.
    ``explain(kernels.layer_norm, x, weight, bias)`` or ``explain("layer_norm", x, weight, bias)``.
    """
    op = _operation(op)
    name = op.__name__
    backend = get_backend()
    if backend == "torch":
        return Route(name, backend, False, 'backend is "torch"')
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    off_cuda = sorted({t.device.type for t in tensors if t.device.type != "cuda"})
    if backend == "auto" and off_cuda:
        return Route(name, backend, False, f"tensors on {', '.join(off_cuda)}: auto runs kernels on CUDA only")
    problem = _device_problem(tensors) or kernel_problem(op, *args, **kwargs)
    if problem is None:
        return Route(name, backend, True, "the Triton kernel supports these inputs")
    return Route(name, backend, False, problem)


def route(op: Callable, *args, **kwargs) -> bool:
    """True when ``op`` should run its Triton kernel; raises BackendError on "triton" if it cannot."""
    decision = explain(op, *args, **kwargs)
    if decision.refused:
        raise BackendError(
            f"{decision.op}: the 'triton' backend cannot run this input: {decision.reason}. "
            "Use backend 'auto' to fall back to eager PyTorch for such inputs."
        )
    return decision.use_triton
