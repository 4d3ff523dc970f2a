"""Causal attention: our flash-attention kernel against PyTorch's SDPA flash backend and eager math.

TFLOP/s count the two matmuls of the forward, 4 * batch * heads * seq^2 * head_dim, halved for the
causal mask; the backward does 2.5 times the forward's work. Sizes keep 16k tokens per batch with
heads * head_dim = 2048, so every point does the same matmul work per token and only seq grows.
The eager math path materialises the seq x seq scores and may run out of memory at long seq.

``DECODE_BENCH`` times one decoding step's attention: a query per (batch, head) over a cache of
``k_len`` keys (every key visible), the forward alone. Its figure is the cache read per second (GB/s:
K and V, the query and the output), so the report's percent of the copy ceiling is the share of the
memory bandwidth that the split-key decode kernels reach.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gptfast import kernels

from .kernel_bench import KernelBench, Sweep, eager, triton_backend

TOKENS, WIDTH = 16384, 2048
BACKWARD_WORK = 2.5  # the backward's FLOPs over the forward's


def _sdpa(backend: SDPBackend, causal: bool = True):
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return forward


def _inputs(size: dict, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    shape = (size["batch"], size["heads"], size["seq"], size["head_dim"])
    return tuple(torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))


def _flops(size: dict, elem: int) -> tuple[float, float]:
    forward = 4 * size["batch"] * size["heads"] * size["seq"] ** 2 * size["head_dim"] / 2
    return forward, BACKWARD_WORK * forward


def _size(seq: int, head_dim: int, tokens: int = TOKENS, width: int = WIDTH) -> dict:
    return dict(batch=tokens // seq, heads=width // head_dim, seq=seq, head_dim=head_dim)


BENCH = KernelBench(
    name="flash_attention",
    unit="TFLOP/s",
    full=[Sweep(f"head_dim={d}", "seq", [_size(s, d) for s in (512, 1024, 2048, 4096, 8192, 16384)])
          for d in (64, 128)],
    small=[Sweep("head_dim=16", "seq", [_size(s, 16, tokens=64, width=16) for s in (16, 32)])],
    headline=_size(1024, 64),
    providers={
        "triton": triton_backend(lambda q, k, v: kernels.flash_attention(q, k, v, causal=True)),
        # deterministic=False: dQ added up by atomics in the dK/dV kernel (the backward differs only)
        "triton/atomic-dq": triton_backend(lambda q, k, v: kernels.flash_attention(q, k, v, deterministic=False)),
        "sdpa-flash": eager(_sdpa(SDPBackend.FLASH_ATTENTION)),
        "sdpa-math": eager(_sdpa(SDPBackend.MATH)),
    },
    make_inputs=_inputs,
    work=_flops,
    baseline="sdpa-flash",
    targets=(_size(8192, 128),),  # the long-sequence forward: 450 TFLOP/s on an H200 is the aim
)


def _decode_inputs(size: dict, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    batch, heads, head_dim = size["batch"], size["heads"], size["head_dim"]
    q = torch.randn(batch, heads, 1, head_dim, device=device, dtype=dtype)
    return (q, *(torch.randn(batch, heads, size["k_len"], head_dim, device=device, dtype=dtype) for _ in range(2)))


def _decode_bytes(size: dict, elem: int) -> tuple[float, float]:
    rows = size["batch"] * size["heads"] * (2 * size["k_len"] + 2)  # K and V; the query and the output
    return rows * size["head_dim"] * elem, 0.0


def _decode_size(k_len: int, heads: int = 12, head_dim: int = 64, batch: int = 1) -> dict:
    return dict(batch=batch, heads=heads, k_len=k_len, head_dim=head_dim)


# One query sees every cached key: is_causal=False (SDPA's causal mask is aligned top-left).
DECODE_BENCH = KernelBench(
    name="attention_decode",
    unit="GB/s",
    full=[Sweep("GPT-2: 12 heads, head_dim=64", "k_len", [_decode_size(n) for n in (256, 1024, 4096, 16384, 65536)]),
          Sweep("32 heads, head_dim=128", "k_len", [_decode_size(n, 32, 128) for n in (256, 1024, 4096, 16384)])],
    small=[Sweep("head_dim=16", "k_len", [_decode_size(n, 2, 16) for n in (16, 40)])],
    headline=_decode_size(1024),
    providers={
        "triton": triton_backend(lambda q, k, v: kernels.flash_attention(q, k, v, causal=False)),
        "sdpa-flash": eager(_sdpa(SDPBackend.FLASH_ATTENTION, causal=False)),
        "sdpa-math": eager(_sdpa(SDPBackend.MATH, causal=False)),
    },
    make_inputs=_decode_inputs,
    work=_decode_bytes,
    baseline="sdpa-flash",
    passes=("forward",),
)
