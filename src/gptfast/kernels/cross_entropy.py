"""Cross-entropy over the last dimension of logits, for the LM head: ``lse(x) - x[target]`` per row.

Triton kernels (forward and backward), launched by the PyTorch custom operators
``gptfast::cross_entropy_fwd`` / ``gptfast::cross_entropy_bwd`` (``common.kernel_op``) with autograd,
and the one-pass kernel of the fused LM head (:func:`write_loss_and_gradient`).

The logits are the largest activation of a GPT step (16 x 1024 rows of 50,304 bf16 values: 1.6 GB),
and eager PyTorch under autocast first copies them to float32, then writes float32 log-probabilities,
a one-hot gradient and the float32 gradient before casting it back: about 30 GB of traffic. Here:

* Forward: one program per row streams the row once in ``BLOCK_V`` chunks, keeping the row's running
  max and per-lane sums of exponentials (an online softmax, in base 2, one exponential per logit);
  it writes only the row's loss, max m and log-sum log(sum(exp(x - m))) (12 bytes). One read of the
  logits in their own dtype.
* Backward: recomputes ``softmax = exp((x - m) - log-sum)`` from the logits and the saved pair and
  writes ``(softmax - onehot(target)) * dloss`` once, in the logits' dtype. One read, one write.
  The pair, not their float32 sum: m + log-sum would round away the log-sum of rows near 1e4.
* One pass (the fused LM head, ``linear_cross_entropy``, which wants the gradient of the sum of the losses
  and owns its logits): one kernel writes each row's loss and overwrites the row with its gradient. Rows up
  to ``ONE_PASS_RESIDENT_COLUMNS`` (53,248) are loaded once into registers and the gradient written from
  them: read once, written once (bf16: 4 bytes per logit, against the two kernels' 6). A row wider than
  32,768 is not held as one block padded to a power of two: GPT-2's 50,304 in a block of 65,536 spills on
  sm_90 (Triton 3.6: 904 bytes a thread with 32 warps and 64 registers, 500 with 16 warps and 128; holding
  the row as bf16 and converting in each expression still spills 784 and 312, and four parts of 16,384 spill
  424 and 384). It is rounded up to a multiple of 4,096 and loaded in up to three power-of-two parts, each
  its own tensor (GPT-2: 32,768 + 16,384 + 4,096), by 16 warps: 104 float32 values a thread in 128
  registers, without spills (sm_80 and sm_90, Triton 3.6 and 3.7; with label smoothing, whose mean takes a
  further sum, GPT-2's row spills 56 bytes a thread on sm_90). One such program fits an SM (as the 32-warp
  block of 32,768 columns), so a row's loads do not overlap the previous row's arithmetic on that SM:
  whether holding beats streaming is for a GPU to measure (``lab tune linear_cross_entropy`` with the
  candidates ``--config cross_entropy_one_pass:num_warps=16``, the held default, and ``--config
  cross_entropy_one_pass:BLOCK_V=8192,num_warps=16``, streamed). Wider rows are streamed twice within the
  kernel: the statistics in chunks, then the same chunks, which the program has just read, again for the
  gradient, DRAM reading each row once where the L2 holds the rows in flight between their two loops (a
  static argument). Within ``two_passes()`` the fused head takes the two kernels, to compare one pass with
  two.
* The standalone op keeps two passes: its gradient is only known up to ``dloss``, so a gradient
  computed in the forward would have to be saved (as large as the logits) and scaled in the
  backward, a further read and write: 8 bytes per bf16 logit against 6.

``num_classes`` lets the LM head pass its vocabulary-padded logits whole (50,257 classes in rows of
50,304): the padding columns are left out of the softmax and get a zero gradient, which saves the
copy that slicing the logits would cost in the backward.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import backend, benchmark, spec
from .common import LOG2E, Switch, as_rows, dtype_problem, jit, kernel_op, launch, next_power_of_2, tl

REDUCTIONS = ("mean", "sum", "none")
TARGET_DTYPES = (torch.int64, torch.int32)
_MAX_BLOCK_V = 4096  # chunk of a row per loop step: 16 values per thread with 8 warps
# The one-pass kernel (see the module docstring): rows up to ONE_PASS_RESIDENT_COLUMNS wide are held in
# registers, wider ones streamed twice in chunks of _STREAMED_BLOCK_V by _STREAMED_WARPS warps, 16 values a thread,
# 2 programs per SM on sm_90 (64 registers). Held rows up to _WHOLE_BLOCK_COLUMNS are one power-of-two block, up to
# 32 float32 values a thread (32 warps at the limit); wider ones are rounded up to a multiple of _HELD_PART_COLUMNS
# (16 warps x 32 threads x 8 16-bit values: one 128-bit access each) and held by _HELD_WARPS warps in up to three
# power-of-two parts (GPT-2's 50,304: 32,768 + 16,384 + 4,096), at most 104 float32 values a thread.
ONE_PASS_RESIDENT_COLUMNS = 53248
_RESIDENT_PER_WARP = 1024
_WHOLE_BLOCK_COLUMNS = 32768
_HELD_PART_COLUMNS, _HELD_WARPS = 4096, 16
_STREAMED_BLOCK_V, _STREAMED_WARPS = 8192, 16


_two_passes = Switch(False)  # True within two_passes()


def two_passes() -> AbstractContextManager[None]:
    """Within the block, gradients wanted with the losses take two kernels (the losses, then the
    gradients: the logits read twice) instead of the one-pass kernel: to measure one against the other."""
    return _two_passes.set(True)


def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1,
                            label_smoothing: float = 0.0, z_loss: float = 0.0) -> torch.Tensor:
    """Plain-math per-row losses ``(1 - e) * (lse - x[target]) + e * (lse - mean(x)) + z * lse**2``
    (0 where ignored), for tests (call it on float64 logits of shape (rows, classes))."""
    keep = targets != ignore_index
    picked = logits.gather(1, torch.where(keep, targets, 0).long()[:, None])[:, 0]
    lse = torch.logsumexp(logits, dim=1)
    loss = (1 - label_smoothing) * (lse - picked) + label_smoothing * (lse - logits.mean(dim=1)) + z_loss * lse**2
    return torch.where(keep, loss, 0.0)


@jit
def _finite_or_zero(m):
    """m, or 0 where m is -inf: a lane that has seen only -inf subtracts 0, so exp gives 0, not NaN."""
    return tl.where(m == float("-inf"), 0.0, m)


@jit
def _logsumexp_step(m, s, x):
    """Fold a chunk x into the row's running max m (a scalar) and each lane's sum s of exp(x - m).

    One block-wide max per chunk, one exponential per logit, and one per thread to rescale s when
    the max grows: a per-lane max would cost two exponentials per logit, and the exponential unit,
    not memory, would set the speed. Differences first, then the scale to base 2: x - m is exact for
    nearby values, so rows with a large common offset lose nothing.
    """
    m_new = tl.maximum(m, tl.max(x, axis=0))
    m_ref = _finite_or_zero(m_new)
    return m_new, s * tl.exp2((m - m_ref) * LOG2E) + tl.exp2((x - m_ref) * LOG2E)


@jit
def _row_statistics(row_ptr, n_classes, BLOCK_V: tl.constexpr, SMOOTHING: tl.constexpr):
    """(max m, log-sum log(sum(exp(x - m))), mean(x) - m) of one row, streamed once in BLOCK_V chunks
    (the last 0 without SMOOTHING). Whole chunks load unmasked, so 16-bit rows are read with 128-bit
    loads even though 50,257 classes are not a multiple of 8."""
    cols = tl.arange(0, BLOCK_V)
    m = -float("inf")
    s = tl.zeros((BLOCK_V,), tl.float32)
    # Label smoothing needs the row's mean logit: summed as differences from the first logit, so rows
    # with a large common offset keep their precision.
    pivot = _finite_or_zero(tl.load(row_ptr).to(tl.float32)) if SMOOTHING else 0.0
    x_sum = tl.zeros((BLOCK_V,), tl.float32)
    n_whole = n_classes // BLOCK_V * BLOCK_V
    for start in range(0, n_whole, BLOCK_V):
        x = tl.load(row_ptr + start + cols).to(tl.float32)
        m, s = _logsumexp_step(m, s, x)
        if SMOOTHING:
            x_sum += x - pivot
    if n_whole < n_classes:
        tail = n_whole + cols
        x = tl.load(row_ptr + tail, mask=tail < n_classes, other=float("-inf")).to(tl.float32)
        m, s = _logsumexp_step(m, s, x)
        if SMOOTHING:
            x_sum += tl.where(tail < n_classes, x - pivot, 0.0)
    # mean(x) - m = mean(x - pivot) - (m - pivot): m - pivot is exact for nearby values.
    return m, tl.log(tl.sum(s, axis=0)), tl.sum(x_sum, axis=0) / n_classes - (m - pivot)


@jit
def _target_logit(row_ptr, target, n_classes):
    """The target's logit, one scalar load; a target outside [0, n_classes) gives NaN, not a wild read.
    A kernel that overwrites its row loads it before the row's reductions: their barriers then order
    every warp's load before any warp's store."""
    in_range = (target >= 0) & (target < n_classes)
    return tl.load(row_ptr + target, mask=in_range, other=float("nan")).to(tl.float32)


@jit
def _row_loss(picked, m, log_sum, mean_minus_max, smoothing, z_weight, SMOOTHING: tl.constexpr,
              Z_LOSS: tl.constexpr):
    """The row's loss from its statistics and the target's logit ``picked``."""
    loss = (m - picked) + log_sum  # lse - x[target], with the log-sum added last
    if SMOOTHING:  # (1 - e) * nll + e * (lse - mean(x)), as F.cross_entropy's label_smoothing
        loss = (1.0 - smoothing) * loss + smoothing * (log_sum - mean_minus_max)
    if Z_LOSS:  # PaLM's auxiliary loss: z * lse^2
        loss += z_weight * (m + log_sum) * (m + log_sum)
    return loss


@jit
def _cross_entropy_fwd(logits_ptr, targets_ptr, loss_ptr, stats_ptr, n_classes, stride_row, ignore_index,
                       smoothing, z_weight, BLOCK_V: tl.constexpr, SMOOTHING: tl.constexpr, Z_LOSS: tl.constexpr):
    # One row per program, read once; writes its loss and the pair (m, log-sum).
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    m, log_sum, mean_minus_max = _row_statistics(row_ptr, n_classes, BLOCK_V, SMOOTHING)
    tl.store(stats_ptr + 2 * row, m)
    tl.store(stats_ptr + 2 * row + 1, log_sum)
    target = tl.load(targets_ptr + row).to(tl.int64)
    loss = _row_loss(_target_logit(row_ptr, target, n_classes), m, log_sum, mean_minus_max, smoothing, z_weight,
                     SMOOTHING, Z_LOSS)
    tl.store(loss_ptr + row, tl.where(target == ignore_index, 0.0, loss))


@jit
def _grad_chunk(x, col, target, m_row, log_sum, scale, p_weight, on_target, uniform):
    """d loss / d x for one chunk of columns col: (softmax(x) * p_weight - onehot(target) * on_target
    - uniform) * scale; without smoothing and z-loss p_weight = on_target = 1 and uniform = 0."""
    p = tl.exp2(((x - m_row) - log_sum) * LOG2E)
    return (p * p_weight - tl.where(col == target, on_target, 0.0) - uniform) * scale


@jit
def _grad_weights(m_row, log_sum, n_classes, smoothing, z_weight, SMOOTHING: tl.constexpr, Z_LOSS: tl.constexpr):
    """_grad_chunk's (p_weight, on_target, uniform) for the options: constants the compiler folds away
    without smoothing and z-loss."""
    p_weight, on_target, uniform = 1.0, 1.0, 0.0
    if SMOOTHING:
        on_target = 1.0 - smoothing
        uniform = smoothing / n_classes
    if Z_LOSS:
        p_weight = 1.0 + 2.0 * z_weight * (m_row + log_sum)
    return p_weight, on_target, uniform


@jit
def _write_row_gradient(row_ptr, drow_ptr, target, scale, m_row, log_sum, n_classes, n_cols, smoothing, z_weight,
                        BLOCK_V: tl.constexpr, SMOOTHING: tl.constexpr, Z_LOSS: tl.constexpr):
    """Stream the row in BLOCK_V chunks and write its gradient times ``scale``, zero on the padding
    columns; each chunk is read before it is written, so drow_ptr may be row_ptr."""
    cols = tl.arange(0, BLOCK_V)
    p_weight, on_target, uniform = _grad_weights(m_row, log_sum, n_classes, smoothing, z_weight, SMOOTHING, Z_LOSS)
    n_whole = n_classes // BLOCK_V * BLOCK_V
    for start in range(0, n_whole, BLOCK_V):  # whole chunks: unmasked, vectorised loads and stores
        x = tl.load(row_ptr + start + cols).to(tl.float32)
        grad = _grad_chunk(x, start + cols, target, m_row, log_sum, scale, p_weight, on_target, uniform)
        tl.store(drow_ptr + start + cols, grad.to(drow_ptr.dtype.element_ty))
    for start in range(n_whole, n_cols, BLOCK_V):  # the last classes, then the padding columns
        col = start + cols
        x = tl.load(row_ptr + col, mask=col < n_classes, other=float("-inf")).to(tl.float32)
        grad = _grad_chunk(x, col, target, m_row, log_sum, scale, p_weight, on_target, uniform)
        if SMOOTHING:  # the uniform part stays off the padding columns
            grad = tl.where(col < n_classes, grad, 0.0)
        tl.store(drow_ptr + col, grad.to(drow_ptr.dtype.element_ty), mask=col < n_cols)


@jit
def _cross_entropy_bwd(dloss_ptr, logits_ptr, targets_ptr, stats_ptr, dlogits_ptr, n_classes, n_cols,
                       stride_row, stride_drow, ignore_index, smoothing, z_weight,
                       BLOCK_V: tl.constexpr, SMOOTHING: tl.constexpr, Z_LOSS: tl.constexpr):
    # One row per program: reads the row once and writes its gradient once, zero on ignored rows and
    # padding columns.
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row).to(tl.int64)
    # An ignored row's gradient is (softmax - onehot) * 0: exactly zero, as softmax <= 1.
    scale = tl.where(target == ignore_index, 0.0, tl.load(dloss_ptr + row))
    m_row, log_sum = tl.load(stats_ptr + 2 * row), tl.load(stats_ptr + 2 * row + 1)
    _write_row_gradient(logits_ptr + row * stride_row, dlogits_ptr + row * stride_drow, target, scale, m_row, log_sum,
                        n_classes, n_cols, smoothing, z_weight, BLOCK_V, SMOOTHING, Z_LOSS)


@jit
def _held_part(row_ptr, start, n_classes, n_cols, PART: tl.constexpr):
    """Columns [start, start + PART) of a row held in registers, as float32: masked at the row's width (a
    multiple of 8 in GPT-2's padded head: 128-bit loads), then -inf on the padding columns."""
    cols = start + tl.arange(0, PART)
    x = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
    return cols, tl.where(cols < n_classes, x, float("-inf"))


@jit
def _held_sums(x, cols, m, n_classes, SMOOTHING: tl.constexpr):
    """A held part's sum of exp(x - m) and (with SMOOTHING, else 0) of x - m over its classes."""
    x_sum = tl.sum(tl.where(cols < n_classes, x - m, 0.0), axis=0) if SMOOTHING else 0.0
    return tl.sum(tl.exp2((x - m) * LOG2E), axis=0), x_sum


@jit
def _write_held_gradient(x, cols, drow_ptr, target, scale, m, log_sum, weights, n_classes, n_cols,
                         SMOOTHING: tl.constexpr):
    """Write a held part's gradient; weights: :func:`_grad_weights`."""
    grad = _grad_chunk(x, cols, target, m, log_sum, scale, weights[0], weights[1], weights[2])
    if SMOOTHING:  # the uniform part stays off the padding columns
        grad = tl.where(cols < n_classes, grad, 0.0)
    tl.store(drow_ptr + cols, grad.to(drow_ptr.dtype.element_ty), mask=cols < n_cols)


@jit
def _held_loss_and_gradient(row_ptr, drow_ptr, loss_row_ptr, target, picked, scale, n_classes, n_cols, smoothing,
                            z_weight, BLOCK_V: tl.constexpr, PART_B: tl.constexpr, PART_C: tl.constexpr,
                            SMOOTHING: tl.constexpr, Z_LOSS: tl.constexpr):
    """Write the row's loss (0 where scale is 0: an ignored row) to loss_row_ptr, then its gradient: the
    row (BLOCK_V >= n_cols columns) loaded once into registers, in parts of BLOCK_V - PART_B - PART_C,
    PART_B and PART_C columns (0: no such part), each its own tensor (see :func:`held_parts`). The loss
    is stored before the gradient is computed: sm_90 with Triton 3.7 spills otherwise."""
    PART_A: tl.constexpr = BLOCK_V - PART_B - PART_C
    cols_a, x_a = _held_part(row_ptr, 0, n_classes, n_cols, PART_A)
    m = tl.max(x_a, axis=0)
    if PART_B > 0:
        cols_b, x_b = _held_part(row_ptr, PART_A, n_classes, n_cols, PART_B)
        m = tl.maximum(m, tl.max(x_b, axis=0))
    if PART_C > 0:
        cols_c, x_c = _held_part(row_ptr, PART_A + PART_B, n_classes, n_cols, PART_C)
        m = tl.maximum(m, tl.max(x_c, axis=0))
    s, x_sum = _held_sums(x_a, cols_a, m, n_classes, SMOOTHING)
    if PART_B > 0:
        s_b, x_sum_b = _held_sums(x_b, cols_b, m, n_classes, SMOOTHING)
        s, x_sum = s + s_b, x_sum + x_sum_b
    if PART_C > 0:
        s_c, x_sum_c = _held_sums(x_c, cols_c, m, n_classes, SMOOTHING)
        s, x_sum = s + s_c, x_sum + x_sum_c
    log_sum = tl.log(s)
    loss = _row_loss(picked, m, log_sum, x_sum / n_classes, smoothing, z_weight, SMOOTHING, Z_LOSS)
    tl.store(loss_row_ptr, tl.where(scale == 0.0, 0.0, loss))
    weights = _grad_weights(m, log_sum, n_classes, smoothing, z_weight, SMOOTHING, Z_LOSS)
    _write_held_gradient(x_a, cols_a, drow_ptr, target, scale, m, log_sum, weights, n_classes, n_cols, SMOOTHING)
    if PART_B > 0:
        _write_held_gradient(x_b, cols_b, drow_ptr, target, scale, m, log_sum, weights, n_classes, n_cols, SMOOTHING)
    if PART_C > 0:
        _write_held_gradient(x_c, cols_c, drow_ptr, target, scale, m, log_sum, weights, n_classes, n_cols, SMOOTHING)


@jit
def _cross_entropy_one_pass(logits_ptr, targets_ptr, loss_ptr, dlogits_ptr, n_classes, n_cols, stride_row,
                            stride_drow, ignore_index, smoothing, z_weight, BLOCK_V: tl.constexpr,
                            PART_B: tl.constexpr, PART_C: tl.constexpr, RESIDENT: tl.constexpr,
                            SMOOTHING: tl.constexpr, Z_LOSS: tl.constexpr):
    # One row per program: its loss and the gradient of the sum of the losses (zero on ignored rows and
    # padding columns), in one kernel. RESIDENT: the row (BLOCK_V >= n_cols columns) is loaded once into
    # registers and the gradient written from them. Otherwise its statistics are streamed in BLOCK_V
    # chunks, then the chunks re-read, as the program has just read them (from L2), and overwritten.
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    drow_ptr = dlogits_ptr + row * stride_drow
    target = tl.load(targets_ptr + row).to(tl.int64)
    scale = tl.where(target == ignore_index, 0.0, 1.0)
    picked = _target_logit(row_ptr, target, n_classes)  # before the reductions: the row is overwritten after
    if RESIDENT:
        _held_loss_and_gradient(row_ptr, drow_ptr, loss_ptr + row, target, picked, scale, n_classes, n_cols,
                                smoothing, z_weight, BLOCK_V, PART_B, PART_C, SMOOTHING, Z_LOSS)
    else:
        m, log_sum, mean_minus_max = _row_statistics(row_ptr, n_classes, BLOCK_V, SMOOTHING)
        loss = _row_loss(picked, m, log_sum, mean_minus_max, smoothing, z_weight, SMOOTHING, Z_LOSS)
        tl.store(loss_ptr + row, tl.where(target == ignore_index, 0.0, loss))
        _write_row_gradient(row_ptr, drow_ptr, target, scale, m, log_sum, n_classes, n_cols, smoothing, z_weight,
                            BLOCK_V, SMOOTHING, Z_LOSS)


@dataclass(frozen=True, order=True)
class ChunkConfig:
    """A cross-entropy kernel's launch configuration: rows walked in chunks of ``block_v`` columns by
    ``num_warps`` warps."""

    block_v: int
    num_warps: int


def block_config(n_cols: int) -> ChunkConfig:
    """Chunks of up to _MAX_BLOCK_V columns, 16 values per thread, for rows of ``n_cols`` (the forward:
    the classes; the backward: the whole row)."""
    block_v = min(_MAX_BLOCK_V, next_power_of_2(max(n_cols, 16)))
    return ChunkConfig(block_v, max(1, min(8, block_v // 512)))


def every_config() -> dict[str, tuple[ChunkConfig, ...]]:
    """Every configuration each kernel may launch with, for ahead-of-time checks."""
    configs = tuple(sorted({block_config(2**k) for k in range(4, _MAX_BLOCK_V.bit_length())}))
    return {"cross_entropy_fwd": configs, "cross_entropy_bwd": configs}


def one_pass_config(n_cols: int) -> ChunkConfig | None:
    """The one-pass kernel's configuration for rows of ``n_cols``: the whole row in registers up to
    ONE_PASS_RESIDENT_COLUMNS, else streamed twice in chunks; None within :func:`two_passes`."""
    if _two_passes.value:
        return None
    block_v = next_power_of_2(max(n_cols, _RESIDENT_PER_WARP))  # narrower rows: one warp, masked
    if block_v <= _WHOLE_BLOCK_COLUMNS:
        return ChunkConfig(block_v, min(32, block_v // _RESIDENT_PER_WARP))
    if n_cols <= ONE_PASS_RESIDENT_COLUMNS:
        return ChunkConfig(-(-n_cols // _HELD_PART_COLUMNS) * _HELD_PART_COLUMNS, _HELD_WARPS)
    return ChunkConfig(_STREAMED_BLOCK_V, _STREAMED_WARPS)


def held_parts(block_v: int) -> tuple[int, int, int]:
    """The powers of two a held row of ``block_v`` columns is loaded in, largest first (0: no such part):
    separate tensors, as one block padded to the next power of two would spill (65,536 columns for
    GPT-2's 50,304: 904 bytes a thread on sm_90, Triton 3.6)."""
    parts = [1 << bit for bit in reversed(range(block_v.bit_length())) if block_v >> bit & 1]
    if len(parts) > 3:
        raise ValueError(f"a held row of {block_v} columns is not a sum of at most three powers of two")
    return tuple(parts + [0] * (3 - len(parts)))


def every_one_pass_config() -> tuple[ChunkConfig, ...]:
    """Every configuration the one-pass kernel may launch with, for ahead-of-time checks: one per held
    width, and the streamed one."""
    whole = [2**k for k in range(_RESIDENT_PER_WARP.bit_length() - 1, _WHOLE_BLOCK_COLUMNS.bit_length())]
    parts = range(_WHOLE_BLOCK_COLUMNS + _HELD_PART_COLUMNS, ONE_PASS_RESIDENT_COLUMNS + 1, _HELD_PART_COLUMNS)
    return tuple(sorted({one_pass_config(n) for n in [*whole, *parts, ONE_PASS_RESIDENT_COLUMNS + 1]}))


def launch_forward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, num_classes: int,
                   label_smoothing: float, z_loss: float, config: ChunkConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward on (rows, n) logits, launched with ``config``: float32 per-row losses (0 where
    ignored), and per row the float32 pair (max, log-sum) the backward recomputes the softmax from."""
    n_rows = logits.shape[0]
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    stats = torch.empty(n_rows, 2, dtype=torch.float32, device=logits.device)
    if n_rows > 0:
        launch(_cross_entropy_fwd, (n_rows,), logits, targets.contiguous(), loss, stats, num_classes,
               logits.stride(0), ignore_index, label_smoothing, z_loss, BLOCK_V=config.block_v,
               SMOOTHING=label_smoothing > 0, Z_LOSS=z_loss > 0, num_warps=config.num_warps)
    return loss, stats


@kernel_op("cross_entropy_fwd")
def _forward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, num_classes: int,
             label_smoothing: float, z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`launch_forward` with the configuration for ``num_classes``."""
    return launch_forward(logits, targets, ignore_index, num_classes, label_smoothing, z_loss,
                          block_config(num_classes))


def write_gradient(dlogits: torch.Tensor, dloss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                   stats: torch.Tensor, ignore_index: int, num_classes: int, label_smoothing: float,
                   z_loss: float, config: ChunkConfig) -> None:
    """Launch the backward kernel into ``dlogits`` with ``config``; ``dlogits`` may be ``logits`` itself:
    each program reads a chunk of its row before it overwrites that chunk (the fused LM head writes in
    place)."""
    n_rows, n_cols = logits.shape
    if dlogits.numel() > 0:
        block_v, num_warps = config.block_v, config.num_warps
        launch(_cross_entropy_bwd, (n_rows,), dloss.float().contiguous(), logits, targets.contiguous(), stats,
               dlogits, num_classes, n_cols, logits.stride(0), dlogits.stride(0), ignore_index, label_smoothing,
               z_loss, BLOCK_V=block_v, SMOOTHING=label_smoothing > 0, Z_LOSS=z_loss > 0, num_warps=num_warps)


def write_loss_and_gradient(dlogits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                            num_classes: int, label_smoothing: float, z_loss: float,
                            config: ChunkConfig) -> torch.Tensor:
    """The one-pass kernel launched with ``config`` (the row held whole where ``config.block_v`` covers
    it): the float32 per-row losses, and into ``dlogits`` (which may be ``logits`` itself) the gradient
    of their sum."""
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows > 0:
        resident = config.block_v >= n_cols
        _, part_b, part_c = held_parts(config.block_v) if resident else (config.block_v, 0, 0)
        launch(_cross_entropy_one_pass, (n_rows,), logits, targets.contiguous(), loss, dlogits, num_classes, n_cols,
               logits.stride(0), dlogits.stride(0), ignore_index, label_smoothing, z_loss, BLOCK_V=config.block_v,
               PART_B=part_b, PART_C=part_c, RESIDENT=resident, SMOOTHING=label_smoothing > 0, Z_LOSS=z_loss > 0,
               num_warps=config.num_warps)
    return loss


def launch_backward(dloss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, stats: torch.Tensor,
                    ignore_index: int, num_classes: int, label_smoothing: float, z_loss: float,
                    config: ChunkConfig) -> torch.Tensor:
    """Triton backward, launched with ``config``: the logits' gradient, in their dtype and shape (rows, n)."""
    dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    write_gradient(dlogits, dloss, logits, targets, stats, ignore_index, num_classes, label_smoothing, z_loss, config)
    return dlogits


@kernel_op("cross_entropy_bwd")
def _backward(dloss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, stats: torch.Tensor,
              ignore_index: int, num_classes: int, label_smoothing: float, z_loss: float) -> torch.Tensor:
    """:func:`launch_backward` with the configuration for the logits' rows."""
    return launch_backward(dloss, logits, targets, stats, ignore_index, num_classes, label_smoothing, z_loss,
                           block_config(logits.shape[1]))


def _setup_context(ctx, inputs, output) -> None:
    logits, targets, *options = inputs
    ctx.save_for_backward(logits, targets, output[1])
    ctx.options = options  # ignore_index, num_classes, label_smoothing, z_loss


def _gradients(ctx, dloss, _dstats):
    logits, targets, stats = ctx.saved_tensors
    return _backward(dloss, logits, targets, stats, *ctx.options), None, None, None, None, None


_forward.register_autograd(_gradients, setup_context=_setup_context)


def _check_inputs(logits: torch.Tensor, targets: torch.Tensor, reduction: str, num_classes: int | None,
                  label_smoothing: float, z_loss: float) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or not logits.dtype.is_floating_point:
        raise ValueError("cross_entropy: logits must be a floating-point tensor of shape (..., classes)")
    check_options(logits.shape, targets, reduction, num_classes, label_smoothing, z_loss)


def check_options(logits_shape: torch.Size, targets: torch.Tensor, reduction: str, num_classes: int | None,
                  label_smoothing: float, z_loss: float, op: str = "cross_entropy") -> None:
    """The checks of everything but the logits' own type, for logits of shape ``logits_shape``."""
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if not 0.0 <= z_loss < float("inf"):
        raise ValueError(f"{op}: z_loss must be a finite number >= 0, got {z_loss}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != tuple(logits_shape[:-1]):
        shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"{op}: targets have shape {shape}, expected {tuple(logits_shape[:-1])} "
                         f"(the logits' shape {tuple(logits_shape)} without the class dimension)")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"{op}: targets must hold integer class ids, got dtype {targets.dtype}")
    if num_classes is not None and not 1 <= num_classes <= logits_shape[-1]:
        raise ValueError(f"{op}: num_classes {num_classes} must be between 1 and the logits' "
                         f"last dimension {logits_shape[-1]}")


def check_target_values(targets: torch.Tensor, ignore_index: int, num_classes: int) -> None:
    """One host sync: every target is a class id or ignore_index."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= num_classes))
    if targets.numel() and bool(bad.any()):
        value = targets[bad][0].item()
        raise ValueError(f"cross_entropy: target {value} is outside the classes [0, {num_classes}) "
                         f"and is not ignore_index ({ignore_index})")


def _kernel_problem(logits: torch.Tensor, targets: torch.Tensor, *args, **kwargs) -> str | None:
    problem = dtype_problem({"logits": logits}) or dtype_problem({"targets": targets}, TARGET_DTYPES)
    if problem is None and logits.shape[-1] == 0:
        problem = "logits have no classes"
    return problem


@backend.routed(_kernel_problem)
def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1,
                  reduction: str = "mean", num_classes: int | None = None, check_targets: bool = True,
                  label_smoothing: float = 0.0, z_loss: float = 0.0) -> torch.Tensor:
    """Cross-entropy of ``logits`` (..., classes) against integer ``targets`` (...), through the backend
    switch. The loss is float32 whatever the logits' dtype; the logits' gradient keeps their dtype.

    ``ignore_index`` marks positions left out (their loss and gradient are 0; ``"mean"`` averages
    over the others, NaN when there are none, as ``F.cross_entropy``). ``reduction`` is "mean",
    "sum" or "none" (a loss per position). ``num_classes``: only the first ``num_classes`` columns
    are classes, the rest (vocabulary padding) take no part and get a zero gradient.
    ``check_targets`` raises ValueError for a target that is neither a class nor ``ignore_index``;
    it costs one host sync and is skipped under ``torch.compile``, where such a target gives NaN.
    ``label_smoothing`` mixes the target with the uniform distribution over the classes, as
    ``F.cross_entropy`` defines it; ``z_loss`` adds ``z_loss * logsumexp(row)**2`` to each counted
    row's loss (PaLM's auxiliary loss, which keeps the log-normaliser near 0).
    """
    label_smoothing, z_loss = float(label_smoothing), float(z_loss)
    _check_inputs(logits, targets, reduction, num_classes, label_smoothing, z_loss)
    num_classes = logits.shape[-1] if num_classes is None else num_classes
    if check_targets and not torch.compiler.is_compiling():
        check_target_values(targets, ignore_index, num_classes)
    logits2, targets1 = as_rows(logits), targets.reshape(-1)
    if backend.route(cross_entropy, logits2, targets1):
        losses = _forward(logits2, targets1, ignore_index, num_classes, label_smoothing, z_loss)[0]
    else:
        classes = logits2[:, :num_classes].float()
        losses = F.cross_entropy(classes, targets1.long(), ignore_index=ignore_index, reduction="none",
                                 label_smoothing=label_smoothing)
        if z_loss > 0:
            losses = losses + torch.where(targets1 != ignore_index, z_loss * classes.logsumexp(-1) ** 2, 0.0)
    if reduction == "none":
        return losses.view(targets.shape)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (targets1 != ignore_index).sum()


# ---------------------------------------------------------------------------------------------
# The spec (``spec.OpSpec``): inputs, the launchers with explicit configurations, lab hooks and the
# benchmark: our kernels against F.cross_entropy as autocast runs it (on a float32 copy of the
# logits), its torch.compile, and Liger-Kernel's. Liger computes the gradient inside its forward
# (overwriting the logits), so its backward is nearly free and its forward does both passes' work:
# compare forward+backward.
# ---------------------------------------------------------------------------------------------


def _inputs(shape: tuple, dtype: torch.dtype, device: torch.device, options: dict,
            generator: torch.Generator | None) -> spec.Inputs:
    """logits (rows, columns), targets among the first ``classes`` columns; options:
    ``label_smoothing``, ``z_loss``, ``row_stride``."""
    rows, cols, classes = (*shape, shape[1])[:3]
    if classes > cols:
        raise ValueError(f"{classes} classes in rows of {cols} columns")
    targets = spec.class_ids(rows, classes, device, generator)
    return {"logits": spec.row_tensor(rows, cols, dtype, device, generator, options.get("row_stride"), scale=2.0),
            "targets": targets, "num_classes": classes, "label_smoothing": float(options.get("label_smoothing", 0.0)),
            "z_loss": float(options.get("z_loss", 0.0))}


def _launchers(inputs: spec.Inputs, configure: spec.Configure, phase: spec.Phase) -> None:
    logits, targets, classes = inputs["logits"], inputs["targets"], inputs["num_classes"]
    smoothing, z_loss = inputs["label_smoothing"], inputs["z_loss"]
    with phase("forward"):
        _, stats = launch_forward(logits, targets, -1, classes, smoothing, z_loss,
                                  configure(block_config(classes), "cross_entropy_fwd"))
    with phase("backward"):
        launch_backward(torch.randn(logits.shape[0], dtype=torch.float32, device=logits.device), logits, targets, stats,
                        -1, classes, smoothing, z_loss, configure(block_config(logits.shape[1]), "cross_entropy_bwd"))


def row_chunks(args: dict, grid: tuple) -> int:
    """The kernels' main-loop iterations: one row per program, its whole chunks."""
    return grid[0] * (args["n_classes"] // args["BLOCK_V"])


def _compared_kernel(logits, targets, num_classes, label_smoothing, z_loss):
    return cross_entropy(logits, targets, reduction="none", num_classes=num_classes, label_smoothing=label_smoothing,
                         z_loss=z_loss)


def _compared_reference(logits, targets, num_classes, label_smoothing, z_loss):
    return cross_entropy_reference(logits[:, :num_classes], targets, label_smoothing=label_smoothing, z_loss=z_loss)


def _compared_eager(logits, targets, num_classes, label_smoothing, z_loss):
    classes = logits[:, :num_classes]
    losses = F.cross_entropy(classes, targets, reduction="none", label_smoothing=label_smoothing)
    return losses + z_loss * classes.logsumexp(-1) ** 2 if z_loss else losses


def _eager(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=-1)


def _bench_inputs(size: dict, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    logits = torch.randn(size["rows"], size["vocab"], device=device, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, size["vocab"], (size["rows"],), device=device)
    return logits, targets


def _bytes(size: dict, elem: int) -> tuple[float, float]:
    """The fewest bytes: the forward reads the logits (and the targets); the backward reads the
    logits and writes their gradient."""
    rows, vocab = size["rows"], size["vocab"]
    return rows * vocab * elem + rows * 8, 2 * rows * vocab * elem + rows * 8


CHUNK_FIELDS = ("BLOCK_V", "num_warps")
TUNABLES = {"cross_entropy_fwd": spec.Tunable(CHUNK_FIELDS), "cross_entropy_bwd": spec.Tunable(CHUNK_FIELDS)}
MODELS = {"cross_entropy_fwd": spec.KernelModel(row_chunks), "cross_entropy_bwd": spec.KernelModel(row_chunks)}

SPECS = (spec.OpSpec(
    name="cross_entropy", order=50, function=cross_entropy,
    # Rows of 50,304 (GPT-2's padded vocabulary) holding 50,257 classes.
    shape_names=("rows", "columns", "classes"), optional=1,
    shapes=spec.Shapes(default=(16384, 50304, 50257), small=(16, 1000, 997),
                       odd=((33, 1000), (5, 4097), (3, 50304, 50257))),
    make_inputs=_inputs, launchers=_launchers, compared=(_compared_kernel, _compared_reference, _compared_eager),
    config_type=ChunkConfig, every_config=every_config, tunables=TUNABLES,
    options={"label_smoothing": float, "z_loss": float, "row_stride": int}, models=MODELS,
    benchmarks=(benchmark.KernelBench(
        name="cross_entropy",
        unit="GB/s",
        # Vocabularies padded to a multiple of 64, as the model's LM head pads GPT-2's 50,257 to 50,304.
        full=[benchmark.Sweep("rows=16384", "vocab",
                              [dict(rows=16384, vocab=v) for v in (8192, 32768, 50304, 128256)])],
        small=[benchmark.Sweep("rows=24", "vocab", [dict(rows=24, vocab=v) for v in (96, 300)])],
        headline=dict(rows=16384, vocab=50304),  # GPT-2 124M: 16 x 1024 tokens, its padded vocabulary
        providers={
            # check_targets=False: no host sync, as in the model
            "triton": benchmark.triton_backend(lambda logits, targets: cross_entropy(logits, targets,
                                                                                     check_targets=False)),
            "torch": benchmark.eager(_eager),
            "torch.compile": benchmark.compiled(_eager),
            "liger": benchmark.liger("liger_kernel.ops.cross_entropy", "LigerCrossEntropyFunction", (None, -1),
                                     output=0),
        },
        make_inputs=_bench_inputs, work=_bytes),),
),)
