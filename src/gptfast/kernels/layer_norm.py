"""LayerNorm over the last dimension: ``y = (x - mean) / sqrt(var + eps) * weight + bias``, alone
(:func:`layer_norm`) or fused with the residual add before it (:func:`add_layer_norm`).

Triton kernels (forward and backward), launched by the PyTorch custom operators
``gptfast::layer_norm_fwd`` / ``gptfast::layer_norm_bwd`` (``common.kernel_op``) with autograd, so
models using them compile with ``torch.compile(fullgraph=True)``.

* Forward: each program holds ``BLOCK_M`` whole rows in registers, so x is read once and y written
  once; statistics are float32 whatever the input dtype, and 1/std is saved for backward. Rows
  longer than 256 columns are held as a tuple of chunks of 256 columns per warp of the row
  (``block_config``), so a row is padded to a multiple of the chunk, not to a power of two (768:
  three chunks of 256, no idle lane), and each row sum adds the chunks in registers before one
  reduction, within the warp when the row has a warp of its own.
* Backward: a fixed grid of a few programs per SM; each walks its share of the row tiles (in
  chunks, as the forward), writes dx (one read of x and dy, one write of dx per row) and keeps
  float32 running sums of dy * xhat and dy in registers. The centred rows are recomputed from x in
  registers (as the forward computes them), not from a saved mean: a float32 mean of 1e4 + m is
  off by up to 2**-11, far more than x - mean can afford when the row's spread is small. The
  per-program partial sums (a (programs, n) array, small next to x) are then added up in a fixed
  order: gradients are bit-identical run after run, with no atomics or locks.
* Residual add (``HAS_RESIDUAL``): the forward reads x and the branch once and writes their sum
  once beside y; the backward reads the sum as its x and adds the sum's own gradient to dx, so the
  add costs no pass of its own in either direction.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from . import backend, benchmark, spec
from .common import (
    KERNEL_DTYPES,
    ROW_FIELDS,
    RowConfig,
    as_rows,
    cdiv,
    dtype_problem,
    jit,
    kernel_op,
    launch,
    next_power_of_2,
    sm_count,
    tl,
)

# Whole rows live in registers: 8192 float32 values per row tile keep every thread under its
# register budget without spills (checked ahead of time for sm_80 and sm_90 in tests).
MAX_ROW_LENGTH = 8192
_TILE_ELEMENTS = 4096  # short rows are grouped into tiles of at least this many elements
_WARP_COLUMNS = 256  # a warp's 32 lanes x 8 columns: one 128-bit load of 16-bit values each
_MOST_CHUNKS = {False: 8, True: 3}  # chunks per thread, forward / backward (see block_config)


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         eps: float = 1e-5) -> torch.Tensor:
    """Plain-math LayerNorm, for tests (call it on float64 inputs)."""
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


@jit
def _load_chunk(ptr, rows, stride, row_ok, n_cols, c, CHUNK: tl.constexpr):
    """Columns c * CHUNK ... of rows ``rows`` of ptr (``stride`` apart; 0: ptr's one row for each
    row, re-read from L1), zero past the row's end, as float32."""
    cols = tl.arange(0, CHUNK) + c * CHUNK
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@jit
def _store_chunk(ptr, rows, stride, row_ok, n_cols, c, value):
    """The inverse of :func:`_load_chunk`, in ptr's dtype."""
    CHUNK: tl.constexpr = value.shape[1]
    cols = tl.arange(0, CHUNK) + c * CHUNK
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    tl.store(ptr + rows[:, None] * stride + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@jit
def _load_rows(ptr, rows, stride, row_ok, n_cols, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    """Whole rows as a tuple of BLOCK_N // CHUNK chunks (:func:`_load_chunk`)."""
    chunks = ()
    for c in tl.static_range(BLOCK_N // CHUNK):
        chunks += (_load_chunk(ptr, rows, stride, row_ok, n_cols, c, CHUNK),)
    return chunks


@jit
def _add_pairs(a1, b1, a2, b2):
    return a1 + a2, b1 + b2


@jit
def _row_sums(a, b):
    """Each row's sums of the chunks a and of the chunks b: the chunks are added in each thread's
    registers first, then both sums reduced at once (one trip through the warp for all of them)."""
    a_total = a[0]
    b_total = b[0]
    for c in tl.static_range(1, len(a)):
        a_total += a[c]
        b_total += b[c]
    return tl.reduce((a_total, b_total), axis=1, combine_fn=_add_pairs)


@jit
def _row_sum(chunks):
    """Each row's sum over its chunks, reduced once as in :func:`_row_sums`."""
    total = chunks[0]
    for c in tl.static_range(1, len(chunks)):
        total += chunks[c]
    return tl.sum(total, axis=1)


@jit
def _centered(xs, pivot, n_cols, inv_n):
    """The row chunks xs minus their row means, computed from x - pivot, where pivot is any value
    near the row's (its first column): rows with a large common offset (1e4 +- 1) lose no precision,
    unlike E[x^2] - E[x]^2, sum(x), or a row mean rounded to float32 and subtracted later. Columns
    past the row's end come out 0; they are all in the last chunk (the others lie inside the row)."""
    CHUNK: tl.constexpr = xs[0].shape[1]
    last: tl.constexpr = len(xs) - 1
    inside = (tl.arange(0, CHUNK) + last * CHUNK < n_cols)[None, :]
    shifted = ()
    for c in tl.static_range(len(xs)):
        s = xs[c] - pivot[:, None]
        shifted += (tl.where(inside, s, 0.0) if c == last else s,)
    mean = _row_sum(shifted) * inv_n
    centered = ()
    for c in tl.static_range(len(xs)):
        s = shifted[c] - mean[:, None]
        centered += (tl.where(inside, s, 0.0) if c == last else s,)
    return centered


@jit
def _layer_norm_fwd(x_ptr, r_ptr, s_ptr, w_ptr, b_ptr, y_ptr, rstd_ptr,
                    n_rows, n_cols, stride_x, stride_r, stride_s, stride_y, eps,
                    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    # One program normalises BLOCK_M rows of BLOCK_N >= n_cols columns, held in registers as chunks
    # of CHUNK columns: one read of x, one write of y. With HAS_RESIDUAL the rows are x + r, read
    # once each and written once to s (the residual stream).
    inv_n = 1.0 / n_cols
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)  # row offsets can pass 2**31 elements
    xs = _load_rows(x_ptr, rows, stride_x, row_ok, n_cols, BLOCK_N, CHUNK)
    # The first column again, as the pivot of _centered: an L1 hit, cheaper than a reduction.
    pivot = tl.load(x_ptr + rows * stride_x, mask=row_ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        rs = _load_rows(r_ptr, rows, stride_r, row_ok, n_cols, BLOCK_N, CHUNK)
        pivot += tl.load(r_ptr + rows * stride_r, mask=row_ok, other=0.0).to(tl.float32)
        sums = ()
        for c in tl.static_range(len(xs)):
            s = (xs[c] + rs[c]).to(s_ptr.dtype.element_ty)  # normalise the sum as it is stored
            _store_chunk(s_ptr, rows, stride_s, row_ok, n_cols, c, s)
            sums += (s.to(tl.float32),)
        xs = sums
    centered = _centered(xs, pivot, n_cols, inv_n)
    squares = ()
    for c in tl.static_range(len(xs)):
        squares += (centered[c] * centered[c],)
    rstd = tl.rsqrt(_row_sum(squares) * inv_n + eps)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    for c in tl.static_range(len(xs)):  # each chunk stored as soon as it is made: fewer live registers
        y = centered[c] * rstd[:, None]
        if HAS_WEIGHT:  # read for each row (L1 hits), straight into the rows' layout
            y *= _load_chunk(w_ptr, rows, 0, row_ok, n_cols, c, CHUNK)
        if HAS_BIAS:
            y += _load_chunk(b_ptr, rows, 0, row_ok, n_cols, c, CHUNK)
        _store_chunk(y_ptr, rows, stride_y, row_ok, n_cols, c, y)


@jit
def _layer_norm_bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, ds_ptr, dx_ptr, dw_partial_ptr, db_partial_ptr,
                    n_rows, n_cols, stride_dy, stride_x, stride_ds, stride_dx,
                    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    # Each program takes every num_programs-th tile of BLOCK_M rows (in chunks, as the forward): it
    # reads x and dy once, writes dx once, and accumulates dweight / dbias partial sums in
    # registers, written once at the end. With HAS_RESIDUAL, x is the residual sum and the gradient
    # ds reaching it directly is added to dx.
    inv_n = 1.0 / n_cols
    dw_sum = ()
    for _ in tl.static_range(BLOCK_N // CHUNK):
        dw_sum += (tl.zeros((BLOCK_M, CHUNK), dtype=tl.float32),)
    db_sum = dw_sum
    for tile in range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_M), tl.num_programs(0)):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        rows = rows.to(tl.int64)
        xs = _load_rows(x_ptr, rows, stride_x, row_ok, n_cols, BLOCK_N, CHUNK)
        dys = _load_rows(dy_ptr, rows, stride_dy, row_ok, n_cols, BLOCK_N, CHUNK)
        pivot = tl.load(x_ptr + rows * stride_x, mask=row_ok, other=0.0).to(tl.float32)
        centered = _centered(xs, pivot, n_cols, inv_n)  # recomputed: exact where a saved mean is not
        xhat = ()
        wdys = ()
        products = ()
        for c in tl.static_range(len(xs)):
            xhat += (centered[c] * rstd[:, None],)
            # The weight row is re-read (an L1 hit) per tile, not held: registers are scarce.
            wdys += (dys[c] * _load_chunk(w_ptr, rows, 0, row_ok, n_cols, c, CHUNK) if HAS_WEIGHT else dys[c],)
            products += (wdys[c] * xhat[c],)
        # dx = rstd * (wdy - mean(wdy) - xhat * mean(wdy * xhat)), the means taken over each row.
        c1, c2 = _row_sums(products, wdys)
        c1 *= inv_n
        c2 *= rstd * inv_n
        new_dw = ()
        new_db = ()
        for c in tl.static_range(len(xs)):
            dx = (wdys[c] - xhat[c] * c1[:, None]) * rstd[:, None] - c2[:, None]
            if HAS_RESIDUAL:
                dx += _load_chunk(ds_ptr, rows, stride_ds, row_ok, n_cols, c, CHUNK)
            _store_chunk(dx_ptr, rows, stride_dx, row_ok, n_cols, c, dx)
            new_dw += (dw_sum[c] + dys[c] * xhat[c],)
            new_db += (db_sum[c] + dys[c],)
        dw_sum = new_dw
        db_sum = new_db
    for c in tl.static_range(BLOCK_N // CHUNK):
        cols = tl.arange(0, CHUNK) + c * CHUNK
        partial = tl.program_id(0).to(tl.int64) * n_cols + cols
        if HAS_WEIGHT:
            tl.store(dw_partial_ptr + partial, tl.sum(dw_sum[c], axis=0), mask=cols < n_cols)
        if HAS_BIAS:
            tl.store(db_partial_ptr + partial, tl.sum(db_sum[c], axis=0), mask=cols < n_cols)


def block_config(n_cols: int, backward: bool) -> RowConfig:
    """The configuration for rows of ``n_cols``; the kernels hold the rows in chunks (:func:`_tile`).

    Rows of up to 256 columns: tiles of _TILE_ELEMENTS (half that in the backward), several rows
    to a warp, in one chunk; 8 warps, so 16 values per thread forward, 8 backward.

    Longer rows: each row has k warps of its own and is cut into chunks of 256 * k columns, a
    warp's 32 lanes x 8 columns (a 128-bit load of 16-bit values) per warp, so that BLOCK_N is
    n_cols rounded up to a multiple of 256 * k, not to a power of two: 768 columns are three
    chunks of 256 with no lane idle, where a 1024-wide tile left a quarter of them idle. k is the
    fewest warps that leave each thread at most _MOST_CHUNKS chunks (forward 8, 64 values;
    backward 3, 24 values: it keeps x, dy, xhat and two running sums per value); at k = 1 the row
    sums never leave the warp (shuffles, no shared memory or barrier). 4 warps per program (k if
    more), so BLOCK_M = 4 // k rows.
    """
    width = next_power_of_2(n_cols)
    if width <= _WARP_COLUMNS:
        return RowConfig((_TILE_ELEMENTS // 2 if backward else _TILE_ELEMENTS) // width, width, 8)
    warps_per_row = next_power_of_2(cdiv(n_cols, _WARP_COLUMNS * _MOST_CHUNKS[backward]))
    chunk = _WARP_COLUMNS * warps_per_row
    num_warps = max(4, warps_per_row)
    return RowConfig(num_warps // warps_per_row, cdiv(n_cols, chunk) * chunk, num_warps)


def _tile(config: RowConfig, n_cols: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, CHUNK) of a launch: the configuration's tile in chunks of 256
    columns per warp of each row (whole rows when BLOCK_N is no wider). Only the last chunk may
    run past the row's end (_centered masks no other), so a wider BLOCK_N, from the lab's
    ``--config``, is cut to the chunks that reach into the row."""
    block_m, block_n, num_warps = config.block_m, config.block_n, config.num_warps
    chunk = math.gcd(block_n, _WARP_COLUMNS * max(1, num_warps // block_m))
    return block_m, min(block_n, cdiv(n_cols, chunk) * chunk), num_warps, chunk


def _register_budget(num_warps: int) -> int:
    """Registers per thread that let one program use a whole SM's register file (64K, at most 255
    per thread). Uncapped, ptxas aims at two programs per SM at 16 warps and spills to fit."""
    return min(255, 65536 // (32 * num_warps))


def every_config() -> dict[str, tuple[RowConfig, ...]]:
    """Every configuration each kernel may launch with, for ahead-of-time checks."""
    return {kernel: tuple(sorted({block_config(n, backward) for n in range(1, MAX_ROW_LENGTH + 1)}))
            for kernel, backward in (("layer_norm_fwd", False), ("layer_norm_bwd", True))}


def launch_forward(x: torch.Tensor, branch: torch.Tensor | None, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, eps: float, out_dtype: torch.dtype,
                   config: RowConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton LayerNorm forward of x, or of x + branch, launched with ``config``: (y shaped like x in
    out_dtype, float32 1/std per row, the sum x + branch in their promoted dtype; empty without a branch)."""
    x2 = as_rows(x)
    r2 = as_rows(branch) if branch is not None else None
    weight, bias = (p.contiguous() if p is not None else None for p in (weight, bias))
    n_rows, n_cols = x2.shape
    y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    total = (torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, branch.dtype), device=x.device)
             if branch is not None else x.new_empty(0))
    if n_rows > 0:
        block_m, block_n, num_warps, chunk = _tile(config, n_cols)
        launch(_layer_norm_fwd, (cdiv(n_rows, block_m),),
               x2, r2, total, weight, bias, y, rstd, n_rows, n_cols, x2.stride(0),
               r2.stride(0) if r2 is not None else 0, total.stride(0) if r2 is not None else 0, y.stride(0), eps,
               HAS_RESIDUAL=r2 is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
               BLOCK_M=block_m, BLOCK_N=block_n, CHUNK=chunk, num_warps=num_warps, maxnreg=_register_budget(num_warps))
    return y.view(x.shape), rstd.view(x.shape[:-1]), (total.view(x.shape) if branch is not None else total)


@kernel_op("layer_norm_fwd")
def _forward(x: torch.Tensor, branch: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
             eps: float, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`launch_forward` with the configuration for x's rows."""
    return launch_forward(x, branch, weight, bias, eps, out_dtype, block_config(x.shape[-1], backward=False))


def launch_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, has_bias: bool,
                    rstd: torch.Tensor, dtotal: torch.Tensor | None,
                    config: RowConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton LayerNorm backward, launched with ``config``: dx (plus ``dtotal``, the gradient that reaches
    the normalised rows directly when they are a residual sum), and dweight / dbias (empty without a
    weight / bias)."""
    x2, dy2 = as_rows(x), as_rows(dy)
    ds2 = as_rows(dtotal) if dtotal is not None else None
    weight = weight.contiguous() if weight is not None else None
    n_rows, n_cols = x2.shape
    dx = torch.empty_like(x2, memory_format=torch.contiguous_format)
    has_weight = weight is not None
    param_dtype = weight.dtype if has_weight else x.dtype
    block_m, block_n, num_warps, chunk = _tile(config, n_cols)
    programs = max(1, min(2 * sm_count(x.device), cdiv(n_rows, block_m)))
    dw_partial = torch.zeros(programs if has_weight else 0, n_cols, dtype=torch.float32, device=x.device)
    db_partial = torch.zeros(programs if has_bias else 0, n_cols, dtype=torch.float32, device=x.device)
    if n_rows > 0:
        launch(_layer_norm_bwd, (programs,),
               dy2, x2, weight, rstd, ds2, dx, dw_partial, db_partial,
               n_rows, n_cols, dy2.stride(0), x2.stride(0), ds2.stride(0) if ds2 is not None else 0, dx.stride(0),
               HAS_RESIDUAL=ds2 is not None, HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, BLOCK_M=block_m,
               BLOCK_N=block_n, CHUNK=chunk, num_warps=num_warps, maxnreg=_register_budget(num_warps))
    # The partial sums are added in a fixed order: deterministic dweight and dbias.
    return dx.view(x.shape), dw_partial.sum(0).to(param_dtype), db_partial.sum(0).to(param_dtype)


@kernel_op("layer_norm_bwd")
def _backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, has_bias: bool, rstd: torch.Tensor,
              dtotal: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`launch_backward` with the configuration for x's rows."""
    return launch_backward(dy, x, weight, has_bias, rstd, dtotal, block_config(x.shape[-1], backward=True))


def _setup_context(ctx, inputs, output) -> None:
    x, branch, weight, bias, _, _ = inputs
    _, rstd, total = output
    ctx.save_for_backward(x if branch is None else total, weight, rstd)
    ctx.has_bias = bias is not None
    ctx.dtypes = None if branch is None else (x.dtype, branch.dtype)


def _gradients(ctx, dy, _drstd, dtotal):
    rows, weight, rstd = ctx.saved_tensors
    dx, dw, db = _backward(dy, rows, weight, ctx.has_bias, rstd, None if ctx.dtypes is None else dtotal)
    dw, db = (dw if weight is not None else None), (db if ctx.has_bias else None)
    if ctx.dtypes is None:
        return dx, None, dw, db, None, None
    # d(x + branch) reaches x and branch alike, each in its own dtype.
    return dx.to(ctx.dtypes[0]), dx.to(ctx.dtypes[1]), dw, db, None, None


_forward.register_autograd(_gradients, setup_context=_setup_context)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  out_dtype: torch.dtype | None, op: str = "layer_norm") -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"{op}: x must be a tensor with at least one dimension")
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise ValueError(f"{op}: out_dtype must be a floating-point torch.dtype, got {out_dtype!r}")
    n = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (n,):
            raise ValueError(f"{op}: {name} has shape {tuple(p.shape)}, expected ({n},) "
                             f"to match the last dimension of x {tuple(x.shape)}")


def _kernel_problem(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float = 1e-5, out_dtype: torch.dtype | None = None) -> str | None:
    problem = dtype_problem({"x": x, "weight": weight, "bias": bias})
    if problem is None and out_dtype is not None and out_dtype not in KERNEL_DTYPES:
        problem = f"out_dtype {out_dtype}; the kernel writes float32, float16 and bfloat16"
    if problem is None and not 1 <= x.shape[-1] <= MAX_ROW_LENGTH:
        problem = f"row length {x.shape[-1]} is outside the kernel's range 1..{MAX_ROW_LENGTH}"
    return problem


@backend.routed(_kernel_problem)
def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """LayerNorm of ``x`` over its last dimension, through the backend switch.

    Statistics are float32; y is written in ``out_dtype`` (default: x's dtype), gradients come back
    in the inputs' dtypes. ``out_dtype`` lets autocast training write bf16 straight from a float32
    residual stream: the next matmul would cast it anyway, and the kernel then writes half the bytes.
    """
    _check_inputs(x, weight, bias, out_dtype)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if backend.route(layer_norm, x, weight, bias, eps, out_dtype):
        return _forward(x, None, weight, bias, eps, out_dtype)[0]
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps).to(out_dtype)


def _add_kernel_problem(x: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                        eps: float = 1e-5, out_dtype: torch.dtype | None = None) -> str | None:
    return dtype_problem({"branch": branch}) or _kernel_problem(x, weight, bias, eps, out_dtype)


@backend.routed(_add_kernel_problem)
def add_layer_norm(x: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float = 1e-5, out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + branch, layer_norm(x + branch))`` in one pass, through the backend switch: a residual
    block's add and the next LayerNorm. The kernel reads x and branch once and writes the sum and the
    normalised rows once; the backward writes one gradient for both inputs.

    The sum has the promoted dtype of x and branch (a float32 residual stream stays float32 when a
    bf16 branch is added under autocast); the normalised rows are ``out_dtype`` (default: the sum's).
    """
    _check_inputs(x, weight, bias, out_dtype, op="add_layer_norm")
    if not isinstance(branch, torch.Tensor) or branch.shape != x.shape:
        shape = tuple(branch.shape) if isinstance(branch, torch.Tensor) else type(branch).__name__
        raise ValueError(f"add_layer_norm: branch has shape {shape}, expected x's shape {tuple(x.shape)}")
    out_dtype = torch.promote_types(x.dtype, branch.dtype) if out_dtype is None else out_dtype
    if backend.route(add_layer_norm, x, branch, weight, bias, eps, out_dtype):
        y, _, total = _forward(x, branch, weight, bias, eps, out_dtype)
        return total, y
    total = x + branch
    return total, F.layer_norm(total, (x.shape[-1],), weight, bias, eps).to(out_dtype)


# ---------------------------------------------------------------------------------------------
# The specs (``spec.OpSpec``): inputs, the launchers with explicit configurations, lab hooks and
# the benchmarks (our kernel against F.layer_norm, its torch.compile and Liger-Kernel's).
# ---------------------------------------------------------------------------------------------

EPS = 1e-5


def _inputs(shape: tuple, dtype: torch.dtype, device: torch.device, options: dict,
            generator: torch.Generator | None, residual: bool = False) -> spec.Inputs:
    """x (and the branch), weight and bias; options: ``weight``, ``bias`` (False: None) and
    ``row_stride`` (rows as a view of wider ones)."""
    rows, cols = shape
    make = dict(dtype=dtype, device=device, generator=generator)
    inputs = {"x": spec.row_tensor(rows, cols, row_stride=options.get("row_stride"), **make)}
    if residual:
        inputs["branch"] = spec.row_tensor(rows, cols, row_stride=options.get("row_stride"), **make)
    inputs["weight"] = spec.tensor(cols, scale=0.1, shift=1.0, **make) if options.get("weight", True) else None
    inputs["bias"] = spec.tensor(cols, scale=0.1, **make) if options.get("bias", True) else None
    return inputs


def _launchers(inputs: spec.Inputs, configure: spec.Configure, phase: spec.Phase) -> None:
    x, branch, weight, bias = (inputs.get(name) for name in ("x", "branch", "weight", "bias"))
    n_cols = x.shape[-1]
    with phase("forward"):
        y, rstd, total = launch_forward(x, branch, weight, bias, EPS, inputs.get("out_dtype") or x.dtype,
                                        configure(block_config(n_cols, False), "layer_norm_fwd"))
    with phase("backward"):
        launch_backward(torch.randn_like(y), x if branch is None else total, weight, bias is not None, rstd,
                        None if branch is None else torch.randn_like(total),
                        configure(block_config(n_cols, True), "layer_norm_bwd"))


def _training_inputs(inputs: spec.Inputs) -> spec.Inputs:
    """As GPT training passes them under autocast: the residual stream x and the parameters in float32,
    the branch (a matmul's output) and y in the activation dtype (``model.LayerNorm``)."""
    return {**inputs, **{name: spec.float32(inputs[name]) for name in ("x", "weight", "bias")},
            "out_dtype": inputs["x"].dtype}


def _eager_add(x: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    total = x + branch
    return total, F.layer_norm(total, (x.shape[-1],), weight, bias, EPS)


def _bench_inputs(size: dict, device: torch.device, dtype: torch.dtype,
                  residual: bool = False) -> tuple[torch.Tensor, ...]:
    rows, hidden = size["rows"], size["hidden"]
    rows_ = tuple(torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
                  for _ in range(2 if residual else 1))
    weight = (1 + 0.1 * torch.randn(hidden, device=device, dtype=dtype)).requires_grad_()
    bias = (0.1 * torch.randn(hidden, device=device, dtype=dtype)).requires_grad_()
    return *rows_, weight, bias


def _bytes(size: dict, elem: int, residual: bool = False) -> tuple[float, float]:
    """The fewest bytes: the forward reads x (and the branch), weight and bias and writes y (and the
    sum); the backward reads x, dy (and the sum's gradient) and weight and writes dx, dweight and
    dbias (saved statistics not counted)."""
    rows, hidden = size["rows"], size["hidden"]
    extra = rows * hidden if residual else 0
    return (2 * rows * hidden + 2 * extra + 2 * hidden) * elem, (3 * rows * hidden + extra + 3 * hidden) * elem


_SHAPES = spec.Shapes(default=(16384, 768), small=(64, 300), odd=((33, 768), (4, 1000), (7, 4097)))
_TUNABLES = {"layer_norm_fwd": spec.Tunable(ROW_FIELDS), "layer_norm_bwd": spec.Tunable(ROW_FIELDS)}
_MODELS = {"layer_norm_bwd": spec.KernelModel(spec.row_tiles)}
_OPTIONS = {"weight": bool, "bias": bool, "row_stride": int}

LAYER_NORM = spec.OpSpec(
    name="layer_norm", order=10, function=layer_norm, shape_names=("rows", "columns"),
    shapes=_SHAPES, make_inputs=_inputs, launchers=_launchers, training_inputs=_training_inputs,
    compared=(layer_norm, layer_norm_reference, lambda x, weight, bias: F.layer_norm(x, (x.shape[-1],), weight, bias)),
    config_type=RowConfig, every_config=every_config, tunables=_TUNABLES, options=_OPTIONS, models=_MODELS,
    benchmarks=(benchmark.KernelBench(
        name="layer_norm",
        unit="GB/s",
        full=[benchmark.Sweep("rows=16384", "hidden", [dict(rows=16384, hidden=h) for h in
                                                        (768, 1024, 1280, 1600, 2048, 3072, 4096, 5120, 6400)]),
              benchmark.Sweep("hidden=768", "rows", [dict(rows=r, hidden=768)
                                                     for r in (4096, 8192, 16384, 32768, 65536)])],
        small=[benchmark.Sweep("rows=24", "hidden", [dict(rows=24, hidden=h) for h in (96, 300)])],
        headline=dict(rows=16384, hidden=768),  # GPT-2 124M: batch 16 x context 1024 rows
        providers={
            "triton": benchmark.triton_backend(lambda x, w, b: layer_norm(x, w, b, EPS)),
            "torch": benchmark.eager(lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, EPS)),
            "torch.compile": benchmark.compiled(lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, EPS)),
            "liger": benchmark.liger("liger_kernel.ops.layer_norm", "LigerLayerNormFunction", (EPS,)),
        },
        make_inputs=_bench_inputs, work=_bytes),),
)


def _add_reference(x, branch, weight, bias):
    total = x + branch
    return torch.stack((total, layer_norm_reference(total, weight, bias)))


ADD_LAYER_NORM = spec.OpSpec(
    name="add_layer_norm", order=20, function=add_layer_norm, shape_names=("rows", "columns"),
    shapes=_SHAPES, make_inputs=functools.partial(_inputs, residual=True), launchers=_launchers,
    training_inputs=_training_inputs,
    # Both outputs compared at once: (x + branch, LayerNorm of it), stacked.
    compared=(lambda x, branch, weight, bias: torch.stack(add_layer_norm(x, branch, weight, bias)), _add_reference,
              lambda x, branch, weight, bias: torch.stack(_eager_add(x, branch, weight, bias))),
    config_type=RowConfig, every_config=every_config, tunables=_TUNABLES, options=_OPTIONS, models=_MODELS,
    benchmarks=(benchmark.KernelBench(
        name="add_layer_norm",
        unit="GB/s",
        full=[benchmark.Sweep("rows=16384", "hidden", [dict(rows=16384, hidden=h) for h in (768, 1600, 4096)])],
        small=[benchmark.Sweep("rows=24", "hidden", [dict(rows=24, hidden=h) for h in (96, 300)])],
        headline=dict(rows=16384, hidden=768),  # GPT-2 124M: a residual add and the next LayerNorm
        providers={
            "triton": benchmark.triton_backend(lambda x, r, w, b: add_layer_norm(x, r, w, b, EPS)),
            "torch": benchmark.eager(_eager_add),
            "torch.compile": benchmark.compiled(_eager_add),
        },
        make_inputs=functools.partial(_bench_inputs, residual=True), work=functools.partial(_bytes, residual=True)),),
)

SPECS = (LAYER_NORM, ADD_LAYER_NORM)
