"""The Triton kernels of flash attention (the package's docstring says what each computes).

Every tile is (rows, HEAD_DIM_PAD): head dims that are not a power of two are padded inside the kernel
by masking the loads (zeros) and stores, never by copying the inputs. q, k, v and dO are read through
their strides, from base pointers offset once per program to its (batch, head); O, dQ, dK, dV are
contiguous outputs.

Each kernel loops over the blocks one program needs in three spans (``_key_range`` and
``_query_range`` name them): the blocks at the edges (the first real key, the causal diagonal, the
sequence ends) are masked, the blocks between them need no mask. The spans are unrolled at compile
time (``tl.static_range``), so each gets its own loop, the middle one without masking.
"""

from __future__ import annotations

from .. import common
from ..common import LN2, LOG2E, jit, tl

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
def _dq_part_rows(block, q_len, k_len, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(first row, rows) of key block ``block``'s partial dQ in the workspace: the query rows from the
    first block it sees under the causal mask (``_query_range``'s lo without padding) to q_len rounded
    up to whole query blocks. Every row count and offset is then a multiple of BLOCK_M, which the
    compiler can see: the partial tiles move in 128-bit accesses at any q_len, without a row mask."""
    first = block * 0
    if CAUSAL:
        first = tl.maximum(block * BLOCK_N - (k_len - q_len), 0) // BLOCK_M * BLOCK_M
    return first, tl.cdiv(q_len, BLOCK_M) * BLOCK_M - first


@jit
def _dq_part_start(block, q_len, k_len, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows of the key blocks before ``block`` (``_dq_part_rows``), per batch x head: the workspace
    holds, key block after key block, each block's (batch x head, HEAD_DIM, rows) partials. In closed
    form (no loop), for BLOCK_N a multiple of BLOCK_M: the blocks from ``seeing_all`` on start
    ``BLOCK_N / BLOCK_M`` query blocks apart."""
    start = block * (tl.cdiv(q_len, BLOCK_M) * BLOCK_M)
    if CAUSAL:
        offset = k_len - q_len
        seeing_all = tl.minimum(block, offset // BLOCK_N + 1)  # blocks before it: first row 0
        later = block - seeing_all
        first_blocks = (BLOCK_N // BLOCK_M) * (seeing_all + block - 1) * later // 2 - tl.cdiv(offset, BLOCK_M) * later
        start -= first_blocks * BLOCK_M
    return start


@jit
def _dq_part_tile(DQ_PART, block, start, bh, rows, dims, q_len, k_len, HEAD_DIM: tl.constexpr,
                  CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Pointers to the (HEAD_DIM_PAD, BLOCK_M) tile of key block ``block``'s partial dQ (``start``: its
    ``_dq_part_start``) at query ``rows`` of ``bh``."""
    first, n_rows = _dq_part_rows(block, q_len, k_len, CAUSAL, BLOCK_M, BLOCK_N)
    base = (start.to(tl.int64) * tl.num_programs(1) + bh * n_rows) * HEAD_DIM
    return DQ_PART + base + dims[:, None] * n_rows + (rows[None, :] - first)


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
def _attention_bwd_delta_kernel(OUT, DO, LSE, LSE2, DELTA, DQ_SUM, DQ, stride_dob, stride_doh, stride_dot,
                                stride_dod, n_heads, q_len, stats_stride, HEAD_DIM: tl.constexpr,
                                HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """The backward's row statistics: delta_i = dot(dO_i, O_i) = rowsum(P * dP), and the LSE in log2
    units (LSE2), each row of batch x head ``stats_stride`` apart (a multiple of 16, passed so: the
    backward kernels read them in 128-bit loads at any q_len). Reads O and dO once. For the atomic dQ
    path it also zeroes DQ_SUM (or None), the float32 dQ the dK/dV kernel adds to (no fill pass), and
    DQ (or None: given where key_start may leave query blocks that no key block reaches: their dQ is 0)."""
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
    row_ok = rows < q_len
    lse2 = tl.load(LSE + bh.to(tl.int64) * q_len + rows, mask=row_ok) * LOG2E
    tl.store(LSE2 + bh.to(tl.int64) * stats_stride + rows, lse2, mask=row_ok)
    tl.store(DELTA + bh.to(tl.int64) * stats_stride + rows, delta, mask=row_ok)
    if DQ_SUM is not None:
        rows_at = bh.to(tl.int64) * q_len * HEAD_DIM + rows[:, None] * HEAD_DIM + dims[None, :]
        zeros = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
        _store_tile(DQ_SUM + rows_at, zeros, rows, q_len, HEAD_DIM)
        if DQ is not None:
            _store_tile(DQ + rows_at, zeros.to(DQ.dtype.element_ty), rows, q_len, HEAD_DIM)


@jit(do_not_specialize=SEED)
def _attention_bwd_kv_kernel(Q, K, V, DO, LSE2, DELTA, DK, DV, KEY_START, DQ_PART, DQ_SUM, DQ, DQ_COUNT,
                             stride_qb, stride_qh, stride_qt, stride_qd,
                             stride_kb, stride_kh, stride_kt, stride_kd,
                             stride_vb, stride_vh, stride_vt, stride_vd,
                             stride_dob, stride_doh, stride_dot, stride_dod,
                             n_heads, q_len, k_len, stats_stride, scale, dropout_p, seed,
                             HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                             WGMMA: tl.constexpr = False):
    """One program per (key block, batch x head): dK and dV of the block, written once.

    K and V stay in on-chip memory; Q, dO and the row statistics (``_attention_bwd_delta_kernel``) are
    read once per key block that needs them.
    The tiles are transposed, (key, query), so that dK and dV come out of the dots row by key. The
    first key blocks are the heaviest under the causal mask (every later query sees them) and they
    are launched first. Each tile's share of dQ (unscaled, float32, 5 products and 1 exponential per
    score in all) goes, if given, to DQ_PART: a float32 workspace of each key block's (batch x head,
    HEAD_DIM, rows) partials (``_dq_part_tile``) that ``_attention_bwd_dq_reduce_kernel`` sums in
    key-block order (bitwise the same run to run); or to DQ_SUM: a zeroed float32 dQ that it is added
    to by atomics, in an order that varies run to run, then converted into DQ by the last key block to
    finish with each query block (``_convert_dq_if_last``).
    With neither, dQ is left to ``_attention_bwd_q_kernel``, which recomputes the scores.
    """
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    batch, head = (bh // n_heads).to(tl.int64), (bh % n_heads).to(tl.int64)
    Q += batch * stride_qb + head * stride_qh
    K += batch * stride_kb + head * stride_kh
    V += batch * stride_vb + head * stride_vh
    DO += batch * stride_dob + head * stride_doh
    LSE2 += bh.to(tl.int64) * stats_stride
    DELTA += bh.to(tl.int64) * stats_stride
    if DQ_PART is not None:
        part_start = _dq_part_start(tl.program_id(0), q_len, k_len, CAUSAL, BLOCK_M, BLOCK_N)
    if DQ_SUM is not None:
        DQ_SUM += bh.to(tl.int64) * q_len * HEAD_DIM
        DQ += bh.to(tl.int64) * q_len * HEAD_DIM
        DQ_COUNT += bh * tl.cdiv(q_len, BLOCK_M)
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
                lse2 = tl.load(LSE2 + rows, mask=rows < q_len, other=0.0)
                delta = tl.load(DELTA + rows, mask=rows < q_len, other=0.0)
            else:
                lse2 = tl.load(LSE2 + rows)
                delta = tl.load(DELTA + rows)
            s_t = tl.dot(k, tl.trans(q)) * qk_scale
            if MASKED:
                s_t = tl.where(_visible(rows[None, :], cols[:, None], q_len, k_len, key_start, CAUSAL), s_t,
                               float("-inf"))
            p_t = tl.math.exp2(s_t - lse2[None, :])  # probabilities, recomputed (0 where LSE = inf)
            dp_t = tl.dot(v, tl.trans(do))  # dL/d(dropped P), transposed
            if DROPOUT:
                keep_t = _dropout_keep(seed, bh, rows[None, :], cols[:, None], dropout_p)
                dv += tl.dot(tl.where(keep_t, p_t, 0.0).to(do.dtype), do)
                dp_t = tl.where(keep_t, dp_t / (1.0 - dropout_p), 0.0)
            else:
                dv += tl.dot(p_t.to(do.dtype), do)
            ds_t = p_t * (dp_t - delta[None, :])  # softmax backward
            dk += tl.dot(ds_t.to(q.dtype), q)
            if DQ_PART is not None or DQ_SUM is not None:
                # This key block's share of the query block's dQ, (HEAD_DIM_PAD, BLOCK_M), unscaled. WGMMA
                # (sm_90): as K^T dS^T, dS^T from shared memory as wgmma's B operand (dS K would take dS^T
                # from registers: mma.sync); else as dS K, transposed (K^T dS^T spills float32 on sm_80).
                if WGMMA:
                    dq_t = tl.dot(tl.trans(k), ds_t.to(k.dtype))
                else:
                    dq_t = tl.trans(tl.dot(tl.trans(ds_t.to(k.dtype)), k))
                if DQ_PART is not None:  # the workspace holds whole query blocks: rows need no mask
                    part = _dq_part_tile(DQ_PART, tl.program_id(0), part_start, bh, rows, dims, q_len, k_len,
                                         HEAD_DIM, CAUSAL, BLOCK_M, BLOCK_N)
                    if HEAD_DIM < HEAD_DIM_PAD:
                        tl.store(part, dq_t, mask=dims[:, None] < HEAD_DIM)
                    else:
                        tl.store(part, dq_t)
                else:
                    tl.atomic_add(DQ_SUM + rows[None, :] * HEAD_DIM + dims[:, None], dq_t * scale,
                                  mask=(rows[None, :] < q_len) & (dims[:, None] < HEAD_DIM),
                                  sem="relaxed")  # scaled here: dQ is then only converted
    if DROPOUT:
        dv = dv / (1.0 - dropout_p)
    dk = dk * scale
    out = bh.to(tl.int64) * k_len * HEAD_DIM + cols[:, None] * HEAD_DIM + dims[None, :]
    _store_tile(DK + out, dk.to(DK.dtype.element_ty), cols, k_len, HEAD_DIM)
    _store_tile(DV + out, dv.to(DV.dtype.element_ty), cols, k_len, HEAD_DIM)
    if DQ_SUM is not None:  # after the stores: dK and dV no longer hold registers
        tl.debug_barrier()  # every thread's atomic adds come before this program's counts
        for start_m in range(lo, end, BLOCK_M):
            _convert_dq_if_last(DQ_SUM, DQ, DQ_COUNT, start_m, dims, q_len, k_len, key_start, HEAD_DIM, CAUSAL,
                                BLOCK_M, BLOCK_N)


@jit
def _convert_dq_if_last(DQ_SUM, DQ, DQ_COUNT, start_m, dims, q_len, k_len, key_start, HEAD_DIM: tl.constexpr,
                        CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Count one more key block done with the query block at ``start_m`` (DQ_COUNT: zeroed, an int per
    query block; the pointers at this batch x head's); the last of those ``_key_range`` says reach it
    converts the block's float32 dQ (DQ_SUM) into DQ. The count is made by one thread with acquire and
    release semantics after a barrier over the program's adds (the CUDA grid-sync pattern), so the last
    to count sees every key block's adds: no conversion pass of its own."""
    lo, _, _, end = _key_range(start_m, q_len, k_len, key_start, CAUSAL, BLOCK_M, BLOCK_N)
    counted = tl.atomic_add(DQ_COUNT + start_m // BLOCK_M, 1, sem="acq_rel")
    if counted == tl.cdiv(end - lo, BLOCK_N) - 1:
        rows = start_m + tl.arange(0, BLOCK_M)
        at = rows[:, None] * HEAD_DIM + dims[None, :]
        mask = (rows[:, None] < q_len) & (dims[None, :] < HEAD_DIM)
        total = tl.load(DQ_SUM + at, mask=mask, cache_modifier=".cg")  # from L2, where the atomics were made
        tl.store(DQ + at, total.to(DQ.dtype.element_ty), mask=mask)


@jit
def _attention_bwd_dq_reduce_kernel(DQ_PART, DQ, KEY_START, n_heads, q_len, k_len, scale,
                                    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                                    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """One program per (query block, batch x head), the dK/dV kernel's BLOCK_M and BLOCK_N: dQ of the
    block, the partial dQ that the dK/dV kernel wrote per key block (DQ_PART) summed in key-block
    order, so bitwise the same run to run. The key blocks summed are those whose programs visit
    this query block (``_key_range`` names the same blocks as ``_query_range``)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM_PAD)
    key_start = _load_key_start(KEY_START, (bh // n_heads).to(tl.int64))
    lo, _, _, end = _key_range(start_m, q_len, k_len, key_start, CAUSAL, BLOCK_M, BLOCK_N)
    start = _dq_part_start(lo // BLOCK_N, q_len, k_len, CAUSAL, BLOCK_M, BLOCK_N)
    dq_t = tl.zeros([HEAD_DIM_PAD, BLOCK_M], tl.float32)
    for start_n in range(lo, end, BLOCK_N):
        block = start_n // BLOCK_N
        part = _dq_part_tile(DQ_PART, block, start, bh, rows, dims, q_len, k_len, HEAD_DIM, CAUSAL, BLOCK_M, BLOCK_N)
        if HEAD_DIM < HEAD_DIM_PAD:  # whole query blocks (``_dq_part_rows``): rows need no mask
            dq_t += tl.load(part, mask=dims[:, None] < HEAD_DIM, other=0.0)
        else:
            dq_t += tl.load(part)
        start += _dq_part_rows(block, q_len, k_len, CAUSAL, BLOCK_M, BLOCK_N)[1]
    dq = tl.trans(dq_t * scale)
    _store_tile(DQ + bh.to(tl.int64) * q_len * HEAD_DIM + rows[:, None] * HEAD_DIM + dims[None, :],
                dq.to(DQ.dtype.element_ty), rows, q_len, HEAD_DIM)


# A backward over one query: Triton would compile q_len == 1 as a constant, fold the unmasked span away
# and lead with the masked loop, and ptxas would serialise the wgmma (C7515, sm_90). This handle keeps
# q_len a runtime integer; other lengths keep the first.
_attention_bwd_kv_one_query_kernel = common.jit_variant(_attention_bwd_kv_kernel,
                                                        do_not_specialize=[*SEED, "q_len"])


@jit(do_not_specialize=SEED)
def _attention_bwd_q_kernel(Q, K, V, DO, LSE2, DELTA, DQ, KEY_START,
                            stride_qb, stride_qh, stride_qt, stride_qd,
                            stride_kb, stride_kh, stride_kt, stride_kd,
                            stride_vb, stride_vh, stride_vt, stride_vd,
                            stride_dob, stride_doh, stride_dot, stride_dod,
                            n_heads, q_len, k_len, stats_stride, scale, dropout_p, seed,
                            HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr):
    """One program per (query block, batch x head): dQ of the block, written once.

    Q, dO and the row statistics stay on chip; K and V are read once per query block, as in the forward.
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
    lse2 = tl.load(LSE2 + bh.to(tl.int64) * stats_stride + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * stats_stride + rows, mask=row_ok, other=0.0)
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
