"""Scaled dot-product attention over (batch, heads, seq, head_dim) tensors, causal by default.

With fewer queries than keys (decoding with a key/value cache) the causal mask is aligned
bottom-right: the last query sees every key, query i sees keys up to ``i + (Tk - Tq)``.
``key_start`` (one integer per batch row) hides that row's leading keys, the left padding of a
batch of prompts of different lengths. A query that sees no key at all (a padding query) outputs
zeros and gets zero gradients, never NaN.

The Triton path is a flash attention: the (Tq, Tk) score matrix is never stored. The forward pass
walks over key blocks with an online softmax and saves one log-sum-exp per query row; the backward
pass recomputes the probabilities from it. Extra memory is O(batch x heads x seq) at any length.
By default three backward kernels, none with atomics, so gradients are identical run to run:

* ``_attention_bwd_delta_kernel``: delta_i = dot(dO_i, O_i), one float per query row;
* ``_attention_bwd_kv_kernel``: one key block per program, looping over the query blocks that see it;
* ``_attention_bwd_q_kernel``: one query block per program, looping over the key blocks it sees.

``deterministic=False`` drops the third: the dK/dV kernel also adds each tile's share of dQ into a
float32 dQ with atomics (FlashAttention-2's 5 matrix products and 1 exponential per score, not 7
and 2), and the order of those additions, so dQ's last bits, varies from run to run.

Decoding (at most ``DECODE_ROWS`` queries, no dropout) takes a split-key forward instead
(flash-decoding): the keys are cut into chunks, enough that batch x heads x chunks programs fill
every SM, each program writing its chunk's partial output and log-sum-exp, and a small reduction
combines them in chunk order (no atomics). Only it takes ``key_end``; the backward is the same.

Under the causal mask the work per program grows with the query block (forward, dQ) and shrinks
with the key block (dK, dV): programs are mapped to blocks so that the heaviest are launched first
and the light ones fill the last wave, rather than a few heavy ones running alone at the end.

Dropout on the probabilities draws one Philox number per (batch x head, query, key) from a seed,
so the backward kernels regenerate the forward's mask exactly whatever their block sizes. The
seed comes from torch's default generator: ``torch.manual_seed`` makes dropout reproducible.

The block sizes and launch parameters are data: one JSON table per GPU class in ``configs/``
(``load_table`` and ``write_table`` read and write them), the class chosen by the GPU's shared
memory per block (``table_for``).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from . import backend, common
from .common import KERNEL_DTYPES, LN2, LOG2E, cdiv, jit, kernel_op, launch, next_power_of_2, target_gpu, tl, tracing


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


# ---------------------------------------------------------------------------------------------
# Triton kernels. Every tile is (rows, HEAD_DIM_PAD): head dims that are not a power of two are
# padded inside the kernel by masking the loads (zeros) and stores, never by copying the inputs.
# q, k, v and dO are read through their strides, from base pointers offset once per program to its
# (batch, head); O, dQ, dK, dV are contiguous outputs.
#
# Each kernel loops over the blocks one program needs in three spans (``_key_range`` and
# ``_query_range`` name them): the blocks at the edges (the first real key, the causal diagonal,
# the sequence ends) are masked, the blocks between them need no mask. The spans are unrolled at
# compile time (``tl.static_range``), so each gets its own loop, the middle one without masking.
# ---------------------------------------------------------------------------------------------

# The dropout seed is random: were it specialised, the first 16-divisible seed (one in 16) would
# compile each dropout kernel again mid-run, to code the ahead-of-time checks never saw.
SEED = ["seed"]


@jit
def _load_tile(ptrs, rows, n_rows, HEAD_DIM: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Load the (rows, HEAD_DIM_PAD) tile at ``ptrs``; zeros past ``n_rows`` (if CHECK_ROWS) and
    past HEAD_DIM.

    Full tiles of power-of-two head dims load without a mask, which keeps them vectorisable.
    """
    HEAD_DIM_PAD: tl.constexpr = ptrs.shape[1]
    dims = tl.arange(0, HEAD_DIM_PAD)
    if CHECK_ROWS:
        mask = rows[:, None] < n_rows
        if HEAD_DIM < HEAD_DIM_PAD:
            mask = mask & (dims[None, :] < HEAD_DIM)
        tile = tl.load(ptrs, mask=mask, other=0.0)
    elif HEAD_DIM < HEAD_DIM_PAD:
        tile = tl.load(ptrs, mask=dims[None, :] < HEAD_DIM, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@jit
def _store_tile(ptrs, tile, rows, n_rows, HEAD_DIM: tl.constexpr):
    """Store the valid rows and head dims of a (rows, HEAD_DIM_PAD) tile."""
    HEAD_DIM_PAD: tl.constexpr = ptrs.shape[1]
    mask = rows[:, None] < n_rows
    if HEAD_DIM < HEAD_DIM_PAD:
        mask = mask & (tl.arange(0, HEAD_DIM_PAD)[None, :] < HEAD_DIM)
    tl.store(ptrs, tile, mask=mask)


@jit
def _visible(q_idx, k_idx, q_len, k_len, key_start, CAUSAL: tl.constexpr):
    """Which keys exist, are not padding and may be attended by the queries; the causal diagonal
    is bottom-right.

    Query rows past q_len need no mask: they are never stored, and in the backward pass their
    zero-loaded dO makes their contributions to dK and dV zero.
    """
    ok = (k_idx < k_len) & (k_idx >= key_start)
    if CAUSAL:
        ok = ok & (k_idx <= q_idx + (k_len - q_len))
    return ok


@jit
def _dropout_keep(seed, bh, q_idx, k_idx, dropout_p):
    """Philox keep-mask of the probabilities at (q_idx, k_idx) of (batch x head) ``bh``.

    The counter is (key, query, batch x head, 0): every probability draws its own number at any
    sequence length, with 32-bit arithmetic only.
    """
    k_idx, q_idx = tl.broadcast(k_idx, q_idx)
    zero = tl.zeros_like(k_idx)
    bits, _, _, _ = tl.philox(seed, k_idx.to(tl.uint32), q_idx.to(tl.uint32), (zero + bh).to(tl.uint32),
                              zero.to(tl.uint32))
    return tl.uint_to_uniform_float(bits) >= dropout_p


@jit
def _key_range(start_m, q_len, k_len, key_start, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Keys that queries [start_m, start_m + BLOCK_M) attend to, as (lo, mid, full_end, end):
    [lo, mid) is the block holding the first real key ``key_start``, masked; [mid, full_end) needs
    no mask (every key exists and is visible to every query of the block); [full_end, end) needs
    one. Blocks of padding before ``lo`` and blocks wholly above the causal diagonal past ``end``
    are skipped, not masked."""
    full_end = k_len // BLOCK_N * BLOCK_N
    end = k_len
    if CAUSAL:
        first_pos = start_m + (k_len - q_len)  # key position of the block's first query
        full_end = tl.minimum(full_end, (first_pos + 1) // BLOCK_N * BLOCK_N)
        end = tl.minimum(end, first_pos + BLOCK_M)
    lo = key_start // BLOCK_N * BLOCK_N
    mid = tl.maximum(lo, tl.minimum(tl.cdiv(key_start, BLOCK_N) * BLOCK_N, full_end))
    return lo, mid, tl.maximum(mid, full_end), end


@jit
def _query_range(start_n, q_len, k_len, key_start, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Queries that see keys [start_n, start_n + BLOCK_N), as (lo, diag_end, full_end, end):
    [lo, diag_end) straddles the causal diagonal and is masked (all of [lo, end) if the key block
    holds padding or keys past k_len); [diag_end, full_end) sees the whole key block and needs no mask (empty if
    full_end <= diag_end); [max(diag_end, full_end), end) holds the last, partial query block,
    masked. Query blocks before ``lo`` see none of the keys and are skipped, as is every query
    block if the key block is padding only."""
    end = tl.cdiv(q_len, BLOCK_M) * BLOCK_M
    full_end = q_len // BLOCK_M * BLOCK_M
    lo = 0
    diag_end = 0
    if CAUSAL:
        offset = k_len - q_len  # query i sits at key position i + offset
        lo = tl.maximum(start_n - offset, 0) // BLOCK_M * BLOCK_M
        diag_end = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M, end)
    # Unmasked, keys past k_len would score 0: their dS (harmless to dK/dV, never stored) could
    # overflow into an atomic dQ as inf x a zero key = NaN. Such a block is masked throughout.
    diag_end = tl.where((start_n < key_start) | (start_n + BLOCK_N > k_len), end, diag_end)
    lo = tl.where(start_n + BLOCK_N <= key_start, end, lo)
    return lo, diag_end, full_end, end


@jit
def _span(lo, mid, full_end, end, SPAN: tl.constexpr):
    """Bounds of span SPAN of a range from ``_key_range`` or ``_query_range``: 0 is [lo, mid)
    (masked), 1 is [mid, full_end) (unmasked, empty if full_end <= mid), 2 is
    [max(mid, full_end), end) (masked)."""
    start, stop = lo, mid
    if SPAN == 1:
        start, stop = mid, full_end
    if SPAN == 2:
        start, stop = tl.maximum(mid, full_end), end
    return start, stop


@jit
def _load_key_start(KEY_START, batch):
    """Keys of this batch row hidden as padding (0 without KEY_START; negative counts as 0)."""
    key_start = 0
    if KEY_START is not None:
        key_start = tl.maximum(tl.load(KEY_START + batch).to(tl.int32), 0)
    return key_start


@jit
def _scores(q, k, rows, cols, q_len, k_len, key_start, qk_scale, CAUSAL: tl.constexpr, MASKED: tl.constexpr):
    """q k^T * qk_scale (float32; the forward passes 1.0 and folds the scale into its exp2 argument);
    with MASKED, keys a query cannot see (causal, padding, past k_len) score -inf."""
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if MASKED:
        s = tl.where(_visible(rows[:, None], cols[None, :], q_len, k_len, key_start, CAUSAL), s, float("-inf"))
    return s


@jit(do_not_specialize=SEED)
def _attention_fwd_kernel(Q, K, V, OUT, LSE, KEY_START,
                          stride_qb, stride_qh, stride_qt, stride_qd,
                          stride_kb, stride_kh, stride_kt, stride_kd,
                          stride_vb, stride_vh, stride_vt, stride_vd,
                          n_heads, q_len, k_len, scale, dropout_p, seed,
                          HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr):
    """One program per (query block, batch x head): O = softmax(Q K^T * scale) V and the row LSE.

    Q is read once, K and V once per query block (from the row's first real key), with an online
    softmax over the key blocks; O and LSE are written once. KEY_START (or None): per batch row,
    the number of leading padding keys. ``scale`` must be positive (``_positive_scale``).
    """
    # The last query blocks see the most keys under the causal mask: launch them first.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    batch, head = (bh // n_heads).to(tl.int64), (bh % n_heads).to(tl.int64)
    Q += batch * stride_qb + head * stride_qh
    K += batch * stride_kb + head * stride_kh
    V += batch * stride_vb + head * stride_vh
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM_PAD)
    q = _load_tile(Q + rows[:, None] * stride_qt + dims[None, :] * stride_qd, rows, q_len, HEAD_DIM, True)

    # Defined in the order the key loops carry them: another order costs sm_90 registers (Triton 3.9).
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running softmax denominator
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row maximum (log2 units)
    qk_scale = scale * LOG2E
    key_start = _load_key_start(KEY_START, batch)
    lo, mid, full_end, end = _key_range(start_m, q_len, k_len, key_start, CAUSAL, BLOCK_M, BLOCK_N)
    for span in tl.static_range(3):  # masked, unmasked, masked (_span)
        MASKED = span != 1
        span_start, span_end = _span(lo, mid, full_end, end, span)
        for start_n in range(span_start, span_end, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            k = _load_tile(K + cols[:, None] * stride_kt + dims[None, :] * stride_kd, cols, k_len, HEAD_DIM, MASKED)
            s = _scores(q, k, rows, cols, q_len, k_len, key_start, 1.0, CAUSAL, MASKED)  # unscaled
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # qk_scale > 0 (_positive_scale)
            m_ref = m_new
            if MASKED:  # a row that has seen no key yet keeps m = -inf: subtract 0 so p = 0, not NaN
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s * qk_scale - m_ref[:, None])
            alpha = tl.math.exp2(m_i - m_ref)  # rescales what earlier blocks accumulated
            l_i = l_i * alpha + tl.sum(p, 1)  # the normaliser counts dropped probabilities too
            if DROPOUT:
                p = tl.where(_dropout_keep(seed, bh, rows[:, None], cols[None, :], dropout_p), p, 0.0)
            v = _load_tile(V + cols[:, None] * stride_vt + dims[None, :] * stride_vd, cols, k_len, HEAD_DIM, MASKED)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
    # A row that sees no key (padding) has l_i = 0: it outputs zeros, and its LSE is +inf so that
    # the backward pass recomputes its probabilities as exp(s - inf) = 0.
    seen = l_i > 0
    l_i = tl.where(seen, l_i, 1.0)  # acc is 0 on such rows
    inv_l = 1.0 / l_i
    if DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    o = acc * inv_l[:, None]
    OUT += bh.to(tl.int64) * q_len * HEAD_DIM
    _store_tile(OUT + rows[:, None] * HEAD_DIM + dims[None, :], o.to(OUT.dtype.element_ty), rows, q_len, HEAD_DIM)
    lse = tl.where(seen, (m_i + tl.math.log2(l_i)) * LN2, float("inf"))  # natural log
    tl.store(LSE + bh.to(tl.int64) * q_len + rows, lse, mask=rows < q_len)


@jit
def _attention_bwd_delta_kernel(OUT, DO, DELTA, stride_dob, stride_doh, stride_dot, stride_dod,
                                n_heads, q_len, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                                BLOCK_M: tl.constexpr):
    """delta_i = dot(dO_i, O_i) = rowsum(P * dP): reads O and dO once, writes one float per row."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    batch, head = (bh // n_heads).to(tl.int64), (bh % n_heads).to(tl.int64)
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM_PAD)
    o = _load_tile(OUT + bh.to(tl.int64) * q_len * HEAD_DIM + rows[:, None] * HEAD_DIM + dims[None, :],
                   rows, q_len, HEAD_DIM, True)
    do = _load_tile(DO + batch * stride_dob + head * stride_doh + rows[:, None] * stride_dot
                    + dims[None, :] * stride_dod, rows, q_len, HEAD_DIM, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * q_len + rows, delta, mask=rows < q_len)


@jit(do_not_specialize=SEED)
def _attention_bwd_kv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, KEY_START, DQ_SUM,
                             stride_qb, stride_qh, stride_qt, stride_qd,
                             stride_kb, stride_kh, stride_kt, stride_kd,
                             stride_vb, stride_vh, stride_vt, stride_vd,
                             stride_dob, stride_doh, stride_dot, stride_dod,
                             n_heads, q_len, k_len, scale, dropout_p, seed,
                             HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr):
    """One program per (key block, batch x head): dK and dV of the block, written once.

    K and V stay in on-chip memory; Q, dO, LSE and delta are read once per key block that needs them.
    The tiles are transposed, (key, query), so that dK and dV come out of the dots row by key. The
    first key blocks are the heaviest under the causal mask (every later query sees them) and they
    are launched first. DQ_SUM (or None: the deterministic backward): a zeroed float32 dQ that each
    program adds its share of dQ to by atomics, which saves the dQ kernel's recomputation of the
    scores but makes the order of the additions, and so dQ's last bits, vary run to run.
    """
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    batch, head = (bh // n_heads).to(tl.int64), (bh % n_heads).to(tl.int64)
    Q += batch * stride_qb + head * stride_qh
    K += batch * stride_kb + head * stride_kh
    V += batch * stride_vb + head * stride_vh
    DO += batch * stride_dob + head * stride_doh
    LSE += bh.to(tl.int64) * q_len
    DELTA += bh.to(tl.int64) * q_len
    if DQ_SUM is not None:
        DQ_SUM += bh.to(tl.int64) * q_len * HEAD_DIM
    cols = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM_PAD)
    k = _load_tile(K + cols[:, None] * stride_kt + dims[None, :] * stride_kd, cols, k_len, HEAD_DIM, True)
    v = _load_tile(V + cols[:, None] * stride_vt + dims[None, :] * stride_vd, cols, k_len, HEAD_DIM, True)
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
    qk_scale = scale * LOG2E
    key_start = _load_key_start(KEY_START, batch)
    lo, diag_end, full_end, end = _query_range(start_n, q_len, k_len, key_start, CAUSAL, BLOCK_M, BLOCK_N)
    # The unmasked span first: after a masked loop, ptxas serialises this kernel's wgmma (C7515, sm_90).
    for i in tl.static_range(3):
        span = (i + 1) % 3  # unmasked, last partial block (masked), causal diagonal (masked)
        MASKED = span != 1
        span_start, span_end = _span(lo, diag_end, full_end, end, span)
        for start_m in range(span_start, span_end, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            q = _load_tile(Q + rows[:, None] * stride_qt + dims[None, :] * stride_qd, rows, q_len, HEAD_DIM, MASKED)
            do = _load_tile(DO + rows[:, None] * stride_dot + dims[None, :] * stride_dod, rows, q_len, HEAD_DIM,
                            MASKED)
            if MASKED:
                lse = tl.load(LSE + rows, mask=rows < q_len, other=0.0)
                delta = tl.load(DELTA + rows, mask=rows < q_len, other=0.0)
            else:
                lse = tl.load(LSE + rows)
                delta = tl.load(DELTA + rows)
            s_t = tl.dot(k, tl.trans(q)) * qk_scale
            if MASKED:
                s_t = tl.where(_visible(rows[None, :], cols[:, None], q_len, k_len, key_start, CAUSAL), s_t,
                               float("-inf"))
            p_t = tl.math.exp2(s_t - lse[None, :] * LOG2E)  # probabilities, recomputed (0 where LSE = inf)
            dp_t = tl.dot(v, tl.trans(do))  # dL/d(dropped P), transposed
            if DROPOUT:
                keep_t = _dropout_keep(seed, bh, rows[None, :], cols[:, None], dropout_p)
                dv += tl.dot(tl.where(keep_t, p_t, 0.0).to(do.dtype), do)
                dp_t = tl.where(keep_t, dp_t / (1.0 - dropout_p), 0.0)
            else:
                dv += tl.dot(p_t.to(do.dtype), do)
            ds_t = p_t * (dp_t - delta[None, :])  # softmax backward
            dk += tl.dot(ds_t.to(q.dtype), q)
            if DQ_SUM is not None:  # this key block's share of the query block's dQ, added in place
                dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k) * scale
                dq_mask = (rows[:, None] < q_len) & (dims[None, :] < HEAD_DIM)
                tl.atomic_add(DQ_SUM + rows[:, None] * HEAD_DIM + dims[None, :], dq, mask=dq_mask, sem="relaxed")
    if DROPOUT:
        dv = dv / (1.0 - dropout_p)
    dk = dk * scale
    out = bh.to(tl.int64) * k_len * HEAD_DIM + cols[:, None] * HEAD_DIM + dims[None, :]
    _store_tile(DK + out, dk.to(DK.dtype.element_ty), cols, k_len, HEAD_DIM)
    _store_tile(DV + out, dv.to(DV.dtype.element_ty), cols, k_len, HEAD_DIM)


# A backward over one query: Triton would compile q_len == 1 as a constant, fold the unmasked span away
# and lead with the masked loop, and ptxas would serialise the wgmma (C7515, sm_90). This handle keeps
# q_len a runtime integer; other lengths keep the first, whose 16-divisible hint widens the LSE loads.
_attention_bwd_kv_one_query_kernel = common.jit_variant(_attention_bwd_kv_kernel,
                                                        do_not_specialize=[*SEED, "q_len"])


@jit(do_not_specialize=SEED)
def _attention_bwd_q_kernel(Q, K, V, DO, LSE, DELTA, DQ, KEY_START,
                            stride_qb, stride_qh, stride_qt, stride_qd,
                            stride_kb, stride_kh, stride_kt, stride_kd,
                            stride_vb, stride_vh, stride_vt, stride_vd,
                            stride_dob, stride_doh, stride_dot, stride_dod,
                            n_heads, q_len, k_len, scale, dropout_p, seed,
                            HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr):
    """One program per (query block, batch x head): dQ of the block, written once.

    Q, dO, LSE and delta stay on chip; K and V are read once per query block, as in the forward.
    """
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # longest rows first
    bh = tl.program_id(1)
    batch, head = (bh // n_heads).to(tl.int64), (bh % n_heads).to(tl.int64)
    Q += batch * stride_qb + head * stride_qh
    K += batch * stride_kb + head * stride_kh
    V += batch * stride_vb + head * stride_vh
    DO += batch * stride_dob + head * stride_doh
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM_PAD)
    q = _load_tile(Q + rows[:, None] * stride_qt + dims[None, :] * stride_qd, rows, q_len, HEAD_DIM, True)
    do = _load_tile(DO + rows[:, None] * stride_dot + dims[None, :] * stride_dod, rows, q_len, HEAD_DIM, True)
    row_ok = rows < q_len
    lse2 = tl.load(LSE + bh.to(tl.int64) * q_len + rows, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + bh.to(tl.int64) * q_len + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    qk_scale = scale * LOG2E
    key_start = _load_key_start(KEY_START, batch)
    lo, mid, full_end, end = _key_range(start_m, q_len, k_len, key_start, CAUSAL, BLOCK_M, BLOCK_N)
    for span in tl.static_range(3):  # masked, unmasked, masked (_span)
        MASKED = span != 1
        span_start, span_end = _span(lo, mid, full_end, end, span)
        for start_n in range(span_start, span_end, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            k = _load_tile(K + cols[:, None] * stride_kt + dims[None, :] * stride_kd, cols, k_len, HEAD_DIM, MASKED)
            # V is loaded before the first dot: loaded after it, float32 tiles spill on Triton 3.6.
            v = _load_tile(V + cols[:, None] * stride_vt + dims[None, :] * stride_vd, cols, k_len, HEAD_DIM, MASKED)
            s = _scores(q, k, rows, cols, q_len, k_len, key_start, qk_scale, CAUSAL, MASKED)
            p = tl.math.exp2(s - lse2[:, None])
            dp = tl.dot(do, tl.trans(v))
            if DROPOUT:
                keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], dropout_p)
                dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
    dq = dq * scale
    _store_tile(DQ + bh.to(tl.int64) * q_len * HEAD_DIM + rows[:, None] * HEAD_DIM + dims[None, :],
                dq.to(DQ.dtype.element_ty), rows, q_len, HEAD_DIM)


@jit
def _attention_decode_kernel(Q, K, V, PART_OUT, PART_LSE, KEY_START, KEY_END,
                             stride_qb, stride_qh, stride_qt, stride_qd,
                             stride_kb, stride_kh, stride_kt, stride_kd,
                             stride_vb, stride_vh, stride_vt, stride_vd,
                             n_heads, q_len, k_len, scale, chunk,
                             HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """One program per (key chunk, batch x head) for all q_len <= BLOCK_M queries (decoding): the
    chunk's output, normalised within the chunk (float32), and its LSE (log2 units, -inf where the
    chunk holds no visible key). KEY_END (or None): per batch row, the end of its keys, the causal
    diagonal aligned with it. ``scale`` must be positive (``_positive_scale``)."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    batch, head = (bh // n_heads).to(tl.int64), (bh % n_heads).to(tl.int64)
    Q += batch * stride_qb + head * stride_qh
    K += batch * stride_kb + head * stride_kh
    V += batch * stride_vb + head * stride_vh
    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM_PAD)
    q = _load_tile(Q + rows[:, None] * stride_qt + dims[None, :] * stride_qd, rows, q_len, HEAD_DIM, True)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    qk_scale = scale * LOG2E
    key_start = _load_key_start(KEY_START, batch)
    key_end = k_len
    if KEY_END is not None:
        key_end = tl.minimum(tl.maximum(tl.load(KEY_END + batch).to(tl.int32), 0), k_len)
    lo = tl.maximum(split * chunk, key_start // BLOCK_N * BLOCK_N)
    for start_n in range(lo, tl.minimum(split * chunk + chunk, key_end), BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K + cols[:, None] * stride_kt + dims[None, :] * stride_kd, cols, key_end, HEAD_DIM, True)
        s = _scores(q, k, rows, cols, q_len, key_end, key_start, 1.0, CAUSAL, True)  # unscaled
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s * qk_scale - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(V + cols[:, None] * stride_vt + dims[None, :] * stride_vd, cols, key_end, HEAD_DIM, True)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    seen = l_i > 0
    l_i = tl.where(seen, l_i, 1.0)  # acc is 0 on rows that saw no key of the chunk
    part = (bh * tl.num_programs(0) + split).to(tl.int64) * q_len
    _store_tile(PART_OUT + (part + rows[:, None]) * HEAD_DIM + dims[None, :], acc / l_i[:, None], rows, q_len, HEAD_DIM)
    tl.store(PART_LSE + part + rows, tl.where(seen, m_i + tl.math.log2(l_i), float("-inf")), mask=rows < q_len)


@jit
def _attention_decode_reduce_kernel(PART_OUT, PART_LSE, OUT, LSE, n_splits, q_len, HEAD_DIM: tl.constexpr,
                                    HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr):
    """One program per (query, batch x head): the chunks' outputs weighted by their share of the
    softmax, summed in chunk order (no atomics: identical run to run), and the row's LSE."""
    row = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    parts = (bh * n_splits + splits) * q_len + row
    lse = tl.load(PART_LSE + parts, mask=splits < n_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    weight = tl.math.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    seen = tl.sum(weight, 0) > 0
    total = tl.where(seen, tl.sum(weight, 0), 1.0)
    mask = (splits[:, None] < n_splits) & (dims[None, :] < HEAD_DIM)
    o = tl.load(PART_OUT + parts[:, None] * HEAD_DIM + dims[None, :], mask=mask, other=0.0)
    o = tl.sum(o * weight[:, None], 0) / total
    tl.store(OUT + (bh * q_len + row) * HEAD_DIM + dims, o.to(OUT.dtype.element_ty), mask=dims < HEAD_DIM)
    tl.store(LSE + bh * q_len + row, tl.where(seen, (m + tl.math.log2(total)) * LN2, float("inf")))


# ---------------------------------------------------------------------------------------------
# Block sizes: one table per GPU class (named by the compute capability it was made for, chosen by
# the shared memory one block may use), kept as data in configs/flash_attention_sm<table>.json with
# an entry per padded head dim and element size. load_table and write_table read and write them.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockConfig:
    """Tile shape and launch parameters of one kernel: BLOCK_M query rows by BLOCK_N key rows."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 1


@dataclass(frozen=True)
class AttentionConfigs:
    """The configurations of the forward kernel (plain and masked) and the backward kernels for one input kind."""

    forward: BlockConfig
    forward_masked: BlockConfig  # the forward with dropout or key_start: their masks take registers
    backward_kv: BlockConfig  # one key block (BLOCK_N) per program, loops over query blocks
    backward_q: BlockConfig  # one query block (BLOCK_M) per program, loops over key blocks
    backward_kv_atomic: BlockConfig  # the dK/dV kernel adding dQ up too (deterministic=False)


@dataclass(frozen=True)
class ConfigTable:
    """One GPU class's configurations by (head_dim_pad, element_size), and how they were chosen."""

    source: str
    configs: dict[tuple[int, int], AttentionConfigs]


# Under the interpreter tiles are small and unequal, so that short test sequences cross many block
# boundaries and both the masked and the unmasked loops run.
INTERPRETER_CONFIGS = AttentionConfigs(BlockConfig(32, 16), BlockConfig(32, 16), BlockConfig(16, 32),
                                       BlockConfig(32, 16), BlockConfig(16, 32))
# The tables, with the shared memory one block may use where they apply (the opt-in maximum):
# A100-class parts (8.0, 8.7); the smaller Ampere and Ada parts (8.6, 8.9: RTX 30xx/40xx, A10, L4,
# L40S) and any other part with less shared memory; Hopper (9.0, and later parts with as much).
SHARED_MEMORY = {80: 163 * 1024, 86: 99 * 1024, 90: 227 * 1024}
ARCHES = tuple(SHARED_MEMORY)
HEAD_DIM_PADS = (16, 32, 64, 128)
ELEMENT_SIZES = (2, 4)  # float16 and bfloat16 share their entries; float32
TABLE_KEYS = tuple(itertools.product(HEAD_DIM_PADS, ELEMENT_SIZES))  # the entries every table has
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# How the shipped entries were made: each tile keeps its float32 scores and accumulators in
# registers and streams K/V (forward, dQ) or Q/dO (dK, dV) through shared memory, multi-buffered
# over num_stages. 128-row tiles feed Hopper's 64-row wgmma instructions from two warp groups, or
# from one (sm_90's 16-bit forward at head dims up to 64 without dropout or key_start: 4 warps
# issue fewer instructions per score). The 99 KiB parts share the A100's 16-bit entries (at most
# 80 KiB) and take smaller float32 tiles. The dK/dV kernel holds two float32 accumulators of
# BLOCK_N x head_dim, so its key block shrinks where
# registers run short (Ampere keeps mma operands in registers too). float32 inputs multiply in TF32
# on tensor cores (float32 accumulation) with smaller tiles, as they take twice the space. Each
# entry was compiled ahead of time (the dropout variant, at the largest head dim it serves; the
# plain causal one for ``forward``); ``tests/test_aot_flash_attention.py`` checks every entry for
# spills and shared memory.

_KERNEL_FIELDS = tuple(f.name for f in fields(AttentionConfigs))
_BLOCK_FIELDS = tuple(f.name for f in fields(BlockConfig))
_ENTRY_FIELDS = ("head_dim_pad", "element_size", *_KERNEL_FIELDS)
_ONE_LINE_OBJECT = re.compile(r"\{\n\s*([^{}\[\]]*?)\n\s*\}")  # an object holding no object or list


def table_for(major: int, minor: int, shared_memory: int | None) -> int:
    """The table (a key of SHARED_MEMORY) for a GPU of compute capability major.minor with
    ``shared_memory`` bytes per block (opt-in maximum); None: guessed from the capability."""
    if shared_memory is None:
        known = {(8, 0): 80, (8, 7): 80, (9, 0): 90}
        shared_memory = SHARED_MEMORY[known.get((major, minor), 86)]
    if major >= 9 and shared_memory >= SHARED_MEMORY[90]:
        return 90
    return 80 if shared_memory >= SHARED_MEMORY[80] else 86


def table_path(table: int) -> Path:
    """The JSON file of ``table`` (a key of SHARED_MEMORY)."""
    return CONFIG_DIR / f"flash_attention_sm{table}.json"


def _block_config(value, where: str) -> BlockConfig:
    if not (isinstance(value, dict) and sorted(value) == sorted(_BLOCK_FIELDS)
            and all(type(v) is int and v > 0 for v in value.values())):
        raise ValueError(f"{where}: needs {', '.join(_BLOCK_FIELDS)} as positive integers, got {value!r}")
    return BlockConfig(**value)


def _parse_table(data, path: Path) -> ConfigTable:
    """The ConfigTable of a table's JSON value; ValueError naming the file and the field if it is not one."""
    if not (isinstance(data, dict) and isinstance(data.get("source"), str) and isinstance(data.get("configs"), list)):
        raise ValueError(f'{path}: a configuration table needs a "source" string and a "configs" list')
    configs = {}
    for i, entry in enumerate(data["configs"]):
        where = f"{path}: configs[{i}]"
        if not isinstance(entry, dict) or sorted(entry) != sorted(_ENTRY_FIELDS):
            raise ValueError(f"{where} needs exactly the fields {', '.join(_ENTRY_FIELDS)}")
        key = (entry["head_dim_pad"], entry["element_size"])
        if not all(type(k) is int for k in key) or key not in TABLE_KEYS:
            raise ValueError(f"{where}: (head_dim_pad, element_size) {key} is not one of {TABLE_KEYS}")
        if key in configs:
            raise ValueError(f"{where}: a second entry for (head_dim_pad, element_size) {key}")
        configs[key] = AttentionConfigs(*(_block_config(entry[name], f"{where}.{name}") for name in _KERNEL_FIELDS))
    missing = [key for key in TABLE_KEYS if key not in configs]
    if missing:
        raise ValueError(f"{path}: no entry for (head_dim_pad, element_size) {missing}")
    return ConfigTable(data["source"], configs)


def load_table(path: str | Path) -> ConfigTable:
    """Read a table written by :func:`write_table`; a file that is not one raises ValueError naming
    the file and the field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeError, ValueError) as e:
        raise ValueError(f"{path}: cannot read a configuration table: {e}") from None
    return _parse_table(data, path)


def write_table(path: str | Path, table: ConfigTable) -> None:
    """Write ``table`` as JSON: entries by element size then head dim, fields in a fixed order, one
    line per kernel configuration. It must have an entry for every key of TABLE_KEYS; the file is
    replaced only once the new one is complete."""
    path = Path(path)
    entries = [{"head_dim_pad": head_dim_pad, "element_size": element_size, **asdict(configs)}
               for (head_dim_pad, element_size), configs in sorted(table.configs.items(), key=lambda kv: kv[0][::-1])]
    data = {"source": table.source, "configs": entries}
    _parse_table(data, path)
    text = _ONE_LINE_OBJECT.sub(lambda m: "{" + " ".join(line.strip() for line in m[1].splitlines()) + "}",
                                json.dumps(data, indent=2))
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text + "\n", encoding="utf-8")
    os.replace(partial, path)


@functools.cache
def _shipped_table(table: int) -> ConfigTable:
    return load_table(table_path(table))


def tuned_configs(table: int, head_dim_pad: int, element_size: int) -> AttentionConfigs:
    """The configurations of ``table`` (a key of SHARED_MEMORY) for a padded head dim (a key of
    HEAD_DIM_PADS) and element size in bytes (ELEMENT_SIZES), from the table's JSON file."""
    return _shipped_table(table).configs[(head_dim_pad, element_size)]


def _head_dim_pad(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


@functools.cache
def _table_of_device(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return table_for(props.major, props.minor, getattr(props, "shared_memory_per_block_optin", None))


def _configs_for(q: torch.Tensor) -> AttentionConfigs:
    """The configurations for q's device, or for the GPU set by ``common.targeting`` (the kernel lab)."""
    gpu = target_gpu()
    if gpu is not None:
        table = table_for(gpu.arch // 10, gpu.arch % 10, gpu.shared_memory)
    elif q.device.type != "cuda":
        return INTERPRETER_CONFIGS
    else:
        table = _table_of_device(q.device.index if q.device.index is not None else torch.cuda.current_device())
    return tuned_configs(table, _head_dim_pad(q.shape[-1]), q.element_size())


# ---------------------------------------------------------------------------------------------
# Launchers, registered as PyTorch custom operators so that torch.compile(fullgraph=True) treats
# the kernels as opaque calls with known output shapes and a known backward.
# ---------------------------------------------------------------------------------------------


def _seed_value(seed: torch.Tensor | None) -> int:
    """The Philox seed the kernels take (0 without dropout, and while tracing: no value then)."""
    return 0 if seed is None or tracing() else int(seed)


def _dropout_seed() -> torch.Tensor:
    """A Philox seed from torch's default CPU generator (so torch.manual_seed fixes dropout)."""
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64)


def _positive_scale(q: torch.Tensor, scale: float) -> tuple[torch.Tensor, float]:
    """(q', scale') with q' k^T * scale' = q k^T * scale exactly and scale' > 0 (or NaN): the forward
    kernel takes the row maximum of the unscaled scores, which only a positive scale preserves."""
    if scale > 0 or math.isnan(scale):
        return q, scale
    return (-q, -scale) if scale < 0 else (torch.zeros_like(q), 1.0)


DECODE_ROWS = 16  # at most this many queries take the decode kernel (one 16-row tile)
DECODE_BLOCK_N = 32  # its key block: a chunk is a whole number of them


def _decodes(q: torch.Tensor, dropout_p: float) -> bool:
    """Whether the forward takes the split-key decode kernels (few queries, no dropout)."""
    return q.shape[-2] <= DECODE_ROWS and dropout_p == 0


def _decode_chunk(q: torch.Tensor, k_len: int) -> int:
    """Keys per decode program: the cache is cut into enough chunks (of whole key blocks) that
    batch x heads x chunks programs fill every SM, when the cache has that many blocks."""
    splits = max(1, min(cdiv(common.sm_count(q.device), q.shape[0] * q.shape[1]), cdiv(k_len, DECODE_BLOCK_N)))
    return cdiv(cdiv(k_len, splits), DECODE_BLOCK_N) * DECODE_BLOCK_N


def _decode(q, k, v, out, lse, causal, scale, key_start, key_end) -> None:
    """Split-key attention (flash-decoding) into ``out`` and ``lse``: one program per (key chunk,
    batch x head) writes a partial output and LSE, then a reduction combines the chunks."""
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    chunk = _decode_chunk(q, k_len)
    splits = cdiv(k_len, chunk)
    part_out = torch.empty((batch * heads, splits, q_len, head_dim), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((batch * heads, splits, q_len), dtype=torch.float32, device=q.device)
    launch(_attention_decode_kernel, (splits, batch * heads), q, k, v, part_out, part_lse, key_start, key_end,
           *q.stride(), *k.stride(), *v.stride(), heads, q_len, k_len, scale, chunk, HEAD_DIM=head_dim,
           HEAD_DIM_PAD=_head_dim_pad(head_dim), BLOCK_M=DECODE_ROWS, BLOCK_N=DECODE_BLOCK_N, CAUSAL=causal,
           num_warps=4, num_stages=2)
    launch(_attention_decode_reduce_kernel, (q_len, batch * heads), part_out, part_lse, out, lse, splits, q_len,
           HEAD_DIM=head_dim, HEAD_DIM_PAD=_head_dim_pad(head_dim), SPLITS_PAD=next_power_of_2(splits),
           num_warps=4)


@kernel_op("flash_attention_forward")
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout_p: float, scale: float,
             seed: torch.Tensor | None, key_start: torch.Tensor | None, key_end: torch.Tensor | None = None,
             deterministic: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, LSE): the attention output (contiguous, q's dtype) and the float32 row log-sum-exp
    (+inf on rows that see no key). ``key_end`` is taken by the decode kernels only (``_decodes``);
    ``deterministic`` is the backward's (``_backward``)."""
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    out = torch.empty((batch, heads, q_len, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, q_len), dtype=torch.float32, device=q.device)
    configs = _configs_for(q)
    config = configs.forward_masked if dropout_p > 0 or key_start is not None else configs.forward
    q, scale = _positive_scale(q, scale)
    if _decodes(q, dropout_p):
        _decode(q, k, v, out, lse, causal, scale, key_start, key_end)
        return out, lse
    launch(
        _attention_fwd_kernel, (cdiv(q_len, config.block_m), batch * heads),
        q, k, v, out, lse, key_start, *q.stride(), *k.stride(), *v.stride(), heads, q_len, k_len, scale,
        dropout_p, _seed_value(seed), HEAD_DIM=head_dim, HEAD_DIM_PAD=_head_dim_pad(head_dim),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, CAUSAL=causal, DROPOUT=dropout_p > 0,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return out, lse


@kernel_op("flash_attention_backward")
def _backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, causal: bool, dropout_p: float, scale: float, seed: torch.Tensor | None,
              key_start: torch.Tensor | None,
              deterministic: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV), contiguous, in the inputs' dtype. ``deterministic``: dQ by its own kernel (bitwise
    the same run to run); else added up by atomics in the dK/dV kernel (no second pass over the scores)."""
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    head_dim_pad = _head_dim_pad(head_dim)
    seed_value = _seed_value(seed)
    configs = _configs_for(q)
    delta = torch.empty_like(lse)
    delta_rows = 64  # query rows per program of the small dot(dO, O) pass
    launch(_attention_bwd_delta_kernel, (cdiv(q_len, delta_rows), batch * heads), out, grad_out, delta,
           *grad_out.stride(), heads, q_len, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_M=delta_rows)
    dq_sum = None if deterministic else torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    shared = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, CAUSAL=causal, DROPOUT=dropout_p > 0)
    config = configs.backward_kv if deterministic else configs.backward_kv_atomic
    kv_kernel = _attention_bwd_kv_kernel if q_len > 1 else _attention_bwd_kv_one_query_kernel
    launch(kv_kernel, (cdiv(k_len, config.block_n), batch * heads), q, k, v, grad_out, lse, delta,
           dk, dv, key_start, dq_sum, *strides, heads, q_len, k_len, scale, dropout_p, seed_value,
           BLOCK_M=config.block_m, BLOCK_N=config.block_n, num_warps=config.num_warps, num_stages=config.num_stages,
           **shared)
    if dq_sum is not None:
        return dq_sum.to(q.dtype), dk, dv
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    config = configs.backward_q
    launch(_attention_bwd_q_kernel, (cdiv(q_len, config.block_m), batch * heads), q, k, v, grad_out, lse, delta,
           dq, key_start, *strides, heads, q_len, k_len, scale, dropout_p, seed_value, BLOCK_M=config.block_m,
           BLOCK_N=config.block_n, num_warps=config.num_warps, num_stages=config.num_stages, **shared)
    return dq, dk, dv


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, causal, dropout_p, scale, seed, key_start, _, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_start)
    ctx.causal, ctx.dropout_p, ctx.scale, ctx.seed, ctx.deterministic = causal, dropout_p, scale, seed, deterministic
    ctx.mark_non_differentiable(lse)


def _gradients(ctx, grad_out: torch.Tensor, grad_lse: torch.Tensor | None):
    q, k, v, out, lse, key_start = ctx.saved_tensors
    dq, dk, dv = _backward(grad_out, q, k, v, out, lse, ctx.causal, ctx.dropout_p, ctx.scale, ctx.seed, key_start,
                           ctx.deterministic)
    return dq, dk, dv, None, None, None, None, None, None, None


_forward.register_autograd(_gradients, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# The public operation.
# ---------------------------------------------------------------------------------------------

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
    if key_end is not None and not _decodes(q, dropout_p):
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

    ``deterministic=False`` lets the Triton backward add dQ up with atomics instead of a second
    kernel that recomputes the scores (as FlashAttention-2 does): faster, but dQ may differ in its
    last bits from run to run, so a resumed training run is no longer bitwise the same. The eager
    path ignores it (see ``torch.use_deterministic_algorithms``).
    """
    _check_inputs(q, k, v, causal, dropout_p, key_start, key_end)
    if backend.route(flash_attention, q, k, v, causal, dropout_p, scale, key_start, key_end, deterministic):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        seed = _dropout_seed() if dropout_p > 0 else None
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
