"""``lab check``: an op's forward and backward at a shape against its float64 reference.

For the output and every input's gradient: the kernel's largest absolute error from the float64
reference, the same error of PyTorch's eager op run in the same dtype, and their ratio; it passes
at most 2x (flash attention's rule). The eager error is floored at 8 float32 roundings of the
reference's largest value (the kernels compute in float32, in another order and sometimes another
form, e.g. GELU through a sigmoid), so that a float32 eager result does not demand the same bits;
at 8 TF32 roundings for float32 inputs of an op whose kernels multiply them in TF32 on a GPU
(``OpSpec.tf32``: attention), while eager PyTorch multiplies them in full float32.
The op then runs again on the same inputs: its results must be bit-identical (determinism).
Kernels run under the Triton interpreter on a CPU, compiled on a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gptfast import kernels
from gptfast.kernels.common import TF32_EPS
from gptfast.kernels.registry import get_spec
from gptfast.kernels.spec import OpSpec

from .compiler import LabError
from .ops import check_inputs, refusals_as_lab_errors


@dataclass(frozen=True)
class Comparison:
    tensor: str  # "output", "dx", ...
    error: float
    eager_error: float
    ratio: float

    @property
    def passed(self) -> bool:
        return self.ratio <= 2.0


def _spec(op: OpSpec | str) -> OpSpec:
    return get_spec(op) if isinstance(op, str) else op


def _run(fn: Callable, inputs: dict, grad: torch.Tensor | None, dtype: torch.dtype | None) -> list[torch.Tensor]:
    """``fn`` over the inputs by name, its floating-point tensors as fresh leaves (cast to ``dtype`` if
    given), then backward: the output and each leaf's gradient."""
    leaves = {name: t.detach().to(dtype or t.dtype).requires_grad_() for name, t in inputs.items()
              if isinstance(t, torch.Tensor) and t.is_floating_point()}
    out = fn(**{**inputs, **leaves})
    out.backward(grad.to(out.dtype) if grad is not None else None)
    return [out.detach(), *(t.grad for t in leaves.values())]


def _rounding(spec: OpSpec, dtype: torch.dtype, device: torch.device) -> float:
    """The machine epsilon of the kernels' float32 arithmetic: TF32's in the matrix products of a
    ``tf32`` op on float32 inputs on a GPU, float32's otherwise."""
    if spec.tf32 and dtype == torch.float32 and device.type == "cuda":
        return TF32_EPS
    return torch.finfo(torch.float32).eps


def check(op: OpSpec | str, shape: tuple, dtype: torch.dtype, device: torch.device,
          options: dict | None = None) -> tuple[list[Comparison], bool]:
    """The comparisons (output, then each gradient) of the op's kernels at ``shape`` (with the op's
    ``options``, as ``lab inspect --option`` takes them) against its float64 reference, and whether a
    rerun was bit-identical; a LabError when the op refuses the shape."""
    spec = _spec(op)
    name = str(dtype).removeprefix("torch.")
    check_inputs(spec, shape, name, options or {})
    with refusals_as_lab_errors(spec, shape, name):
        return _compare(spec, shape, dtype, device, options)


def _compare(spec: OpSpec, shape: tuple, dtype: torch.dtype, device: torch.device,
             options: dict | None) -> tuple[list[Comparison], bool]:
    inputs = spec.inputs(shape, dtype, device, options, torch.Generator(device="cpu").manual_seed(0))
    kernel, reference, eager = spec.compared
    ref_out = reference(**{k: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                           for k, t in inputs.items()})
    grad = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    want = _run(reference, inputs, grad, torch.float64)
    with kernels.use_backend("triton"):
        got = _run(kernel, inputs, grad, None)
        again = _run(kernel, inputs, grad, None)
    eager_got = _run(eager, inputs, grad, None)
    names = ["output", *(f"d{name}" for name, t in inputs.items()
                         if isinstance(t, torch.Tensor) and t.is_floating_point())]
    comparisons = []
    for name, g, e, w in zip(names, got, eager_got, want):
        error = (g.double() - w).abs().max().item()
        floor = 8 * _rounding(spec, dtype, device) * w.abs().max().item()
        eager_error = max((e.double() - w).abs().max().item(), floor)
        comparisons.append(Comparison(name, error, eager_error, error / eager_error if eager_error else math.inf))
    return comparisons, all(torch.equal(a, b) for a, b in zip(got, again))


def format_check(op: str, shape: tuple, dtype: torch.dtype, device: torch.device,
                 comparisons: list[Comparison], deterministic: bool) -> str:
    """The report of :func:`check`: a line per compared tensor, then determinism."""
    mode = "compiled on the GPU" if device.type == "cuda" else "under the Triton interpreter"
    lines = [f"{op} {str(dtype).removeprefix('torch.')} shape {','.join(map(str, shape))}, {mode}:",
             f"{'tensor':<10} {'max error':>11} {'eager error':>12} {'ratio':>7}  (pass: ratio <= 2)"]
    for c in comparisons:
        lines.append(f"{c.tensor:<10} {c.error:>11.3e} {c.eager_error:>12.3e} {c.ratio:>7.2f}  "
                     f"{'pass' if c.passed else 'FAIL'}")
    lines.append(f"rerun bit-identical: {'yes' if deterministic else 'NO'}")
    return "\n".join(lines)


def check_problem(op: OpSpec | str, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the op's kernels cannot be checked in ``dtype`` on ``device``, or None."""
    return _spec(op).check_problem(dtype, device)


def run_check(op: OpSpec | str, shape: tuple, dtype: torch.dtype) -> tuple[str, bool]:
    """(the report, passed) of :func:`check` on the device the kernels run on here."""
    spec = _spec(op)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problem = check_problem(spec, dtype, device)
    if problem:
        raise LabError(problem)
    comparisons, deterministic = check(spec, shape, dtype, device)
    passed = deterministic and all(c.passed for c in comparisons)
    return format_check(spec.name, shape, dtype, device, comparisons, deterministic), passed
