"""Fused bias add and GELU: ``y = GELU(x + bias)``, GPT-2's tanh form by default.

Triton kernels (forward and backward), launched by the PyTorch custom operators
``gptfast::bias_gelu_fwd`` / ``gptfast::bias_gelu_bwd`` (``common.kernel_op``) with autograd.

* Forward: one read of x, one write of y; the bias row is reused by every row of a tile.
* Backward: recomputes ``x + bias`` from x (nothing else is saved), reads dy and writes dx once.
  The bias gradient, the column sum of dx, is accumulated in float32 registers by a fixed grid of
  programs while dx is written, and their partial sums are added in a fixed order: no second pass
  over dx, and bit-identical results run after run.

The tanh form uses ``0.5 * (1 + tanh(u)) = sigmoid(2u)``: no libdevice tanh (whose import path moves
between Triton versions), and no cancellation in ``1 + tanh(u)`` for very negative inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import backend, benchmark, spec
from .common import (
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

APPROXIMATIONS = ("tanh", "none")
_TILE_ELEMENTS = 4096  # elements per tile: 16 per thread with 8 warps, two 128-bit loads of fp16


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor | None,
                        approximate: str = "tanh") -> torch.Tensor:
    """Plain-math GELU(x + bias), for tests (call it on float64 inputs)."""
    if bias is not None:
        x = x + bias
    if approximate == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


@jit
def _gelu_and_slope(h, TANH: tl.constexpr):
    """GELU(h) and its derivative, in float32."""
    if TANH:
        # GELU = h * sigmoid(2u) with u = sqrt(2/pi) * (h + 0.044715 h^3).
        s = tl.sigmoid(2.0 * 0.7978845608028654 * (h + 0.044715 * h * h * h))
        du_dh = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * h * h)
        return h * s, s + h * 2.0 * s * (1.0 - s) * du_dh
    else:
        # GELU = h * Phi(h), Phi the standard normal CDF, whose density is exp(-h^2 / 2) / sqrt(2 pi).
        cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
        return h * cdf, cdf + h * tl.exp(-0.5 * h * h) * 0.3989422804014327


@jit
def _bias_gelu_fwd(x_ptr, bias_ptr, y_ptr, n_rows, n_cols, stride_x, stride_y,
                   HAS_BIAS: tl.constexpr, TANH: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One (BLOCK_M, BLOCK_N) tile per program: x read once, y written once, bias loaded once per tile.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    rows = rows.to(tl.int64)
    h = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        h += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y, _ = _gelu_and_slope(h, TANH)
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@jit
def _bias_gelu_bwd(dy_ptr, x_ptr, bias_ptr, dx_ptr, dbias_partial_ptr,
                   n_rows, n_cols, stride_dy, stride_x, stride_dx,
                   HAS_BIAS: tl.constexpr, TANH: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Program (p, j) handles column block j of every num_programs(0)-th row tile from p: it reads x
    # and dy once, writes dx once, and keeps dx's column sums in registers for the bias gradient.
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    dbias_sum = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tile in range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_M), tl.num_programs(0)):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows < n_rows)[:, None] & col_ok[None, :]
        rows = rows.to(tl.int64)
        h = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        _, slope = _gelu_and_slope(h + bias, TANH)
        dx = tl.where(mask, dy * slope, 0.0)
        tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            dbias_sum += dx
    if HAS_BIAS:
        tl.store(dbias_partial_ptr + tl.program_id(0).to(tl.int64) * n_cols + cols,
                 tl.sum(dbias_sum, axis=0), mask=col_ok)


def block_config(n_cols: int) -> RowConfig:
    """The configuration, the same forward and backward: tiles of _TILE_ELEMENTS, at most 256 columns wide.

    256-column blocks divide GPT-2's hidden sizes (3072, 4096, 5120, 6400) without masked waste.
    """
    block_n = min(256, next_power_of_2(n_cols))
    return RowConfig(_TILE_ELEMENTS // block_n, block_n, 8)


def every_config() -> dict[str, tuple[RowConfig, ...]]:
    """Every configuration each kernel may launch with, for ahead-of-time checks."""
    configs = tuple(sorted({block_config(2**k) for k in range(9)}))
    return {"bias_gelu_fwd": configs, "bias_gelu_bwd": configs}


def launch_forward(x: torch.Tensor, bias: torch.Tensor | None, approximate: str, config: RowConfig) -> torch.Tensor:
    """Triton GELU(x + bias), in x's dtype (the bias is added in float32), launched with ``config``."""
    x2 = as_rows(x)
    bias = bias.contiguous() if bias is not None else None
    n_rows, n_cols = x2.shape
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if y.numel() > 0:
        block_m, block_n, num_warps = config.block_m, config.block_n, config.num_warps
        launch(_bias_gelu_fwd, (cdiv(n_rows, block_m), cdiv(n_cols, block_n)),
               x2, bias, y, n_rows, n_cols, x2.stride(0), y.stride(0),
               HAS_BIAS=bias is not None, TANH=approximate == "tanh",
               BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return y.view(x.shape)


@kernel_op("bias_gelu_fwd")
def _forward(x: torch.Tensor, bias: torch.Tensor | None, approximate: str) -> torch.Tensor:
    """:func:`launch_forward` with the configuration for x's rows."""
    return launch_forward(x, bias, approximate, block_config(x.shape[-1]))


def launch_backward(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, approximate: str,
                    config: RowConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backward, launched with ``config``: dx in x's dtype, and dbias in bias's dtype (empty
    without a bias)."""
    x2, dy2 = as_rows(x), as_rows(dy)
    bias = bias.contiguous() if bias is not None else None
    n_rows, n_cols = x2.shape
    dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    block_m, block_n, num_warps = config.block_m, config.block_n, config.num_warps
    col_blocks = cdiv(n_cols, block_n)
    # About four programs per SM in all, each owning a band of row tiles of one column block.
    row_programs = max(1, min(cdiv(n_rows, block_m), 4 * sm_count(x.device) // max(col_blocks, 1)))
    dbias_partial = torch.zeros(row_programs if bias is not None else 0, n_cols,
                                dtype=torch.float32, device=x.device)
    if dx.numel() > 0:
        launch(_bias_gelu_bwd, (row_programs, col_blocks),
               dy2, x2, bias, dx, dbias_partial, n_rows, n_cols, dy2.stride(0), x2.stride(0), dx.stride(0),
               HAS_BIAS=bias is not None, TANH=approximate == "tanh",
               BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    dbias_dtype = bias.dtype if bias is not None else x.dtype
    # The partial sums are added in a fixed order: a deterministic bias gradient.
    return dx.view(x.shape), dbias_partial.sum(0).to(dbias_dtype)


@kernel_op("bias_gelu_bwd")
def _backward(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None,
              approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`launch_backward` with the configuration for x's rows."""
    return launch_backward(dy, x, bias, approximate, block_config(x.shape[-1]))


def _setup_context(ctx, inputs, output) -> None:
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def _gradients(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, dbias = _backward(dy, x, bias, ctx.approximate)
    return dx, (dbias if bias is not None else None), None


_forward.register_autograd(_gradients, setup_context=_setup_context)


def _check_inputs(x: torch.Tensor, bias: torch.Tensor | None, approximate: str) -> None:
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"bias_gelu: approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("bias_gelu: x must be a tensor with at least one dimension")
    if bias is not None and tuple(bias.shape) != (x.shape[-1],):
        raise ValueError(f"bias_gelu: bias has shape {tuple(bias.shape)}, expected ({x.shape[-1]},) "
                         f"to match the last dimension of x {tuple(x.shape)}")


def _kernel_problem(x: torch.Tensor, bias: torch.Tensor | None, approximate: str = "tanh") -> str | None:
    return dtype_problem({"x": x, "bias": bias})


@backend.routed(_kernel_problem)
def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None, approximate: str = "tanh") -> torch.Tensor:
    """GELU(x + bias) over the last dimension of ``x``, through the backend switch.

    ``approximate="tanh"`` is GPT-2's form; ``"none"`` is the exact erf form. The result has x's
    dtype, as a linear layer's bias add gives under autocast: bf16 activations with a float32 bias
    stay bf16 (the bias gradient keeps the bias's dtype).
    """
    _check_inputs(x, bias, approximate)
    if backend.route(bias_gelu, x, bias, approximate):
        return _forward(x, bias, approximate)
    if bias is not None:
        x = x + bias.to(x.dtype)
    return F.gelu(x, approximate=approximate)


# ---------------------------------------------------------------------------------------------
# The spec (``spec.OpSpec``): inputs, the launchers with explicit configurations, lab hooks and the
# benchmark: our fused kernel against the bias add then F.gelu, and its torch.compile (Liger-Kernel
# has no bias + GELU operation to compare with).
# ---------------------------------------------------------------------------------------------


def _inputs(shape: tuple, dtype: torch.dtype, device: torch.device, options: dict,
            generator: torch.Generator | None) -> spec.Inputs:
    """x, bias and the form; options: ``bias`` (False: None), ``approximate``, ``row_stride``."""
    rows, cols = shape
    make = dict(dtype=dtype, device=device, generator=generator)
    return {"x": spec.row_tensor(rows, cols, row_stride=options.get("row_stride"), **make),
            "bias": spec.tensor(cols, scale=0.1, **make) if options.get("bias", True) else None,
            "approximate": options.get("approximate", "tanh")}


def _training_inputs(inputs: spec.Inputs) -> spec.Inputs:
    """As GPT training passes them under autocast: c_fc's matmul output in the activation dtype, its bias
    (a parameter) in float32 (``model.MLP``)."""
    return {**inputs, "bias": spec.float32(inputs["bias"])}


def _launchers(inputs: spec.Inputs, configure: spec.Configure, phase: spec.Phase) -> None:
    x, bias, approximate = inputs["x"], inputs["bias"], inputs["approximate"]
    with phase("forward"):
        launch_forward(x, bias, approximate, configure(block_config(x.shape[-1]), "bias_gelu_fwd"))
    with phase("backward"):
        launch_backward(torch.randn_like(x), x, bias, approximate,
                        configure(block_config(x.shape[-1]), "bias_gelu_bwd"))


def _eager(x: torch.Tensor, bias: torch.Tensor | None, approximate: str = "tanh") -> torch.Tensor:
    return F.gelu(x if bias is None else x + bias, approximate=approximate)


def _bench_inputs(size: dict, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    x = torch.randn(size["rows"], size["hidden"], device=device, dtype=dtype, requires_grad=True)
    bias = (0.1 * torch.randn(size["hidden"], device=device, dtype=dtype)).requires_grad_()
    return x, bias


def _bytes(size: dict, elem: int) -> tuple[float, float]:
    """The fewest bytes: the forward reads x and bias and writes y; the backward reads x, bias and dy
    and writes dx and dbias."""
    rows, hidden = size["rows"], size["hidden"]
    return (2 * rows * hidden + hidden) * elem, (3 * rows * hidden + 2 * hidden) * elem


SPECS = (spec.OpSpec(
    name="bias_gelu", order=30, function=bias_gelu, shape_names=("rows", "columns"),
    shapes=spec.Shapes(default=(16384, 3072), small=(64, 300), odd=((33, 3072), (4, 1000), (7, 300))),
    make_inputs=_inputs, launchers=_launchers, compared=(bias_gelu, bias_gelu_reference, _eager),
    training_inputs=_training_inputs, config_type=RowConfig, every_config=every_config,
    tunables={"bias_gelu_fwd": spec.Tunable(ROW_FIELDS), "bias_gelu_bwd": spec.Tunable(ROW_FIELDS)},
    options={"bias": bool, "approximate": str, "row_stride": int},
    models={"bias_gelu_bwd": spec.KernelModel(spec.row_tiles)},
    benchmarks=(benchmark.KernelBench(
        name="bias_gelu",
        unit="GB/s",
        full=[benchmark.Sweep("rows=16384", "hidden", [dict(rows=16384, hidden=h) for h in (3072, 4096, 5120, 6400)]),
              benchmark.Sweep("hidden=3072", "rows", [dict(rows=r, hidden=3072)
                                                      for r in (4096, 8192, 16384, 32768, 65536)])],
        small=[benchmark.Sweep("rows=24", "hidden", [dict(rows=24, hidden=h) for h in (128, 300)])],
        headline=dict(rows=16384, hidden=3072),  # GPT-2 124M's MLP: 16 x 1024 tokens, 4 x 768 wide
        providers={
            "triton": benchmark.triton_backend(lambda x, b: bias_gelu(x, b, approximate="tanh")),
            "torch": benchmark.eager(_eager),
            "torch.compile": benchmark.compiled(_eager),
        },
        make_inputs=_bench_inputs, work=_bytes),),
),)
