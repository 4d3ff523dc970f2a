"""The public operation: its checks, what the kernels cannot take, and the backend switch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import backend
from ..common import KERNEL_DTYPES
from .launch import DECODE_ROWS, _forward, decodes, dropout_seed
from .reference import causal_mask, visible_mask

MAX_HEAD_DIM = 128
MAX_BATCH_HEADS = 65535  # the kernels' second grid axis


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout_p: float,
                  key_start: torch.Tensor | None, key_end: torch.Tensor | None = None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"flash_attention: {name} must be a 4-D (batch, heads, seq, head_dim) "
                             f"tensor, got {shape}")
    if q.shape[:2] != k.shape[:2] or k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"flash_attention: shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} (need equal batch, heads and head_dim; k and v equal)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash_attention: dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: devices differ: q {q.device}, k {k.device}, v {v.device}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"flash_attention: dropout_p must be in [0, 1), got {dropout_p}")
    if causal and q.shape[-2] > k.shape[-2]:
        raise ValueError(f"flash_attention: causal attention needs at least as many keys as "
                         f"queries, got {q.shape[-2]} queries and {k.shape[-2]} keys")
    for name, bound in (("key_start", key_start), ("key_end", key_end)):
        if bound is not None:
            _check_key_bound(name, bound, q)


def _check_key_bound(name: str, bound: torch.Tensor, q: torch.Tensor) -> None:
    """key_start / key_end: an integer tensor of one count per batch row, on q's device."""
    if not isinstance(bound, torch.Tensor) or bound.dtype not in (torch.int32, torch.int64):
        kind = bound.dtype if isinstance(bound, torch.Tensor) else type(bound).__name__
        raise ValueError(f"flash_attention: {name} must be an int32 or int64 tensor, got {kind}")
    if tuple(bound.shape) != (q.shape[0],):
        raise ValueError(f"flash_attention: {name} must have shape ({q.shape[0]},), one count per "
                         f"batch row, got {tuple(bound.shape)}")
    if bound.device != q.device:
        raise ValueError(f"flash_attention: {name} is on {bound.device}, q on {q.device}")


def _kernel_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    dropout_p: float = 0.0, scale: float | None = None,
                    key_start: torch.Tensor | None = None, key_end: torch.Tensor | None = None,
                    deterministic: bool = True) -> str | None:
    """Why the Triton kernel cannot take these (already validated) inputs, or None."""
    if key_end is not None and not decodes(q, dropout_p):
        return f"key_end with {q.shape[-2]} queries or dropout: only the decode kernels (at most {DECODE_ROWS} " \
               "queries, no dropout) take it"
    if key_end is not None and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return "key_end with gradients: the backward kernels do not take it"
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype} (the kernel takes float16, bfloat16 and float32)"
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        return "bfloat16 on CPU: the Triton interpreter computes bfloat16 dot products wrongly"
    if q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) < (8, 0):
        major, minor = torch.cuda.get_device_capability(q.device)
        return f"compute capability {major}.{minor}: the kernels are tuned for 8.0 (Ampere) and newer"
    head_dim = q.shape[-1]
    if head_dim > MAX_HEAD_DIM or head_dim % 2:
        return f"head_dim {head_dim} (the kernel takes even head dims up to {MAX_HEAD_DIM})"
    batch_heads = q.shape[0] * q.shape[1]
    if q.shape[-2] == 0 or k.shape[-2] == 0 or batch_heads == 0:
        return f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}"
    if batch_heads > MAX_BATCH_HEADS:
        return f"batch x heads = {batch_heads} is over {MAX_BATCH_HEADS}"
    return None


@backend.routed(_kernel_problem)
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    dropout_p: float = 0.0, scale: float | None = None,
                    key_start: torch.Tensor | None = None, key_end: torch.Tensor | None = None,
                    deterministic: bool = True) -> torch.Tensor:
    """Softmax(q k^T * scale) v, through the backend switch.

    q: (batch, heads, Tq, head_dim); k, v: (batch, heads, Tk, head_dim) with Tk >= Tq when causal.
    ``scale`` defaults to 1 / sqrt(head_dim). ``dropout_p`` drops attention probabilities.
    ``key_start``: int tensor (batch,), keys [0, key_start[b]) of batch row b are hidden (left
    padding; negative counts as 0). ``key_end``: int tensor (batch,), keys [key_end[b], Tk) of row b
    are hidden and the causal diagonal ends at key_end[b] (decoding into a cache allocated at full
    length, whose length is a tensor). Queries that see no key output zeros.

    ``deterministic=False`` lets the Triton backward, where its float32 dQ workspace would pass
    ``launch.DQ_WORKSPACE_LIMIT`` (long sequences), add dQ up with atomics instead of a kernel that
    recomputes the scores (5 matmuls per score instead of 7), but dQ may differ in its last bits from
    run to run, so a resumed training run is no longer bitwise the same. The eager path ignores it (see
    ``torch.use_deterministic_algorithms``).
    """
    _check_inputs(q, k, v, causal, dropout_p, key_start, key_end)
    if backend.route(flash_attention, q, k, v, causal, dropout_p, scale, key_start, key_end, deterministic):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        seed = dropout_seed() if dropout_p > 0 else None
        key_start = None if key_start is None else key_start.contiguous()
        key_end = None if key_end is None else key_end.contiguous()
        return _forward(q, k, v, causal, float(dropout_p), scale, seed, key_start, key_end, bool(deterministic))[0]
    q_len, k_len = q.shape[-2], k.shape[-2]
    if key_start is not None or key_end is not None:
        # Rows that see no key attend to every key instead (no NaN, forward or backward), then give 0.
        mask = visible_mask(q_len, k_len, causal, key_start, q.device, key_end)
        blind = ~mask.any(-1, keepdim=True)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | blind, dropout_p=dropout_p,
                                             scale=scale)
        return out.masked_fill(blind, 0.0)
    if causal and q_len != k_len:
        mask = causal_mask(q_len, k_len, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)
