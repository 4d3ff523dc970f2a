"""The plain-math attention the kernels are tested against (call it on float64 inputs), and the masks
it and the eager path share."""

from __future__ import annotations

import math

import torch


def causal_mask(q_len: int, k_len: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean (q_len, k_len) mask, True where a query may attend, aligned bottom-right."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


def visible_mask(q_len: int, k_len: int, causal: bool, key_start: torch.Tensor | None,
                 device: torch.device | None = None, key_end: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask, True where a query may attend: (q_len, k_len), or (batch, 1, q_len, k_len)
    with ``key_start``, which hides each batch row's first ``key_start[b]`` keys, or ``key_end``,
    which hides its keys from ``key_end[b]`` on (a static cache's unfilled slots) and aligns the
    causal diagonal with that end: the last query sits at key ``key_end[b] - 1``."""
    keys, queries = torch.arange(k_len, device=device), torch.arange(q_len, device=device)[:, None]
    end = k_len if key_end is None else key_end.to(device)[:, None, None, None]
    mask = keys < end
    if causal:
        mask = mask & (keys <= queries + (end - q_len))
    if key_start is not None:
        mask = mask & (keys >= key_start.to(device)[:, None, None, None])
    return mask


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        scale: float | None = None, keep_mask: torch.Tensor | None = None,
                        dropout_p: float = 0.0, key_start: torch.Tensor | None = None,
                        key_end: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-math attention, for tests (call it on float64 inputs).

    ``keep_mask`` (broadcastable to (B, H, Tq, Tk), True = kept) applies dropout with the given
    mask, scaling kept probabilities by 1 / (1 - dropout_p). Rows that see no key give zeros.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    mask = visible_mask(q.shape[-2], k.shape[-2], causal, key_start, q.device, key_end)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).masked_fill(~mask.any(-1, keepdim=True), 0.0)
    if keep_mask is not None:
        probs = probs * keep_mask / (1.0 - dropout_p)
    return probs @ v
