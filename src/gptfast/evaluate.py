"""Evaluation: a model's mean next-token loss over consecutive windows of a split.

``gptfast eval`` reports it for a checkpoint or pretrained GPT-2; training validates with it over
the first windows of the validation split, the batches dealt out over its processes.
"""

from __future__ import annotations

import numpy as np
import torch

from .data import BatchStream
from .distributed import World
from .precision import autocast


@torch.no_grad()
def split_loss(model: torch.nn.Module, tokens: np.ndarray, context_length: int, batch_size: int = 16,
               max_windows: int | None = None, amp_dtype: torch.dtype | None = None,
               ctx: World | None = None) -> tuple[float, int]:
    """Mean next-token loss of ``model`` over ``tokens`` cut into consecutive windows of
    ``context_length`` (every whole window, or the first ``max_windows``), and how many tokens that is.
    Under several processes (``ctx``) the batches are dealt out by rank and the sums combined; every
    process runs as many forward passes (FSDP's gather each block's weights together), one left without
    a batch of its own running the first again, uncounted.
    """
    if batch_size < 1 or (max_windows is not None and max_windows < 1):
        raise ValueError(f"batch_size ({batch_size}) and max_windows ({max_windows}) must be positive")
    stream = BatchStream(tokens, context_length, order="sequential", split="evaluated")
    windows = (len(tokens) - 1) // context_length
    windows = windows if max_windows is None else min(windows, max_windows)
    ctx = ctx or World()
    starts = stream.next_starts(windows).split(batch_size)
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        mine = starts[ctx.rank::ctx.size]
        for i in range(-(-len(starts) // ctx.size)):
            x, y = stream.batch(mine[i] if i < len(mine) else starts[0], device)
            with autocast(device.type, amp_dtype):
                _, loss = model(x, y)
            total += loss.double() * y.numel() * (i < len(mine))
    finally:
        model.train(was_training)
    return (ctx.mean(total) * ctx.size / (windows * context_length)).item(), windows * context_length
