"""Bias + GELU (tanh): our fused Triton kernel against the bias add then F.gelu, and its torch.compile.

GB/s count the fewest bytes: the forward reads x and bias and writes y; the backward reads x, bias
and dy and writes dx and dbias. Liger-Kernel has no bias + GELU operation to compare with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptfast import kernels

from .kernel_bench import KernelBench, Sweep, compiled, eager, triton_backend


def _eager(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.gelu(x + bias, approximate="tanh")


def _inputs(size: dict, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    x = torch.randn(size["rows"], size["hidden"], device=device, dtype=dtype, requires_grad=True)
    bias = (0.1 * torch.randn(size["hidden"], device=device, dtype=dtype)).requires_grad_()
    return x, bias


def _bytes(size: dict, elem: int) -> tuple[float, float]:
    rows, hidden = size["rows"], size["hidden"]
    return (2 * rows * hidden + hidden) * elem, (3 * rows * hidden + 2 * hidden) * elem


BENCH = KernelBench(
    name="bias_gelu",
    unit="GB/s",
    full=[Sweep("rows=16384", "hidden", [dict(rows=16384, hidden=h) for h in (3072, 4096, 5120, 6400)]),
          Sweep("hidden=3072", "rows", [dict(rows=r, hidden=3072) for r in (4096, 8192, 16384, 32768, 65536)])],
    small=[Sweep("rows=24", "hidden", [dict(rows=24, hidden=h) for h in (128, 300)])],
    headline=dict(rows=16384, hidden=3072),  # GPT-2 124M's MLP: 16 x 1024 tokens, 4 x 768 wide
    providers={
        "triton": triton_backend(lambda x, b: kernels.bias_gelu(x, b, approximate="tanh")),
        "torch": eager(_eager),
        "torch.compile": compiled(_eager),
    },
    make_inputs=_inputs,
    work=_bytes,
)
