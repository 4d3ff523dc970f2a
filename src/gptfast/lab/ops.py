"""The ops the lab knows: how to call each op's launchers on tensors without data, how to try
another block configuration, and what each kernel's main loop iterates over.

Each op runs its forward launcher (a ``@kernel_op`` function of ``kernels/<op>.py``) on device
"meta" tensors of the requested shape, then its backward launcher on tensors shaped like the
forward's outputs; ``common.capture_launches`` records every launch instead of running it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from unittest import mock

import torch

from gptfast.kernels.common import cdiv

from .compiler import LabError

layer_norm = importlib.import_module("gptfast.kernels.layer_norm")  # the modules, not the public ops
bias_gelu = importlib.import_module("gptfast.kernels.bias_gelu")
cross_entropy = importlib.import_module("gptfast.kernels.cross_entropy")
flash_attention = importlib.import_module("gptfast.kernels.flash_attention")


def kernel_name(kernel) -> str:
    """A kernel's short name: ``_attention_bwd_kv_kernel`` -> ``attention_bwd_kv``."""
    return getattr(kernel, "fn", kernel).__name__.strip("_").removesuffix("_kernel")


@dataclass(frozen=True)
class ConfigHook:
    """Where a kernel's block configuration is chosen: ``function`` of the op's module returns it,
    as a tuple of ``fields`` or (``attribute`` set) as a dataclass whose field ``attribute`` holds a
    BlockConfig. ``phase`` ("forward" / "backward") is the launcher that asks for it."""

    function: str
    fields: tuple[str, ...]
    phase: str
    attribute: str | None = None


@dataclass(frozen=True)
class KernelModel:
    """What one iteration of a kernel's main loop covers, for the static estimates. ``iterations``
    counts them over the whole launch from the kernel's named arguments and grid (None: the kernel
    has no loop, one iteration per program). ``elements``: per iteration (None: the product of its
    BLOCK_* sizes). ``matmuls``: matrix products of (elements x HEAD_DIM_PAD) per iteration, or a
    function of the named arguments that counts them."""

    iterations: Callable[[dict, tuple], int] | None = None
    elements: Callable[[dict], int] | None = None
    matmuls: int | Callable[[dict], int] = 0

    def matmuls_of(self, args: dict) -> int:
        return self.matmuls(args) if callable(self.matmuls) else self.matmuls


@dataclass(frozen=True)
class Op:
    name: str
    shape_names: tuple[str, ...]
    default_shape: tuple[int, ...]  # GPT-2 124M training
    optional: int  # how many trailing shape numbers may be left out
    module: object
    run: Callable[[tuple, torch.dtype, dict, Callable], None]  # (shape, dtype, options, phase)
    configs: dict[str, ConfigHook]  # kernel short name -> its hook
    models: dict[str, KernelModel]

    def parse_shape(self, text: str | None) -> tuple[int, ...]:
        if text is None:
            return self.default_shape
        try:
            shape = tuple(int(part) for part in text.split(","))
        except ValueError:
            shape = ()
        need = len(self.shape_names)
        if not need - self.optional <= len(shape) <= need or min(shape, default=0) < 1:
            count = f"{need - self.optional} or {need}" if self.optional else str(need)
            raise LabError(f"{self.name}: --shape {text!r} must be {count} positive integers: "
                           f"{','.join(self.shape_names)}" + (" (the last optional)" if self.optional else ""))
        return shape


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _rows(shape: tuple, dtype: torch.dtype, options: dict) -> torch.Tensor:
    """(rows, columns), with row stride ``options["row_stride"]`` (a view of wider rows) if given."""
    rows, cols = shape[:2]
    stride = options.get("row_stride", cols)
    return _meta(rows, stride, dtype=dtype)[:, :cols]


Phase = Callable[[str], contextlib.AbstractContextManager]  # "forward" / "backward" -> a context


def _run_layer_norm(shape: tuple, dtype: torch.dtype, options: dict, phase: Phase) -> None:
    x = _rows(shape, dtype, options)
    weight = _meta(shape[1], dtype=dtype) if options.get("weight", True) else None
    bias = _meta(shape[1], dtype=dtype) if options.get("bias", True) else None
    with phase("forward"):
        y, rstd, _ = layer_norm._forward(x=x, branch=None, weight=weight, bias=bias, eps=1e-5, out_dtype=dtype)
    with phase("backward"):
        layer_norm._backward(dy=torch.empty_like(y), x=x, weight=weight, has_bias=bias is not None, rstd=rstd,
                             dtotal=None)


def _run_bias_gelu(shape: tuple, dtype: torch.dtype, options: dict, phase: Phase) -> None:
    x = _rows(shape, dtype, options)
    bias = _meta(shape[1], dtype=dtype) if options.get("bias", True) else None
    approximate = options.get("approximate", "tanh")
    with phase("forward"):
        bias_gelu._forward(x, bias, approximate)
    with phase("backward"):
        bias_gelu._backward(torch.empty_like(x), x, bias, approximate)


def _run_cross_entropy(shape: tuple, dtype: torch.dtype, options: dict, phase: Phase) -> None:
    rows, cols, classes = (*shape, shape[1])[:3]
    if classes > cols:
        raise LabError(f"cross_entropy: --shape has {classes} classes in rows of {cols} columns")
    logits, targets = _rows((rows, cols), dtype, options), _meta(rows, dtype=torch.int64)
    smoothing, z_loss = float(options.get("label_smoothing", 0.0)), float(options.get("z_loss", 0.0))
    with phase("forward"):
        _, stats = cross_entropy._forward(logits, targets, -1, classes, smoothing, z_loss)
    with phase("backward"):
        cross_entropy._backward(_meta(rows, dtype=torch.float32), logits, targets, stats, -1, classes, smoothing,
                                z_loss)


def _run_flash_attention(shape: tuple, dtype: torch.dtype, options: dict, phase: Phase) -> None:
    batch, heads, q_len, head_dim, k_len = (*shape, shape[2])[:5]
    q = _meta(batch, heads, q_len, head_dim, dtype=dtype)
    k, v = (_meta(batch, heads, k_len, head_dim, dtype=dtype) for _ in range(2))
    causal, dropout_p = options.get("causal", True), float(options.get("dropout_p", 0.0))
    seed = torch.tensor(1234) if dropout_p > 0 else None  # on the CPU: the launcher reads it with int()
    key_start = _meta(batch, dtype=torch.int64) if options.get("key_start") else None
    scale = 1.0 / math.sqrt(head_dim)
    deterministic = bool(options.get("deterministic", True))
    with phase("forward"):
        out, lse = flash_attention._forward(q, k, v, causal, dropout_p, scale, seed, key_start, None, deterministic)
    with phase("backward"):
        flash_attention._backward(torch.empty_like(out), q, k, v, out, lse, causal, dropout_p, scale, seed,
                                  key_start, deterministic)


def _row_tiles(args: dict, grid: tuple) -> int:
    return cdiv(args["n_rows"], args["BLOCK_M"]) * (grid[1] if len(grid) > 1 else 1)


def _row_chunks(args: dict, grid: tuple) -> int:
    return grid[0] * (args["n_classes"] // args["BLOCK_V"])  # one row per program: its whole chunks


def visible_tiles(q_len: int, k_len: int, block_m: int, block_n: int, causal: bool) -> int:
    """(query block, key block) tiles holding a score some query may see: the tiles the attention
    kernels' loops visit (per batch x head), with the causal diagonal aligned bottom-right."""
    if not causal:
        return cdiv(q_len, block_m) * cdiv(k_len, block_n)
    offset = k_len - q_len
    return sum(cdiv(min(k_len, min(q_len, start + block_m) + offset), block_n) for start in range(0, q_len, block_m))


def _attention_tiles(args: dict, grid: tuple) -> int:
    return grid[1] * visible_tiles(args["q_len"], args["k_len"], args["BLOCK_M"], args["BLOCK_N"], args["CAUSAL"])


_ROW_HOOKS = ("BLOCK_M", "BLOCK_N", "num_warps")
_ATTENTION_HOOK = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")

OPS = {op.name: op for op in (
    Op("layer_norm", ("rows", "columns"), (16384, 768), 0, layer_norm, _run_layer_norm,
       {"layer_norm_fwd": ConfigHook("_block_config", _ROW_HOOKS, "forward"),
        "layer_norm_bwd": ConfigHook("_block_config", _ROW_HOOKS, "backward")},
       {"layer_norm_bwd": KernelModel(_row_tiles)}),
    Op("bias_gelu", ("rows", "columns"), (16384, 3072), 0, bias_gelu, _run_bias_gelu,
       {"bias_gelu_fwd": ConfigHook("_block_config", _ROW_HOOKS, "forward"),
        "bias_gelu_bwd": ConfigHook("_block_config", _ROW_HOOKS, "backward")},
       {"bias_gelu_bwd": KernelModel(_row_tiles)}),
    # Rows of 50,304 (GPT-2's padded vocabulary) holding 50,257 classes.
    Op("cross_entropy", ("rows", "columns", "classes"), (16384, 50304, 50257), 1, cross_entropy,
       _run_cross_entropy,
       {"cross_entropy_fwd": ConfigHook("_block_config", ("BLOCK_V", "num_warps"), "forward"),
        "cross_entropy_bwd": ConfigHook("_block_config", ("BLOCK_V", "num_warps"), "backward")},
       {"cross_entropy_fwd": KernelModel(_row_chunks), "cross_entropy_bwd": KernelModel(_row_chunks)}),
    Op("flash_attention", ("batch", "heads", "seq", "head_dim", "keys"), (16, 12, 1024, 64), 1, flash_attention,
       _run_flash_attention,
       {"attention_fwd": ConfigHook("_configs_for", _ATTENTION_HOOK, "forward", "forward"),
        # The forward with dropout or key_start (--option dropout_p=... or key_start=true): its own entry.
        "attention_fwd_masked": ConfigHook("_configs_for", _ATTENTION_HOOK, "forward", "forward_masked"),
        "attention_bwd_kv": ConfigHook("_configs_for", _ATTENTION_HOOK, "backward", "backward_kv"),
        # The same kernel with deterministic=False (--option deterministic=false): its own table entry.
        "attention_bwd_kv_atomic": ConfigHook("_configs_for", _ATTENTION_HOOK, "backward", "backward_kv_atomic"),
        "attention_bwd_q": ConfigHook("_configs_for", _ATTENTION_HOOK, "backward", "backward_q")},
       {"attention_fwd": KernelModel(_attention_tiles, matmuls=2),
        "attention_bwd_delta": KernelModel(elements=lambda a: a["BLOCK_M"] * a["HEAD_DIM_PAD"]),
        # With deterministic=False (DQ_SUM) it also computes each tile's dQ, a fifth product.
        "attention_bwd_kv": KernelModel(_attention_tiles, matmuls=lambda a: 4 if a["DQ_SUM"] is None else 5),
        "attention_bwd_q": KernelModel(_attention_tiles, matmuls=3)}),
)}


def get_op(name: str) -> Op:
    if name not in OPS:
        raise LabError(f"unknown op {name!r}: choose one of {', '.join(OPS)}")
    return OPS[name]


def parse_config(texts: list[str] | None) -> dict[str, dict[str, int]]:
    """``--config KERNEL:FIELD=VALUE[,FIELD=VALUE...]`` (repeatable) -> {kernel: {field: value}}."""
    overrides: dict[str, dict[str, int]] = {}
    for text in texts or []:
        kernel, _, fields = text.partition(":")
        try:
            pairs = dict(item.split("=", 1) for item in fields.split(","))
            overrides.setdefault(kernel.strip(), {}).update({k.strip(): int(v) for k, v in pairs.items()})
        except ValueError:
            raise LabError(f"--config {text!r}: expected KERNEL:FIELD=VALUE[,FIELD=VALUE...], "
                           "e.g. attention_bwd_kv:BLOCK_N=64,num_warps=4") from None
    return overrides


# The variants each op's run function reads from ``options``, with the type of each value.
OPTIONS = {"layer_norm": {"weight": bool, "bias": bool, "row_stride": int},
           "bias_gelu": {"bias": bool, "approximate": str, "row_stride": int},
           "cross_entropy": {"label_smoothing": float, "z_loss": float, "row_stride": int},
           "flash_attention": {"causal": bool, "dropout_p": float, "key_start": bool, "deterministic": bool}}
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


def parse_options(op: Op, texts: list[str] | None) -> dict:
    """``--option NAME=VALUE`` (repeatable) -> {name: value}, each of the type the op's variant takes."""
    options = {}
    for text in texts or []:
        name, _, value = text.partition("=")
        kind = OPTIONS[op.name].get(name.strip())
        try:
            if kind is None:
                raise ValueError
            options[name.strip()] = _BOOLEANS[value.strip().lower()] if kind is bool else kind(value.strip())
        except (KeyError, ValueError):
            known = ", ".join(f"{k} ({t.__name__})" for k, t in OPTIONS[op.name].items())
            raise LabError(f"--option {text!r}: {op.name} takes NAME=VALUE with NAME one of {known}") from None
    return options


def _replaced(config, hook: ConfigHook, values: dict[str, int]):
    if hook.attribute is None:
        return tuple(values.get(name, value) for name, value in zip(hook.fields, config))
    part = getattr(config, hook.attribute)
    part = dataclasses.replace(part, **{name.lower(): value for name, value in values.items()})
    return dataclasses.replace(config, **{hook.attribute: part})


@contextlib.contextmanager
def configured(op: Op, overrides: dict[str, dict[str, int]], phase: str) -> Iterator[None]:
    """The op's configuration functions patched, for the launchers of ``phase``, so that the kernels
    named in ``overrides`` get those fields instead of the ones the launcher would choose."""
    for kernel, values in overrides.items():
        if kernel not in op.configs:
            raise LabError(f"--config: {op.name} has no configurable kernel {kernel!r} "
                           f"(it has {', '.join(op.configs)})")
        unknown = set(values) - set(op.configs[kernel].fields)
        if unknown:
            raise LabError(f"--config {kernel}: unknown field(s) {', '.join(sorted(unknown))} "
                           f"(it takes {', '.join(op.configs[kernel].fields)})")
    hooks = [(op.configs[k], v) for k, v in overrides.items() if op.configs[k].phase == phase]
    with contextlib.ExitStack() as stack:
        for function in {hook.function for hook, _ in hooks}:
            original = getattr(op.module, function)
            mine = [(hook, values) for hook, values in hooks if hook.function == function]

            def patched(*args, _original=original, _mine=mine, **kwargs):
                config = _original(*args, **kwargs)
                for hook, values in _mine:
                    config = _replaced(config, hook, values)
                return config

            stack.enter_context(mock.patch.object(op.module, function, patched))
        yield
