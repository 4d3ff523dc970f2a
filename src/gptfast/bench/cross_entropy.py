"""Cross-entropy on LM-head logits: our Triton kernels against F.cross_entropy as autocast runs it
(on a float32 copy of the logits), its torch.compile, and Liger-Kernel's.

GB/s count the fewest bytes: the forward reads the logits (and the targets); the backward reads
the logits and writes their gradient. Liger computes the gradient inside its forward (overwriting the
logits), so its backward is nearly free and its forward does both passes' work: compare
forward+backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptfast import kernels

from .kernel_bench import KernelBench, Sweep, compiled, eager, liger, triton_backend


def _triton(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return kernels.cross_entropy(logits, targets, check_targets=False)  # no host sync, as in the model


def _eager(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=-1)


def _inputs(size: dict, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    logits = torch.randn(size["rows"], size["vocab"], device=device, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, size["vocab"], (size["rows"],), device=device)
    return logits, targets


def _bytes(size: dict, elem: int) -> tuple[float, float]:
    rows, vocab = size["rows"], size["vocab"]
    return rows * vocab * elem + rows * 8, 2 * rows * vocab * elem + rows * 8


BENCH = KernelBench(
    name="cross_entropy",
    unit="GB/s",
    # Vocabularies padded to a multiple of 64, as the model's LM head pads GPT-2's 50,257 to 50,304.
    full=[Sweep("rows=16384", "vocab", [dict(rows=16384, vocab=v) for v in (8192, 32768, 50304, 128256)])],
    small=[Sweep("rows=24", "vocab", [dict(rows=24, vocab=v) for v in (96, 300)])],
    headline=dict(rows=16384, vocab=50304),  # GPT-2 124M: 16 x 1024 tokens, its padded vocabulary
    providers={
        "triton": triton_backend(_triton),
        "torch": eager(_eager),
        "torch.compile": compiled(_eager),
        "liger": liger("liger_kernel.ops.cross_entropy", "LigerCrossEntropyFunction", (None, -1), output=0),
    },
    make_inputs=_inputs,
    work=_bytes,
)
