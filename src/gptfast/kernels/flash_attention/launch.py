"""The launchers: the forward (or, for a few queries, the split-key decode) and the backward, each
taking its configurations explicitly, and the PyTorch custom operators that choose them
(``table.configs_for``), so that torch.compile(fullgraph=True) treats the kernels as opaque calls with
known output shapes and a known backward.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager

import torch

from .. import common
from ..common import cdiv, kernel_op, launch, next_power_of_2, target_gpu, tracing
from .kernels import (
    _attention_bwd_delta_kernel,
    _attention_bwd_dq_reduce_kernel,
    _attention_bwd_kv_kernel,
    _attention_bwd_kv_one_query_kernel,
    _attention_bwd_q_kernel,
    _attention_decode_kernel,
    _attention_decode_reduce_kernel,
    _attention_fwd_kernel,
)
from .table import AttentionConfigs, BlockConfig, configs_for, head_dim_pad


def _seed_value(seed: torch.Tensor | None) -> int:
    """The Philox seed the kernels take (0 without dropout, and while tracing: no value then)."""
    return 0 if seed is None or tracing() else int(seed)


def dropout_seed() -> torch.Tensor:
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


def decodes(q: torch.Tensor, dropout_p: float) -> bool:
    """Whether the forward takes the split-key decode kernels (few queries, no dropout)."""
    return q.shape[-2] <= DECODE_ROWS and dropout_p == 0


def decode_chunk(q: torch.Tensor, k_len: int) -> int:
    """Keys per decode program: the cache is cut into enough chunks (of whole key blocks) that
    batch x heads x chunks programs fill every SM, when the cache has that many blocks."""
    splits = max(1, min(cdiv(common.sm_count(q.device), q.shape[0] * q.shape[1]), cdiv(k_len, DECODE_BLOCK_N)))
    return cdiv(cdiv(k_len, splits), DECODE_BLOCK_N) * DECODE_BLOCK_N


def _decode(q, k, v, out, lse, causal, scale, key_start, key_end) -> None:
    """Split-key attention (flash-decoding) into ``out`` and ``lse``: one program per (key chunk,
    batch x head) writes a partial output and LSE, then a reduction combines the chunks."""
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    chunk = decode_chunk(q, k_len)
    splits = cdiv(k_len, chunk)
    part_out = torch.empty((batch * heads, splits, q_len, head_dim), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((batch * heads, splits, q_len), dtype=torch.float32, device=q.device)
    launch(_attention_decode_kernel, (splits, batch * heads), q, k, v, part_out, part_lse, key_start, key_end,
           *q.stride(), *k.stride(), *v.stride(), heads, q_len, k_len, scale, chunk, HEAD_DIM=head_dim,
           HEAD_DIM_PAD=head_dim_pad(head_dim), BLOCK_M=DECODE_ROWS, BLOCK_N=DECODE_BLOCK_N, CAUSAL=causal,
           num_warps=4, num_stages=2)
    launch(_attention_decode_reduce_kernel, (q_len, batch * heads), part_out, part_lse, out, lse, splits, q_len,
           HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad(head_dim), SPLITS_PAD=next_power_of_2(splits),
           num_warps=4)


def launch_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout_p: float, scale: float,
                   seed: torch.Tensor | None, key_start: torch.Tensor | None, key_end: torch.Tensor | None,
                   configs: AttentionConfigs) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, LSE): the attention output (contiguous, q's dtype) and the float32 row log-sum-exp (+inf on
    rows that see no key), the forward kernel launched with ``configs``' entry for it (the decode kernels
    have fixed tiles). ``key_end`` is taken by the decode kernels only (:func:`decodes`)."""
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    out = torch.empty((batch, heads, q_len, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, q_len), dtype=torch.float32, device=q.device)
    config = configs.forward_masked if dropout_p > 0 or key_start is not None else configs.forward
    q, scale = _positive_scale(q, scale)
    if decodes(q, dropout_p):
        _decode(q, k, v, out, lse, causal, scale, key_start, key_end)
        return out, lse
    launch(
        _attention_fwd_kernel, (cdiv(q_len, config.block_m), batch * heads),
        q, k, v, out, lse, key_start, *q.stride(), *k.stride(), *v.stride(), heads, q_len, k_len, scale,
        dropout_p, _seed_value(seed), HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad(head_dim),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, CAUSAL=causal, DROPOUT=dropout_p > 0,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return out, lse


@kernel_op("flash_attention_forward")
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout_p: float, scale: float,
             seed: torch.Tensor | None, key_start: torch.Tensor | None, key_end: torch.Tensor | None = None,
             deterministic: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`launch_forward` with the configurations for q's device; ``deterministic`` is the backward's
    (``_backward``)."""
    return launch_forward(q, k, v, causal, dropout_p, scale, seed, key_start, key_end, configs_for(q))


# The most float32 partial dQ the 5-product backward may allocate (each key block's, over the query
# rows it sees: ``dq_workspace_rows``); a larger one, or a configuration whose BLOCK_N is not a multiple
# of its BLOCK_M (the workspace's layout), falls back to the dQ kernel (deterministic) or to atomics.
# GPT-2 124M's layer (batch 16, 12 heads, 1024 tokens, head dim 64, causal): 216 MiB with sm_90's 128-key
# blocks, 408 MiB with sm_80's 64.
DQ_WORKSPACE_LIMIT = 1 << 30
_no_dq_workspace = common.Switch(False)  # True within without_dq_workspace()


def without_dq_workspace() -> AbstractContextManager[None]:
    """Within the block, every backward runs as beyond ``DQ_WORKSPACE_LIMIT`` (its dQ by the dQ kernel,
    or by atomics where not ``deterministic``): how benchmarks time those paths at any size."""
    return _no_dq_workspace.set(True)


def dq_workspace_rows(q_len: int, k_len: int, causal: bool, config: BlockConfig) -> int:
    """Query rows of partial dQ per batch x head, over the key blocks (``kernels._dq_part_rows``): under
    the causal mask each block's from the first query block that sees it, to q_len rounded up to whole
    query blocks."""
    offset = k_len - q_len
    firsts = (max(start_n - offset, 0) // config.block_m * config.block_m if causal else 0
              for start_n in range(0, k_len, config.block_n))
    return sum(cdiv(q_len, config.block_m) * config.block_m - first for first in firsts)


def dq_workspace_bytes(q: torch.Tensor, k_len: int, causal: bool, config: BlockConfig) -> int:
    """Bytes of the float32 partial-dQ workspace of the dK/dV kernel run with ``config``."""
    return q.shape[0] * q.shape[1] * dq_workspace_rows(q.shape[2], k_len, causal, config) * q.shape[3] * 4


def _has_wgmma(q: torch.Tensor) -> bool:
    """Whether the kernels run on (or the lab targets) an sm_90 GPU: Hopper's wgmma instructions."""
    gpu = target_gpu()
    if gpu is not None:
        return gpu.arch == 90
    return q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) == (9, 0)


def launch_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, causal: bool, dropout_p: float, scale: float, seed: torch.Tensor | None,
                    key_start: torch.Tensor | None, deterministic: bool,
                    configs: AttentionConfigs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV), contiguous, in the inputs' dtype, the kernels launched with ``configs``' entries.

    Where the workspace fits (``DQ_WORKSPACE_LIMIT``), whatever ``deterministic`` says: the dK/dV
    kernel also writes each tile's share of dQ, per key block, and a small kernel sums them in a fixed
    order (5 products and 1 exponential per score, bitwise the same run to run). Beyond it,
    ``deterministic``: dQ by its own kernel, which recomputes the scores (7 and 2); else added up by
    atomics in the dK/dV kernel into a float32 dQ that the delta kernel zeroes and the last key block
    done with each query block converts (the order, so dQ's last bits, vary)."""
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    if causal and q_len > k_len:  # the workspace's layout (and the public op) assume every query has keys
        raise ValueError(f"causal attention's backward needs at least as many keys as queries: q_len {q_len}, "
                         f"k_len {k_len}")
    dim_pad = head_dim_pad(head_dim)
    seed_value = _seed_value(seed)
    config = configs.backward_kv_dq_masked if dropout_p > 0 or key_start is not None else configs.backward_kv_dq
    dq_part = dq_sum = dq_count = None
    workspace = dq_workspace_bytes(q, k_len, causal, config) if config.block_n % config.block_m == 0 else None
    if workspace is not None and workspace <= DQ_WORKSPACE_LIMIT and not _no_dq_workspace.value:
        dq_part = torch.empty(workspace // 4, dtype=torch.float32, device=q.device)
    elif not deterministic:  # zeroed by the delta kernel; the atomics take registers, as dropout's mask does
        config = configs.backward_kv_dq_masked
        dq_sum = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dq_count = torch.zeros((batch * heads, cdiv(q_len, config.block_m)), dtype=torch.int32, device=q.device)
    else:
        config = configs.backward_kv
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    atomic_dq = dq if dq_sum is not None else None  # written by the atomic path's last key blocks
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    stats_stride = cdiv(q_len, 16) * 16  # so that the row statistics load in 128-bit accesses at any q_len
    lse2, delta = torch.empty((2, batch * heads, stats_stride), dtype=torch.float32, device=q.device)
    delta_rows = 64  # query rows per program of the small dot(dO, O) pass
    launch(_attention_bwd_delta_kernel, (cdiv(q_len, delta_rows), batch * heads), out, grad_out, lse, lse2, delta,
           dq_sum, atomic_dq if key_start is not None else None, *grad_out.stride(), heads, q_len, stats_stride,
           HEAD_DIM=head_dim, HEAD_DIM_PAD=dim_pad, BLOCK_M=delta_rows)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    shared = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=dim_pad, CAUSAL=causal)
    kv_kernel = _attention_bwd_kv_kernel if q_len > 1 else _attention_bwd_kv_one_query_kernel
    launch(kv_kernel, (cdiv(k_len, config.block_n), batch * heads), q, k, v, grad_out, lse2, delta, dk, dv,
           key_start, dq_part, dq_sum, atomic_dq, dq_count, *strides, heads, q_len, k_len, stats_stride, scale,
           dropout_p, seed_value, BLOCK_M=config.block_m, BLOCK_N=config.block_n, num_warps=config.num_warps,
           num_stages=config.num_stages, DROPOUT=dropout_p > 0, WGMMA=_has_wgmma(q), **shared)
    if dq_sum is not None:
        return dq, dk, dv
    if dq_part is not None:
        launch(_attention_bwd_dq_reduce_kernel, (cdiv(q_len, config.block_m), batch * heads), dq_part, dq,
               key_start, heads, q_len, k_len, scale, BLOCK_M=config.block_m, BLOCK_N=config.block_n, **shared)
        return dq, dk, dv
    config = configs.backward_q
    launch(_attention_bwd_q_kernel, (cdiv(q_len, config.block_m), batch * heads), q, k, v, grad_out, lse2, delta,
           dq, key_start, *strides, heads, q_len, k_len, stats_stride, scale, dropout_p, seed_value,
           BLOCK_M=config.block_m, BLOCK_N=config.block_n, num_warps=config.num_warps, num_stages=config.num_stages,
           DROPOUT=dropout_p > 0, **shared)
    return dq, dk, dv


@kernel_op("flash_attention_backward")
def _backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, causal: bool, dropout_p: float, scale: float, seed: torch.Tensor | None,
              key_start: torch.Tensor | None,
              deterministic: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`launch_backward` with the configurations for q's device."""
    return launch_backward(grad_out, q, k, v, out, lse, causal, dropout_p, scale, seed, key_start, deterministic,
                           configs_for(q))


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
