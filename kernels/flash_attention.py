"""Scaled dot-product attention over (batch, heads, seq, head_dim) tensors, causal by default.

With fewer queries than keys (decoding with a key/value cache) the causal mask is aligned
bottom-right: the last query sees every key, query i sees keys up to ``i + (Tk - Tq)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import backend


def causal_mask(q_len: int, k_len: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean (q_len, k_len) mask, True where a query may attend, aligned bottom-right."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        scale: float | None = None, keep_mask: torch.Tensor | None = None,
                        dropout_p: float = 0.0) -> torch.Tensor:
    """Plain-math attention, for tests (call it on float64 inputs).

    ``keep_mask`` (broadcastable to (B, H, Tq, Tk), True = kept) applies dropout with the given
    mask, scaling kept probabilities by 1 / (1 - dropout_p).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if keep_mask is not None:
        probs = probs * keep_mask / (1.0 - dropout_p)
    return probs @ v


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> None:
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


def _kernel_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    dropout_p: float = 0.0, scale: float | None = None) -> str | None:
    return "no Triton flash-attention kernel is built yet"


backend.register("flash_attention", _kernel_problem)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """Softmax(q k^T * scale) v, through the backend switch.

    q: (batch, heads, Tq, head_dim); k, v: (batch, heads, Tk, head_dim) with Tk >= Tq when causal.
    ``scale`` defaults to 1 / sqrt(head_dim). ``dropout_p`` drops attention probabilities.
    """
    _check_inputs(q, k, v, dropout_p)
    backend.route("flash_attention", q, k, v, causal, dropout_p, scale)  # kernel: its own issue
    q_len, k_len = q.shape[-2], k.shape[-2]
    if causal and q_len != k_len:
        if q_len > k_len:
            raise ValueError(f"flash_attention: causal attention needs at least as many keys as "
                             f"queries, got {q_len} queries and {k_len} keys")
        mask = causal_mask(q_len, k_len, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)
