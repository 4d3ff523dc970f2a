"""The MLP's first linear layer with its bias and GELU in the matmul's epilogue, and the GELU gradient in
the epilogue of the backward's matmul: what llm.c asks of cuBLASLt, as persistent Triton matmuls.

* :func:`linear_bias_gelu` ``(x, w, b)``: ``pre = x @ w.T + b`` and ``y = GELU(pre)`` (GPT-2's tanh form)
  in one kernel, ``w`` laid out as ``nn.Linear``'s weight. It writes ``y`` and ``pre`` together: the
  backward needs GELU's slope at ``pre``, and recomputing ``pre`` would cost the whole matmul again
  (2MNK flops) to save one (M, N) write, which the unfused path (matmul, then bias + GELU) pays as well.
* :func:`mlp_gelu` ``(x, w_fc, b_fc, w_proj, b_proj)``: GPT-2's MLP, ``c_proj(linear_bias_gelu(x, ...))``,
  whose backward computes the gradient at ``pre`` in one kernel, :func:`matmul_gelu_grad`
  ``(dy, w_proj, pre) = (dy @ w_proj) * GELU'(pre)``, so the gradient of GELU's output is never written;
  then the usual dW = dpre.T @ x, db = column sums, dx = dpre @ w_fc (cuBLAS).

Both kernels are one persistent matmul template (a program per SM walking output tiles in grouped
order, ``tl.dot`` on wgmma on Hopper) differing in the epilogue. On sm_90 the operands are read through
TMA tensor descriptors made on the device (``tl.make_tensor_descriptor``) when their bases are 16-byte
aligned; otherwise, and on sm_80, through pointer loads. Row lengths must be multiples of 16 bytes
(GPT-2's are): others take the eager path, as unaligned rows would load one element at a time. Float32
inputs are multiplied in TF32 on a GPU. The model uses :func:`mlp_gelu` only where a measured table says
it is faster (``MEASURED_FASTER``, empty until a GPU run measures it): an unmeasured kernel never slows
training.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import backend, benchmark, spec
from .bias_gelu import _backward as bias_gelu_backward
from .bias_gelu import _gelu_and_slope, bias_gelu, bias_gelu_reference
from .common import Switch, cdiv, dtype_problem, jit, kernel_op, launch, sm_count, target_gpu, tl, tracing, triton

# (hidden width, dtype name) pairs where a GPU run measured mlp_gelu faster than cuBLAS + bias_gelu
# (forward and backward together), filled from bench/gpu_run.py's results. Empty: nothing measured yet.
MEASURED_FASTER: frozenset[tuple[int, str]] = frozenset()
_chosen: Switch[bool | None] = Switch(None)  # set by choose_mlp_gelu: True or False overrides the table


@dataclass(frozen=True, order=True)
class MatmulConfig:
    """A persistent matmul's launch configuration: (block_m x block_n) output tiles, block_k deep steps,
    group_m row tiles per group of the tile order (L2 reuse), the software pipeline's stages."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_stages: int
    num_warps: int


MATMUL_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_stages", "num_warps")


@jit
def _persistent_matmul(a_ptr, b_ptr, bias_ptr, pre_ptr, out_ptr, M, N, K,
                       stride_am, stride_bk, stride_bn, stride_pre, stride_out,
                       GELU_FORWARD: tl.constexpr, HAS_BIAS: tl.constexpr, TMA: tl.constexpr, B_KN: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr):
    # acc = A @ B, A (M, K) with unit stride along K, B (K, N) at b_ptr + k * stride_bk + n * stride_bn
    # (unit stride along N if B_KN, else along K). Epilogue, GELU_FORWARD: pre = acc + bias written to
    # pre_ptr, GELU(pre) to out_ptr; otherwise acc * GELU'(pre read from pre_ptr) to out_ptr.
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group_tiles = GROUP_M * num_n
    if TMA:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
        if B_KN:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_bk, 1],
                                               block_shape=[BLOCK_K, BLOCK_N])
        else:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1],
                                               block_shape=[BLOCK_N, BLOCK_K])
        # The epilogue's tiles too: stores and loads of any row length, clipped at the edges.
        pre_desc = tl.make_tensor_descriptor(pre_ptr, shape=[M, N], strides=[stride_pre, 1],
                                             block_shape=[BLOCK_M, BLOCK_N])
        out_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, N], strides=[stride_out, 1],
                                             block_shape=[BLOCK_M, BLOCK_N])
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS):
        first_m = tile // group_tiles * GROUP_M
        group_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + tile % group_tiles % group_m
        pid_n = tile % group_tiles // group_m
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        a_rows = tl.max_contiguous(tl.multiple_of(tl.where(rows < M, rows, 0), BLOCK_M), BLOCK_M).to(tl.int64)
        b_cols = tl.max_contiguous(tl.multiple_of(tl.where(cols < N, cols, 0), BLOCK_N), BLOCK_N).to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(tl.cdiv(K, BLOCK_K)):
            k0 = step * BLOCK_K
            if TMA:
                a = a_desc.load([pid_m * BLOCK_M, k0])
                if B_KN:
                    b = b_desc.load([k0, pid_n * BLOCK_N])
                else:
                    b = b_desc.load([pid_n * BLOCK_N, k0]).T
            else:
                # Rows and columns past the edge read row / column 0 (their results are not stored):
                # only the K tail is masked, so that the loads pipeline as the tutorial's do.
                ks = k0 + tl.arange(0, BLOCK_K)
                a = tl.load(a_ptr + a_rows[:, None] * stride_am + ks[None, :], mask=(ks < K)[None, :], other=0.0)
                b = tl.load(b_ptr + ks[:, None].to(tl.int64) * stride_bk + b_cols[None, :] * stride_bn,
                            mask=(ks < K)[:, None], other=0.0)
            acc = tl.dot(a, b, acc)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        rows64 = rows.to(tl.int64)
        pre_at = pre_ptr + rows64[:, None] * stride_pre + cols[None, :]
        if GELU_FORWARD:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
            if TMA:
                pre_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(pre_ptr.dtype.element_ty))
            else:
                tl.store(pre_at, acc.to(pre_ptr.dtype.element_ty), mask=mask)
            result, _ = _gelu_and_slope(acc, True)
        else:
            if TMA:
                pre = pre_desc.load([pid_m * BLOCK_M, pid_n * BLOCK_N])
            else:
                pre = tl.load(pre_at, mask=mask, other=0.0)
            _, slope = _gelu_and_slope(pre.to(tl.float32), True)
            result = acc * slope
        if TMA:
            out_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], result.to(out_ptr.dtype.element_ty))
        else:
            tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :], result.to(out_ptr.dtype.element_ty),
                     mask=mask)


@jit
def _linear_bias_gelu_kernel(x_ptr, w_ptr, bias_ptr, pre_ptr, y_ptr, M, N, K, stride_xm, stride_wk, stride_wn,
                             stride_pre, stride_y, HAS_BIAS: tl.constexpr, TMA: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr):
    # y = GELU(pre), pre = x @ w.T + bias; w (N, K) with unit stride along K.
    _persistent_matmul(x_ptr, w_ptr, bias_ptr, pre_ptr, y_ptr, M, N, K, stride_xm, stride_wk, stride_wn,
                       stride_pre, stride_y, True, HAS_BIAS, TMA, False, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
                       NUM_PROGRAMS)


@jit
def _matmul_gelu_grad_kernel(dy_ptr, w2_ptr, pre_ptr, dpre_ptr, M, N, K, stride_dym, stride_w2k, stride_w2n,
                             stride_pre, stride_dpre, TMA: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr):
    # dpre = (dy @ w2) * GELU'(pre); w2 (K, N) with unit stride along N.
    _persistent_matmul(dy_ptr, w2_ptr, None, pre_ptr, dpre_ptr, M, N, K, stride_dym, stride_w2k, stride_w2n,
                       stride_pre, stride_dpre, False, False, TMA, True, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
                       NUM_PROGRAMS)


def _arch(device: torch.device) -> int:
    """The compute capability launches are configured for (90 for 9.0): the lab's target, the CUDA device's,
    or 90 under the interpreter (which runs tensor descriptors too)."""
    gpu = target_gpu()
    if gpu is not None:
        return gpu.arch
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 90


def block_config(dtype: torch.dtype, arch: int) -> MatmulConfig:
    """128 x 128 tiles on eight warps (two warpgroups of wgmma on Hopper), 64 deep in 16-bit dtypes (32 in
    float32: the same bytes per stage), four stages on sm_90 and three on sm_80's smaller shared memory."""
    block_k = 32 if dtype == torch.float32 else 64
    return MatmulConfig(128, 128, block_k, 8, 4 if arch >= 90 else 3, 8)


def every_config() -> dict[str, tuple[MatmulConfig, ...]]:
    """Every configuration each kernel may launch with, for ahead-of-time checks."""
    dtypes = (torch.float32, torch.bfloat16)
    configs = tuple(sorted({block_config(dtype, arch) for dtype in dtypes for arch in (80, 90)}))
    return {"linear_bias_gelu": configs, "matmul_gelu_grad": configs}


def _aligned(t: torch.Tensor) -> bool:
    """A TMA descriptor can address the matrix: 16-byte aligned base and row stride, unit column stride."""
    return t.stride(-1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def uses_tma(*matrices: torch.Tensor) -> bool:
    """Whether the matmul of these matrices (operands and epilogue tensors, as laid out in memory) goes
    through TMA."""
    return _arch(matrices[0].device) >= 90 and all(map(_aligned, matrices))


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for the descriptors the kernel builds on the device (``triton.set_allocator``)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _launch_matmul(a: torch.Tensor, b: torch.Tensor, b_kn: bool, bias: torch.Tensor | None, pre: torch.Tensor,
                   out: torch.Tensor, gelu_forward: bool, config: MatmulConfig) -> None:
    """The persistent matmul of ``a`` (M, K) and B: ``b`` is B (K, N) if ``b_kn``, else B's transpose (N, K)."""
    (m, k), n = a.shape, out.shape[1]
    if out.numel() == 0 or tracing():  # fake tensors (the op's fake implementation) have no data pointers
        return
    tma = uses_tma(a, b, pre, out)
    if tma and a.device.type == "cuda" and target_gpu() is None:
        triton.set_allocator(_scratch)
    stride_bk, stride_bn = (b.stride(0), b.stride(1)) if b_kn else (b.stride(1), b.stride(0))
    programs = min(sm_count(a.device), cdiv(m, config.block_m) * cdiv(n, config.block_n))
    meta = dict(TMA=tma, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                GROUP_M=config.group_m, NUM_PROGRAMS=programs, num_stages=config.num_stages, num_warps=config.num_warps)
    strides = (a.stride(0), stride_bk, stride_bn, pre.stride(0), out.stride(0))
    if gelu_forward:
        launch(_linear_bias_gelu_kernel, (programs,), a, b, bias, pre, out, m, n, k, *strides,
               HAS_BIAS=bias is not None, **meta)
    else:
        launch(_matmul_gelu_grad_kernel, (programs,), a, b, pre, out, m, n, k, *strides, **meta)


def launch_forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                   config: MatmulConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """GELU(x @ w.T + b) and the pre-activation x @ w.T + b, both (M, N) in x's dtype; x (M, K) with unit
    column stride, w (N, K) contiguous, b (N,) in any kernel dtype (added in float32)."""
    y = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    pre = torch.empty_like(y)
    _launch_matmul(x, w, False, b, pre, y, True, config)
    return y, pre


def launch_gelu_grad(dy: torch.Tensor, w2: torch.Tensor, pre: torch.Tensor, config: MatmulConfig) -> torch.Tensor:
    """(dy @ w2) * GELU'(pre) in pre's dtype: dy (M, K), w2 (K, N) contiguous (the next layer's
    ``nn.Linear`` weight), pre (M, N)."""
    dpre = torch.empty_like(pre)
    _launch_matmul(dy, w2, True, None, pre, dpre, False, config)
    return dpre


@kernel_op("linear_bias_gelu_fwd")
def _forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`launch_forward` with the configuration for the device."""
    return launch_forward(x, w, b, block_config(x.dtype, _arch(x.device)))


@kernel_op("matmul_gelu_grad")
def _gelu_grad(dy: torch.Tensor, w2: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """:func:`launch_gelu_grad` with the configuration for the device."""
    return launch_gelu_grad(dy, w2, pre, block_config(dy.dtype, _arch(dy.device)))


def _linear_gradients(dpre: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    """dx, dw, db of ``pre = x @ w.T + b`` from dpre (db's column sums in float32, in b's dtype)."""
    db = dpre.sum(0, dtype=torch.float32).to(b.dtype) if b is not None else None
    return dpre @ w, dpre.t() @ x, db


class _LinearBiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        y, pre = _forward(x, w, b)
        ctx.save_for_backward(x, w, b, pre)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, b, pre = ctx.saved_tensors
        dpre, _ = bias_gelu_backward(dy, pre, None, "tanh")
        return _linear_gradients(dpre, x, w, b)


class _MlpGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_fc, b_fc, w_proj, b_proj):
        h, pre = _forward(x, w_fc, b_fc)
        ctx.save_for_backward(x, w_fc, b_fc, w_proj, b_proj, h, pre)
        return F.linear(h, w_proj, None if b_proj is None else b_proj.to(h.dtype))

    @staticmethod
    def backward(ctx, dout):
        x, w_fc, b_fc, w_proj, b_proj, h, pre = ctx.saved_tensors
        dout = dout.contiguous()
        dpre = _gelu_grad(dout, w_proj, pre)
        dh_proj = dout.t() @ h
        db_proj = dout.sum(0, dtype=torch.float32).to(b_proj.dtype) if b_proj is not None else None
        return (*_linear_gradients(dpre, x, w_fc, b_fc), dh_proj, db_proj)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The matmuls' dtype: autocast's where it is on for x's device (as ``F.linear`` would), else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _matrices(x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """x as contiguous rows and the weights contiguous, all in the matmuls' dtype."""
    dtype = _compute_dtype(x)
    rows = x.reshape(-1, x.shape[-1]).to(dtype)
    return (rows if rows.stride(-1) == 1 else rows.contiguous(), *(w.to(dtype).contiguous() for w in weights))


def _check_shapes(name: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    if w.dim() != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"{name}: weight has shape {tuple(w.shape)}, expected (N, {x.shape[-1]}) to match x's "
                         f"last dimension {tuple(x.shape)}")
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"{name}: bias has shape {tuple(b.shape)}, expected ({w.shape[0]},)")


def _kernel_problem(x: torch.Tensor, w: torch.Tensor, *args, **kwargs) -> str | None:
    """The dtypes of x and the (first) weight (the rest are cast, or loaded in float32), and row lengths
    whose rows start 16-byte aligned: TMA needs them, and unaligned rows load one element at a time."""
    problem = dtype_problem({"x": x, "weight": w})
    if problem is None:
        for name, width in (("in", w.shape[1]), ("out", w.shape[0])):
            if width * x.element_size() % 16:
                return (f"{name} features {width} x {x.element_size()} bytes is not a multiple of 16 bytes "
                        f"(the fused matmul's rows must start 16-byte aligned)")
    return problem


@backend.routed(_kernel_problem)
def linear_bias_gelu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """GELU(x @ w.T + b), GPT-2's tanh form, through the backend switch; ``w`` as ``nn.Linear``'s weight.

    The matmul runs in autocast's dtype where autocast is on, else x's; the bias is added in float32 and
    its gradient keeps its dtype. The eager path is ``F.linear`` then :func:`bias_gelu`.
    """
    _check_shapes("linear_bias_gelu", x, w, b)
    if not backend.route(linear_bias_gelu, x, w, b):
        return bias_gelu(F.linear(x, w), b)
    rows, w = _matrices(x, w)
    return _LinearBiasGelu.apply(rows, w, b).view(*x.shape[:-1], w.shape[0])


@backend.routed(_kernel_problem)
def mlp_gelu(x: torch.Tensor, w_fc: torch.Tensor, b_fc: torch.Tensor | None, w_proj: torch.Tensor,
             b_proj: torch.Tensor | None) -> torch.Tensor:
    """GPT-2's MLP, ``F.linear(GELU(x @ w_fc.T + b_fc), w_proj, b_proj)``: the first matmul with bias and
    GELU in its epilogue, the backward's ``dout @ w_proj`` with GELU's gradient in its own
    (:func:`matmul_gelu_grad`). Dtypes as :func:`linear_bias_gelu`."""
    _check_shapes("mlp_gelu", x, w_fc, b_fc)
    _check_shapes("mlp_gelu", x.new_empty(w_fc.shape[0]), w_proj, b_proj)
    if not backend.route(mlp_gelu, x, w_fc, b_fc, w_proj, b_proj):
        return F.linear(bias_gelu(F.linear(x, w_fc), b_fc), w_proj, b_proj)
    rows, w_fc, w_proj = _matrices(x, w_fc, w_proj)
    return _MlpGelu.apply(rows, w_fc, b_fc, w_proj, b_proj).view(*x.shape[:-1], w_proj.shape[0])


def matmul_gelu_grad(dy: torch.Tensor, w2: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """``(dy @ w2) * GELU'(pre)``: the gradient at the pre-activation ``pre`` (M, N) of an MLP whose second
    layer has weight ``w2`` (K, N) and output gradient ``dy`` (M, K). The Triton kernel (no autograd)."""
    return _gelu_grad(dy.contiguous(), w2.contiguous(), pre.contiguous())


def mlp_gelu_faster(x: torch.Tensor, width: int) -> bool:
    """Whether a model's MLP of this input width should run :func:`mlp_gelu` on ``x``: only where a GPU
    run measured it faster in the matmuls' dtype (``MEASURED_FASTER``), and on CUDA; inside
    :func:`choose_mlp_gelu`, as chosen there."""
    if _chosen.value is not None:
        return _chosen.value
    return x.device.type == "cuda" and (width, str(_compute_dtype(x)).removeprefix("torch.")) in MEASURED_FASTER


def choose_mlp_gelu(fused: bool) -> AbstractContextManager[None]:
    """Within the block, the model's MLPs run :func:`mlp_gelu` (``fused``) or the matmul and
    bias_gelu apart, whatever ``MEASURED_FASTER`` says: how a benchmark times the step both ways."""
    return _chosen.set(fused)


def linear_bias_gelu_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """Plain math, for tests (call it on float64 inputs)."""
    return bias_gelu_reference(x @ w.T, b)


def _eager(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.gelu(F.linear(x, w, b), approximate="tanh")


# ---------------------------------------------------------------------------------------------
# The spec: the lab inspects and checks linear_bias_gelu's forward and the backward's
# matmul_gelu_grad; the benchmark times GPT-2's MLP (mlp_gelu) against cuBLAS and our bias_gelu.
# ---------------------------------------------------------------------------------------------


def _inputs(shape: tuple, dtype: torch.dtype, device: torch.device, options: dict,
            generator: torch.Generator | None) -> spec.Inputs:
    """x (tokens, in), w (out, in), b (out,); options: ``bias`` (False: None)."""
    rows, k, n = shape
    make = dict(dtype=dtype, device=device, generator=generator)
    return {"x": spec.tensor(rows, k, **make), "w": spec.tensor(n, k, scale=k**-0.5, **make),
            "b": spec.tensor(n, scale=0.1, **make) if options.get("bias", True) else None}


def _launchers(inputs: spec.Inputs, configure: spec.Configure, phase: spec.Phase) -> None:
    x, w, b = inputs["x"], inputs["w"], inputs["b"]
    config = block_config(x.dtype, _arch(x.device))
    with phase("forward"):
        _, pre = launch_forward(x, w, b, configure(config, "linear_bias_gelu"))
    with phase("backward"):
        # The backward's fused matmul, with a second layer as wide as the input: dy (rows, k), w2 (k, n).
        launch_gelu_grad(torch.randn_like(x), torch.randn_like(w.t().contiguous()), pre,
                         configure(config, "matmul_gelu_grad"))


def _k_steps(args: dict, grid: tuple) -> int:
    """The main loop's iterations over the launch: BLOCK_K-deep steps of every output tile."""
    tiles = cdiv(args["M"], args["BLOCK_M"]) * cdiv(args["N"], args["BLOCK_N"])
    return tiles * cdiv(args["K"], args["BLOCK_K"])


def _bench_inputs(size: dict, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    c, rows = size["width"], size["rows"]
    make = dict(device=device, dtype=dtype)
    return (torch.randn(rows, c, **make).requires_grad_(),
            (c**-0.5 * torch.randn(4 * c, c, **make)).requires_grad_(), torch.zeros(4 * c, **make).requires_grad_(),
            ((4 * c) ** -0.5 * torch.randn(c, 4 * c, **make)).requires_grad_(), torch.zeros(c, **make).requires_grad_())


def _flops(size: dict, elem: int) -> tuple[float, float]:
    """The MLP's matmul work in TFLOP: two matmuls of rows x width x 4 width forward, four backward."""
    work = 2 * size["rows"] * size["width"] * 4 * size["width"] / 1e12
    return 2 * work, 4 * work


def _unfused(x, w_fc, b_fc, w_proj, b_proj) -> torch.Tensor:
    return F.linear(bias_gelu(F.linear(x, w_fc), b_fc), w_proj, b_proj)


SPECS = (spec.OpSpec(
    name="linear_bias_gelu", order=35, function=linear_bias_gelu, shape_names=("tokens", "in", "out"),
    shapes=spec.Shapes(default=(16384, 768, 3072), small=(40, 24, 72), odd=((33, 768, 3072), (70, 72, 200))),
    make_inputs=_inputs, launchers=_launchers, compared=(linear_bias_gelu, linear_bias_gelu_reference, _eager),
    config_type=MatmulConfig, every_config=every_config,
    tunables={name: spec.Tunable(MATMUL_FIELDS) for name in ("linear_bias_gelu", "matmul_gelu_grad")},
    options={"bias": bool}, tf32=True,
    # One step: a (BLOCK_M, BLOCK_K) x (BLOCK_K, BLOCK_N) product, BLOCK_M * BLOCK_N * BLOCK_K multiply-adds.
    models={name: spec.KernelModel(_k_steps, matmuls=1) for name in ("linear_bias_gelu", "matmul_gelu_grad")},
    benchmarks=(benchmark.KernelBench(
        name="mlp_gelu",
        unit="TFLOP/s",
        # GPT-2's MLP at 16 x 1024 tokens: 124M (768), medium (1024), xl (1600) wide.
        full=[benchmark.Sweep("rows=16384", "width", [dict(rows=16384, width=c) for c in (768, 1024, 1600)])],
        small=[benchmark.Sweep("rows=24", "width", [dict(rows=24, width=16)])],
        headline=dict(rows=16384, width=768),
        targets=(dict(rows=16384, width=1024), dict(rows=16384, width=1600)),  # timed early by the GPU run
        providers={"triton": benchmark.triton_backend(mlp_gelu), "torch": benchmark.eager(_unfused)},
        make_inputs=_bench_inputs, work=_flops,
        shape_of=lambda size: (size["rows"], size["width"], 4 * size["width"]),
        size_of=lambda shape: dict(rows=shape[0], width=shape[1])),),
),)
