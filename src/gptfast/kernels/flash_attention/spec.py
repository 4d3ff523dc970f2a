"""Flash attention's spec (``gptfast.kernels.spec.OpSpec``): inputs, the launchers with explicit
configurations, lab hooks, the configuration table ``lab tune`` writes, and the benchmarks.

The training benchmark: causal attention against PyTorch's SDPA flash backend and eager math. TFLOP/s
count the two matmuls of the forward, 4 * batch * heads * seq^2 * head_dim, halved for the causal
mask; the backward does 2.5 times the forward's work. Sizes keep 16k tokens per batch with heads *
head_dim = 2048, so every point does the same matmul work per token and only seq grows. The eager
math path materialises the seq x seq scores and may run out of memory at long seq.

The decode benchmark (``attention_decode``) times one decoding step's attention: a query per (batch,
head) over a cache of ``k_len`` keys (every key visible), the forward alone. Its figure is the cache
read per second (GB/s: K and V, the query and the output), so the report's percent of the copy
ceiling is the share of the memory bandwidth that the split-key decode kernels reach.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import backend, benchmark, spec
from ..common import cdiv
from . import launch
from .launch import launch_backward, launch_forward
from .op import flash_attention
from .reference import attention_reference
from .table import (
    ARCHES,
    AttentionConfigs,
    BlockConfig,
    ConfigTable,
    configs_for,
    head_dim_pad,
    load_table,
    table_for,
    table_path,
    tuned_configs,
    write_table,
)

# ---- inputs and launchers ----


def _inputs(shape: tuple, dtype: torch.dtype, device: torch.device, options: dict,
            generator: torch.Generator | None) -> spec.Inputs:
    """q (batch, heads, seq, head_dim), k and v (keys: the optional fifth size, else seq); options:
    ``causal``, ``dropout_p``, ``key_start`` (True: left padding of up to half the keys per batch row),
    ``deterministic``."""
    batch, heads, q_len, head_dim, k_len = (*shape, shape[2])[:5]
    make = dict(dtype=dtype, device=device, generator=generator)
    return {"q": spec.tensor(batch, heads, q_len, head_dim, **make),
            "k": spec.tensor(batch, heads, k_len, head_dim, **make),
            "v": spec.tensor(batch, heads, k_len, head_dim, **make),
            "causal": bool(options.get("causal", True)), "dropout_p": float(options.get("dropout_p", 0.0)),
            "key_start": spec.class_ids(batch, k_len // 2 + 1, device, generator) if options.get("key_start") else None,
            "deterministic": bool(options.get("deterministic", True))}


def _training_inputs(inputs: spec.Inputs) -> spec.Inputs:
    """As GPT training passes them (self-attention, as many keys as queries): q, k and v the transposed
    views of one (batch, seq, 3, heads, head_dim) projection (``model.CausalSelfAttention``), no data."""
    q, k = inputs["q"], inputs["k"]
    if q.shape != k.shape:
        return inputs
    batch, heads, seq, head_dim = q.shape
    qkv = torch.empty(batch, seq, 3, heads, head_dim, dtype=q.dtype, device=q.device)
    return {**inputs, **{name: t.transpose(1, 2) for name, t in zip("qkv", qkv.unbind(2))}}


def _launchers(inputs: spec.Inputs, configure: spec.Configure, phase: spec.Phase) -> None:
    q, k, v, causal, dropout_p = (inputs[name] for name in ("q", "k", "v", "causal", "dropout_p"))
    key_start, deterministic = inputs["key_start"], inputs["deterministic"]
    seed = torch.tensor(1234) if dropout_p > 0 else None  # on the CPU: the launchers read it with int()
    scale = 1.0 / math.sqrt(q.shape[-1])
    configs = configure(configs_for(q), *TUNABLES)
    with phase("forward"):
        out, lse = launch_forward(q, k, v, causal, dropout_p, scale, seed, key_start, None, configs)
    with phase("backward"):
        launch_backward(torch.randn_like(out), q, k, v, out, lse, causal, dropout_p, scale, seed, key_start,
                        deterministic, configs)


def _reference(q, k, v, causal=True, dropout_p=0.0, key_start=None, deterministic=True):
    return attention_reference(q, k, v, causal, key_start=key_start)


def _eager(q, k, v, causal=True, dropout_p=0.0, key_start=None, deterministic=True):
    """The public function's eager path (PyTorch's SDPA), in the inputs' dtype."""
    with backend.use_backend("torch"):
        return flash_attention(q, k, v, causal, dropout_p, key_start=key_start)


def _check_problem(dtype: torch.dtype, device: torch.device) -> str | None:
    if dtype == torch.bfloat16 and device.type == "cpu":
        return ("flash_attention in bfloat16 cannot be checked on a CPU: the Triton interpreter computes "
                "bfloat16 dot products wrongly (use --dtype fp16 or fp32, or a GPU)")
    return None


# ---- lab hooks ----

_FIELDS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
TUNABLES = {
    "attention_fwd": spec.Tunable(_FIELDS, "forward"),
    # The forward with dropout or key_start (--option dropout_p=... or key_start=true): its own entry.
    "attention_fwd_masked": spec.Tunable(_FIELDS, "forward_masked"),
    # The dK/dV kernel that also writes dQ (and the dQ sum's tiles): the backward wherever its float32
    # workspace fits (launch.DQ_WORKSPACE_LIMIT).
    "attention_bwd_kv_dq": spec.Tunable(_FIELDS, "backward_kv_dq"),
    # The same with dropout or key_start (--option dropout_p=... or key_start=true): its own entry.
    "attention_bwd_kv_dq_masked": spec.Tunable(_FIELDS, "backward_kv_dq_masked"),
    # The backward beyond it: the dK/dV kernel alone, then the dQ kernel (deterministic=True).
    "attention_bwd_kv": spec.Tunable(_FIELDS, "backward_kv"),
    "attention_bwd_q": spec.Tunable(_FIELDS, "backward_q"),
}


def every_config() -> dict[str, tuple[BlockConfig, ...]]:
    """Every configuration of the shipped tables, by kernel (``TUNABLES``)."""
    tables = [load_table(table_path(table)) for table in ARCHES]
    return {kernel: tuple(sorted({getattr(configs, tunable.attribute) for table in tables
                                  for configs in table.configs.values()}, key=dataclasses.astuple))
            for kernel, tunable in TUNABLES.items()}


def _span_tiles(lo: int, mid: int, full_end: int, end: int, block: int) -> tuple[int, int]:
    """(masked, unmasked) blocks of the kernels' three spans of a range (``kernels._span``)."""
    masked = cdiv(max(mid - lo, 0), block) + cdiv(max(end - max(mid, full_end), 0), block)
    return masked, cdiv(max(full_end - mid, 0), block)


def key_span_tiles(q_len: int, k_len: int, block_m: int, block_n: int, causal: bool) -> tuple[int, int]:
    """(masked, unmasked) tiles per batch x head of the kernels that loop over key blocks for each query
    block (forward, dQ), as ``kernels._key_range`` splits them, without padding (key_start 0)."""
    totals = [0, 0]
    for start_m in range(0, q_len, block_m):
        full_end, end = k_len // block_n * block_n, k_len
        if causal:
            first_pos = start_m + k_len - q_len
            full_end, end = min(full_end, (first_pos + 1) // block_n * block_n), min(end, first_pos + block_m)
        for i, n in enumerate(_span_tiles(0, 0, max(0, full_end), end, block_n)):
            totals[i] += n
    return totals[0], totals[1]


def query_span_tiles(q_len: int, k_len: int, block_m: int, block_n: int, causal: bool) -> tuple[int, int]:
    """The same for the dK/dV kernel, which loops over query blocks for each key block
    (``kernels._query_range``)."""
    totals = [0, 0]
    end, full_end = cdiv(q_len, block_m) * block_m, q_len // block_m * block_m
    for start_n in range(0, k_len, block_n):
        lo = diag_end = 0
        if causal:
            offset = k_len - q_len
            lo = max(start_n - offset, 0) // block_m * block_m
            diag_end = min(cdiv(max(start_n + block_n - 1 - offset, 0), block_m) * block_m, end)
        diag_end = end if start_n + block_n > k_len else diag_end
        for i, n in enumerate(_span_tiles(lo, diag_end, full_end, end, block_m)):
            totals[i] += n
    return totals[0], totals[1]


def _tiles(spans, masked: bool):
    """A KernelModel count: the masked or the unmasked tiles of ``spans`` over the launch."""
    def count(args: dict, grid: tuple) -> int:
        tiles = spans(args["q_len"], args["k_len"], args["BLOCK_M"], args["BLOCK_N"], args["CAUSAL"])
        return grid[1] * tiles[0 if masked else 1]
    return count


def _decode_tiles(args: dict, grid: tuple) -> int:
    """The decode kernel's key blocks: each program's chunk of keys in BLOCK_N steps."""
    chunk, k_len = args["chunk"], args["k_len"]
    return grid[1] * sum(cdiv(max(0, min(chunk, k_len - split * chunk)), args["BLOCK_N"]) for split in range(grid[0]))


# The main loop is the unmasked span's; the diagonal and edge tiles run the masked spans' loops.
MODELS = {
    "attention_fwd": spec.KernelModel(_tiles(key_span_tiles, False), matmuls=2, masked=_tiles(key_span_tiles, True)),
    "attention_bwd_delta": spec.KernelModel(elements=lambda a: a["BLOCK_M"] * a["HEAD_DIM_PAD"]),
    # With a dQ workspace (DQ_PART) or atomics (DQ_SUM) it also computes each tile's dQ, a fifth product.
    "attention_bwd_kv": spec.KernelModel(_tiles(query_span_tiles, False),
                                         matmuls=lambda a: 4 if a["DQ_PART"] is None and a["DQ_SUM"] is None else 5,
                                         masked=_tiles(query_span_tiles, True)),
    # Its loop adds one key block's (HEAD_DIM_PAD x BLOCK_M) partial dQ: as many as the dK/dV kernel's tiles.
    "attention_bwd_dq_reduce": spec.KernelModel(lambda a, grid: sum(_tiles(query_span_tiles, m)(a, grid)
                                                                    for m in (False, True)),
                                                elements=lambda a: a["BLOCK_M"] * a["HEAD_DIM_PAD"]),
    "attention_bwd_q": spec.KernelModel(_tiles(key_span_tiles, False), matmuls=3, masked=_tiles(key_span_tiles, True)),
    "attention_decode": spec.KernelModel(_decode_tiles, matmuls=2),
}

# `lab tune`'s candidates without --config: the shipped table ("shipped", no override) and, one kernel at
# a time, the tile shapes and warp counts the Hopper and Ampere entries choose among.
TUNE_CANDIDATES = (("shipped",)
                   + tuple(f"attention_fwd:BLOCK_M={m},BLOCK_N={n},num_warps={w},num_stages={s}"
                           for m, n, w, s in ((128, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3),
                                              (128, 32, 8, 3)))
                   + tuple(f"attention_bwd_kv_dq:BLOCK_M={m},BLOCK_N={n},num_warps={w}"
                           for m, n, w in ((64, 64, 4), (32, 64, 4), (64, 128, 8), (16, 128, 8))))


def _save_tuned(shape: tuple, dtype: torch.dtype, overrides: dict, note: str, path: Path | None) -> str:
    """Put the configurations ``overrides`` make of this GPU's entry for ``shape`` and ``dtype`` into its
    table (its JSON file, or ``path``), ``note`` added to the table's source."""
    props = torch.cuda.get_device_properties(0)
    table_id = table_for(props.major, props.minor, getattr(props, "shared_memory_per_block_optin", None))
    key = (head_dim_pad(shape[3]), dtype.itemsize)
    winner: AttentionConfigs = tuned_configs(table_id, *key)
    for kernel, values in overrides.items():
        winner = TUNABLES[kernel].applied(winner, values)
    table = load_table(table_path(table_id))
    path = path or table_path(table_id)
    write_table(path, ConfigTable(f"{table.source} Entry {key} (head_dim_pad, element_size) {note}",
                                  {**table.configs, key: winner}))
    return f"wrote the winner into {path} (entry {key})"


# ---- benchmarks ----

TOKENS, WIDTH = 16384, 2048
BACKWARD_WORK = 2.5  # the backward's FLOPs over the forward's


def _without_dq_workspace(deterministic: bool):
    """Causal attention whose Triton backward runs as beyond the dQ workspace's limit
    (``launch.without_dq_workspace``): atomics (not ``deterministic``) or the dQ kernel."""
    class Attention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            scale = 1.0 / math.sqrt(q.shape[-1])
            out, lse = launch.launch_forward(q, k, v, True, 0.0, scale, None, None, None, configs_for(q))
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad_out: torch.Tensor):
            q, k, v, out, lse = ctx.saved_tensors
            with launch.without_dq_workspace():
                return launch.launch_backward(grad_out.contiguous(), q, k, v, out, lse, True, 0.0,
                                              1.0 / math.sqrt(q.shape[-1]), None, None, deterministic, configs_for(q))

    return Attention.apply


def _sdpa(sdpa_backend: SDPBackend, causal: bool = True):
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(sdpa_backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return forward


def _bench_inputs(size: dict, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    shape = (size["batch"], size["heads"], size["seq"], size["head_dim"])
    return tuple(torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))


def _flops(size: dict, elem: int) -> tuple[float, float]:
    forward = 4 * size["batch"] * size["heads"] * size["seq"] ** 2 * size["head_dim"] / 2
    return forward, BACKWARD_WORK * forward


def _size(seq: int, head_dim: int, tokens: int = TOKENS, width: int = WIDTH) -> dict:
    return dict(batch=tokens // seq, heads=width // head_dim, seq=seq, head_dim=head_dim)


def _decode_inputs(size: dict, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    batch, heads, head_dim = size["batch"], size["heads"], size["head_dim"]
    q = torch.randn(batch, heads, 1, head_dim, device=device, dtype=dtype)
    return (q, *(torch.randn(batch, heads, size["k_len"], head_dim, device=device, dtype=dtype) for _ in range(2)))


def _decode_bytes(size: dict, elem: int) -> tuple[float, float]:
    rows = size["batch"] * size["heads"] * (2 * size["k_len"] + 2)  # K and V; the query and the output
    return rows * size["head_dim"] * elem, 0.0


def _decode_size(k_len: int, heads: int = 12, head_dim: int = 64, batch: int = 1) -> dict:
    return dict(batch=batch, heads=heads, k_len=k_len, head_dim=head_dim)


def _benchmarks() -> tuple[benchmark.KernelBench, ...]:
    training = benchmark.KernelBench(
        name="flash_attention",
        unit="TFLOP/s",
        full=[benchmark.Sweep(f"head_dim={d}", "seq", [_size(s, d) for s in (512, 1024, 2048, 4096, 8192, 16384)])
              for d in (64, 128)],
        small=[benchmark.Sweep("head_dim=16", "seq", [_size(s, 16, tokens=64, width=16) for s in (16, 32)])],
        headline=_size(1024, 64),
        providers={
            "triton": benchmark.triton_backend(lambda q, k, v: flash_attention(q, k, v, causal=True)),
            # The backward's paths beyond the dQ workspace's limit, forced at every size: dQ added up by
            # atomics in the dK/dV kernel (deterministic=False), or by its own kernel (the backward differs only)
            "triton/atomic-dq": benchmark.triton_backend(_without_dq_workspace(deterministic=False)),
            "triton/dq-kernel": benchmark.triton_backend(_without_dq_workspace(deterministic=True)),
            "sdpa-flash": benchmark.eager(_sdpa(SDPBackend.FLASH_ATTENTION)),
            "sdpa-math": benchmark.eager(_sdpa(SDPBackend.MATH)),
        },
        make_inputs=_bench_inputs,
        work=_flops,
        baseline="sdpa-flash",
        targets=(_size(8192, 128),),  # the long-sequence forward: 450 TFLOP/s on an H200 is the aim
    )
    # One query sees every cached key: is_causal=False (SDPA's causal mask is aligned top-left).
    decode = benchmark.KernelBench(
        name="attention_decode",
        unit="GB/s",
        full=[benchmark.Sweep("GPT-2: 12 heads, head_dim=64", "k_len",
                              [_decode_size(n) for n in (256, 1024, 4096, 16384, 65536)]),
              benchmark.Sweep("32 heads, head_dim=128", "k_len",
                              [_decode_size(n, 32, 128) for n in (256, 1024, 4096, 16384)])],
        small=[benchmark.Sweep("head_dim=16", "k_len", [_decode_size(n, 2, 16) for n in (16, 40)])],
        headline=_decode_size(1024),
        providers={
            "triton": benchmark.triton_backend(lambda q, k, v: flash_attention(q, k, v, causal=False)),
            "sdpa-flash": benchmark.eager(_sdpa(SDPBackend.FLASH_ATTENTION, causal=False)),
            "sdpa-math": benchmark.eager(_sdpa(SDPBackend.MATH, causal=False)),
        },
        make_inputs=_decode_inputs,
        work=_decode_bytes,
        shape_of=lambda size: (size["batch"], size["heads"], 1, size["head_dim"], size["k_len"]),
        size_of=lambda shape: dict(batch=shape[0], heads=shape[1], k_len=shape[-1], head_dim=shape[3]),
        baseline="sdpa-flash",
        passes=("forward",),
    )
    return training, decode


SPECS = (spec.OpSpec(
    name="flash_attention", order=40, function=flash_attention,
    shape_names=("batch", "heads", "seq", "head_dim", "keys"), optional=1,
    # odd: lengths no block divides, a padded head dim, fewer queries than keys, and the decode path (1 query).
    shapes=spec.Shapes(default=(16, 12, 1024, 64), small=(1, 2, 64, 32),
                       odd=((1, 2, 63, 80), (1, 1, 40, 32, 57), (1, 2, 1, 64, 65))),
    make_inputs=_inputs, launchers=_launchers, compared=(flash_attention, _reference, _eager),
    training_inputs=_training_inputs,
    config_type=AttentionConfigs, every_config=every_config, tunables=TUNABLES,
    options={"causal": bool, "dropout_p": float, "key_start": bool, "deterministic": bool}, models=MODELS,
    benchmarks=_benchmarks(), check_problem=_check_problem, tune_candidates=TUNE_CANDIDATES, save_tuned=_save_tuned,
    tf32=True, per_gpu=True,
),)
