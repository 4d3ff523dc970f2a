"""LayerNorm: our Triton kernel against F.layer_norm, its torch.compile and Liger-Kernel's.

GB/s count the fewest bytes the pass must move: the forward reads x, weight and bias and writes y;
the backward reads x, dy and weight and writes dx, dweight and dbias (saved statistics not counted).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptfast import kernels

from .kernel_bench import KernelBench, Sweep, compiled, eager, liger, triton_backend

EPS = 1e-5


def _eager(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, EPS)


def _inputs(size: dict, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    rows, hidden = size["rows"], size["hidden"]
    x = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
    weight = (1 + 0.1 * torch.randn(hidden, device=device, dtype=dtype)).requires_grad_()
    bias = (0.1 * torch.randn(hidden, device=device, dtype=dtype)).requires_grad_()
    return x, weight, bias


def _bytes(size: dict, elem: int) -> tuple[float, float]:
    rows, hidden = size["rows"], size["hidden"]
    return (2 * rows * hidden + 2 * hidden) * elem, (3 * rows * hidden + 3 * hidden) * elem


BENCH = KernelBench(
    name="layer_norm",
    unit="GB/s",
    full=[Sweep("rows=16384", "hidden", [dict(rows=16384, hidden=h) for h in
                                          (768, 1024, 1280, 1600, 2048, 3072, 4096, 5120, 6400)]),
          Sweep("hidden=768", "rows", [dict(rows=r, hidden=768) for r in (4096, 8192, 16384, 32768, 65536)])],
    small=[Sweep("rows=24", "hidden", [dict(rows=24, hidden=h) for h in (96, 300)])],
    headline=dict(rows=16384, hidden=768),  # GPT-2 124M: batch 16 x context 1024 rows
    providers={
        "triton": triton_backend(lambda x, w, b: kernels.layer_norm(x, w, b, EPS)),
        "torch": eager(_eager),
        "torch.compile": compiled(_eager),
        "liger": liger("liger_kernel.ops.layer_norm", "LigerLayerNormFunction", (EPS,)),
    },
    make_inputs=_inputs,
    work=_bytes,
)
