"""``lab check``: an op's forward and backward at a shape against its float64 reference.

For the output and every input's gradient: the kernel's largest absolute error from the float64
reference, the same error of PyTorch's eager op run in the same dtype, and their ratio; it passes
at most 2x (flash attention's rule). The eager error is floored at 8 float32 roundings of the
reference's largest value (the kernels compute in float32, in another order and sometimes another
form, e.g. GELU through a sigmoid), so that a float32 eager result does not demand the same bits.
The op then runs again on the same inputs: its results must be bit-identical (determinism).
Kernels run under the Triton interpreter on a CPU, compiled on a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gptfast import kernels

from .compiler import LabError
from .ops import bias_gelu, cross_entropy, flash_attention, layer_norm

SMALL_SHAPES = {"layer_norm": (64, 300), "bias_gelu": (64, 300), "cross_entropy": (16, 1000, 997),
                "flash_attention": (1, 2, 64, 32)}  # the default under the interpreter: seconds, not hours


@dataclass(frozen=True)
class Comparison:
    tensor: str  # "output", "dx", ...
    error: float
    eager_error: float
    ratio: float

    @property
    def passed(self) -> bool:
        return self.ratio <= 2.0


def _inputs(op: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*size, scale=1.0, shift=0.0):
        return (torch.randn(size, generator=g, dtype=torch.float64) * scale + shift).to(device, dtype)

    if op in ("layer_norm", "bias_gelu"):
        rows, cols = shape
        inputs = {"x": randn(rows, cols)}
        if op == "layer_norm":
            inputs["weight"] = randn(cols, scale=0.1, shift=1.0)
        inputs["bias"] = randn(cols, scale=0.1)
        return inputs
    if op == "cross_entropy":
        rows, cols, classes = (*shape, shape[1])[:3]
        targets = torch.randint(0, classes, (rows,), generator=g).to(device)
        return {"logits": randn(rows, cols, scale=2.0), "targets": targets, "classes": classes}
    batch, heads, q_len, head_dim, k_len = (*shape, shape[2])[:5]
    return {"q": randn(batch, heads, q_len, head_dim), "k": randn(batch, heads, k_len, head_dim),
            "v": randn(batch, heads, k_len, head_dim)}


def _functions(op: str, inputs: dict) -> tuple[Callable, Callable, Callable]:
    """(kernel, float64 reference, same-dtype eager PyTorch), each over the differentiable inputs."""
    if op == "layer_norm":
        return (lambda x, w, b: kernels.layer_norm(x, w, b), layer_norm.layer_norm_reference,
                lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b))
    if op == "bias_gelu":
        return (lambda x, b: kernels.bias_gelu(x, b), bias_gelu.bias_gelu_reference,
                lambda x, b: F.gelu(x + b, approximate="tanh"))
    if op == "cross_entropy":
        targets, classes = inputs["targets"], inputs["classes"]
        return (lambda x: kernels.cross_entropy(x, targets, reduction="none", num_classes=classes),
                lambda x: cross_entropy.cross_entropy_reference(x[:, :classes], targets),
                lambda x: F.cross_entropy(x[:, :classes], targets, reduction="none"))
    return (lambda q, k, v: kernels.flash_attention(q, k, v, causal=True),
            lambda q, k, v: flash_attention.attention_reference(q, k, v, causal=True),
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] == k.shape[2],
                                                           attn_mask=None if q.shape[2] == k.shape[2] else
                                                           flash_attention.causal_mask(q.shape[2], k.shape[2])))


def _run(fn: Callable, leaves: list[torch.Tensor], grad: torch.Tensor | None, dtype: torch.dtype | None
         ) -> list[torch.Tensor]:
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in leaves]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype) if grad is not None else None)
    return [out.detach(), *(t.grad for t in leaves)]


def check(op: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> tuple[list[Comparison], bool]:
    """The comparisons (output, then each gradient) and whether a rerun was bit-identical."""
    inputs = _inputs(op, shape, dtype, device)
    leaves = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    kernel, reference, eager = _functions(op, inputs)
    ref_out = reference(*[t.double() for t in leaves])
    grad = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    want = _run(reference, leaves, grad, torch.float64)
    with kernels.use_backend("triton"):
        got = _run(kernel, leaves, grad, None)
        again = _run(kernel, leaves, grad, None)
    eager_got = _run(eager, leaves, grad, None)
    names = ["output", *(f"d{name}" for name, t in inputs.items() if any(t is leaf for leaf in leaves))]
    comparisons = []
    for name, g, e, w in zip(names, got, eager_got, want):
        error = (g.double() - w).abs().max().item()
        floor = 8 * torch.finfo(torch.float32).eps * w.abs().max().item()
        eager_error = max((e.double() - w).abs().max().item(), floor)
        comparisons.append(Comparison(name, error, eager_error, error / eager_error if eager_error else math.inf))
    return comparisons, all(torch.equal(a, b) for a, b in zip(got, again))


def format_check(op: str, shape: tuple, dtype: torch.dtype, device: torch.device,
                 comparisons: list[Comparison], deterministic: bool) -> str:
    mode = "compiled on the GPU" if device.type == "cuda" else "under the Triton interpreter"
    lines = [f"{op} {str(dtype).removeprefix('torch.')} shape {','.join(map(str, shape))}, {mode}:",
             f"{'tensor':<10} {'max error':>11} {'eager error':>12} {'ratio':>7}  (pass: ratio <= 2)"]
    for c in comparisons:
        lines.append(f"{c.tensor:<10} {c.error:>11.3e} {c.eager_error:>12.3e} {c.ratio:>7.2f}  "
                     f"{'pass' if c.passed else 'FAIL'}")
    lines.append(f"rerun bit-identical: {'yes' if deterministic else 'NO'}")
    return "\n".join(lines)


def check_problem(op: str, dtype: torch.dtype, device: torch.device) -> str | None:
    if op == "flash_attention" and dtype == torch.bfloat16 and device.type == "cpu":
        return ("flash_attention in bfloat16 cannot be checked on a CPU: the Triton interpreter computes "
                "bfloat16 dot products wrongly (use --dtype fp16 or fp32, or a GPU)")
    return None


def run_check(op: str, shape: tuple, dtype: torch.dtype) -> tuple[str, bool]:
    """(the report, passed) of :func:`check` on the device the kernels run on here."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problem = check_problem(op, dtype, device)
    if problem:
        raise LabError(problem)
    comparisons, deterministic = check(op, shape, dtype, device)
    passed = deterministic and all(c.passed for c in comparisons)
    return format_check(op, shape, dtype, device, comparisons, deterministic), passed
