"""The dropout keep-mask the flash-attention kernels draw, materialised for tests: the reference
attention applies it to check the kernels' output and gradients with dropout exactly."""

from __future__ import annotations

import importlib

import torch

from gptfast.kernels.common import cdiv, jit, tl

_dropout_keep = importlib.import_module("gptfast.kernels.flash_attention.kernels")._dropout_keep


@jit
def _dropout_keep_kernel(KEEP, q_len, k_len, dropout_p, seed, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Write the keep-mask the attention kernels draw, as int8 (batch x heads, q_len, k_len)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    bh = tl.program_id(2)
    keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], dropout_p)
    mask = (rows[:, None] < q_len) & (cols[None, :] < k_len)
    KEEP += bh.to(tl.int64) * q_len * k_len
    tl.store(KEEP + rows[:, None] * k_len + cols[None, :], keep.to(tl.int8), mask=mask)


def dropout_keep_mask(seed: int | torch.Tensor, batch: int, heads: int, q_len: int, k_len: int,
                      dropout_p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """The boolean (batch, heads, q_len, k_len) keep-mask the kernels draw for ``seed``.

    It materialises the whole score-sized mask: meant for small sizes only.
    """
    keep = torch.empty((batch, heads, q_len, k_len), dtype=torch.int8, device=device)
    block = 32
    grid = (cdiv(q_len, block), cdiv(k_len, block), batch * heads)
    _dropout_keep_kernel[grid](keep, q_len, k_len, dropout_p, int(seed), BLOCK_M=block, BLOCK_N=block)
    return keep.bool()
