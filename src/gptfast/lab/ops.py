"""The lab's reading of the command line against the ops' specs (``gptfast.kernels.registry``): which
op, its shape, its variant (``--option``) and the configurations to try (``--config``). What each op
runs, and how, is its spec's (``gptfast.kernels.spec.OpSpec``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from gptfast.kernels.registry import get_spec
from gptfast.kernels.spec import OpSpec

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
