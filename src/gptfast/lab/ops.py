"""The lab's reading of the command line against the ops' specs (``gptfast.kernels.registry``): which
op, its shape, its variant (``--option``) and the configurations to try (``--config``). What each op
runs, and how, is its spec's (``gptfast.kernels.spec.OpSpec``).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

from gptfast.kernels import backend
from gptfast.kernels.registry import get_spec
from gptfast.kernels.spec import OpSpec
from gptfast.precision import DTYPE_NAMES, dtype_name

from .compiler import LabError


def kernel_name(kernel) -> str:
    """A kernel's short name: ``_attention_bwd_kv_kernel`` -> ``attention_bwd_kv``."""
    return getattr(kernel, "fn", kernel).__name__.strip("_").removesuffix("_kernel")


def get_op(name: str) -> OpSpec:
    """The spec of the op ``name``; a LabError naming the known ops otherwise."""
    try:
        return get_spec(name)
    except ValueError as error:
        raise LabError(str(error)) from None


@contextlib.contextmanager
def refusals_as_lab_errors(op: OpSpec, shape: tuple, dtype: str) -> Iterator[None]:
    """Within the block, the op refusing its inputs (ValueError, RuntimeError, TypeError: a shape it
    cannot take) raises a LabError of one line naming the op, the shape and ``dtype``."""
    try:
        yield
    except LabError:
        raise
    except (ValueError, RuntimeError, TypeError) as error:
        first_line = str(error).partition("\n")[0]
        raise LabError(f"{op.name} {','.join(map(str, shape))} {dtype}: {first_line}") from error


def check_inputs(op: OpSpec, shape: tuple, dtype: str, options: dict) -> None:
    """A LabError of one line naming the op and ``shape`` unless the op takes these inputs as a caller's
    would be taken: its public function's own checks (run by eager PyTorch on tensors without data, of
    one row or batch: they depend on the widths) and its kernel's limits (``backend.kernel_problem``).
    ``dtype``: by either name (bf16, bfloat16...), as the message gives it."""
    torch_dtype = DTYPE_NAMES[dtype_name(dtype)]
    with refusals_as_lab_errors(op, shape, dtype):
        one_row = op.inputs((1, *shape[1:]), torch_dtype, "meta", options)
        no_data = {"check_targets": False} if "check_targets" in inspect.signature(op.function).parameters else {}
        with backend.use_backend("torch"):
            op.function(**one_row, **no_data)
        problem = backend.kernel_problem(op.function, **op.inputs(shape, torch_dtype, "meta", options))
    if problem:
        raise LabError(f"{op.name} {','.join(map(str, shape))} {dtype}: {problem}")


def parse_shape(op: OpSpec, text: str | None) -> tuple[int, ...]:
    """``--shape`` (comma-separated sizes in the op's ``shape_names`` order; None: its default shape)."""
    if text is None:
        return op.shapes.default
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    need = len(op.shape_names)
    if not need - op.optional <= len(shape) <= need or min(shape, default=0) < 1:
        count = f"{need - op.optional} or {need}" if op.optional else str(need)
        raise LabError(f"{op.name}: --shape {text!r} must be {count} positive integers: "
                       f"{','.join(op.shape_names)}" + (" (the last optional)" if op.optional else ""))
    return shape


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


def check_overrides(op: OpSpec, overrides: dict[str, dict[str, int]]) -> None:
    """A LabError unless every kernel ``overrides`` names is one of the op's tunables, with its fields."""
    for kernel, values in overrides.items():
        if kernel not in op.tunables:
            raise LabError(f"--config: {op.name} has no configurable kernel {kernel!r} "
                           f"(it has {', '.join(op.tunables) or 'none'})")
        fields = op.tunables[kernel].fields
        unknown = set(values) - set(fields)
        if unknown:
            raise LabError(f"--config {kernel}: unknown field(s) {', '.join(sorted(unknown))} "
                           f"(it takes {', '.join(fields)})")
        for field, value in values.items():
            rule = _field_rule(field, value)
            if rule:
                raise LabError(f"--config {kernel}: {field}={value} must be {rule}")


MAX_WARPS = 32  # a block's 1024 threads


def _field_rule(field: str, value: int) -> str | None:
    """What a launch parameter must be, when ``value`` is not that: BLOCK_* sizes are powers of two up to
    Triton's largest tensor, num_warps powers of two up to a block's 1024 threads, num_stages at least 1."""
    from triton.language import TRITON_MAX_TENSOR_NUMEL

    def power_of_two(n: int, limit: int) -> bool:
        return 1 <= n <= limit and n & (n - 1) == 0

    if field.startswith("BLOCK") and not power_of_two(value, TRITON_MAX_TENSOR_NUMEL):
        return f"a power of two from 1 to {TRITON_MAX_TENSOR_NUMEL:,} (Triton's largest block)"
    if field == "num_warps" and not power_of_two(value, MAX_WARPS):
        return f"a power of two from 1 to {MAX_WARPS}"
    if field == "num_stages" and value < 1:
        return "at least 1"
    return None


_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


def parse_options(op: OpSpec, texts: list[str] | None) -> dict:
    """``--option NAME=VALUE`` (repeatable) -> {name: value}, each of the type the op's variant takes."""
    options = {}
    for text in texts or []:
        name, _, value = text.partition("=")
        kind = op.options.get(name.strip())
        try:
            if kind is None:
                raise ValueError
            options[name.strip()] = _BOOLEANS[value.strip().lower()] if kind is bool else kind(value.strip())
        except (KeyError, ValueError):
            known = ", ".join(f"{k} ({t.__name__})" for k, t in op.options.items())
            raise LabError(f"--option {text!r}: {op.name} takes NAME=VALUE with NAME one of {known}") from None
    return options
