"""What each op declares about itself, so that every tool iterates ops rather than naming them.

An op's file (or package) ends with ``SPECS = (<OpSpec>, ...)``; ``registry`` finds them, listed by
their ``order``. An :class:`OpSpec` holds the public function, an input maker (its inputs named as the
public function's arguments), the functions ``lab check`` compares (the kernel, its float64 reference,
eager PyTorch), the shapes the tools use (:class:`Shapes`), the launchers' entry point with an
explicit configuration, the configuration type and every configuration the launchers may choose, and
the lab's hooks: the variants (``--option``), the kernels ``--config`` may set (:class:`Tunable`),
what each kernel's main loop covers (:class:`KernelModel`) and the op's benchmarks
(``benchmark.KernelBench``).

The configurations are dataclasses whose fields are the lower-case launch parameters
(``block_m``, ``num_warps``...): ``--config KERNEL:BLOCK_M=64`` sets ``block_m``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .benchmark import KernelBench

Inputs = dict[str, Any]  # the public function's arguments by name: tensors (None where left out) and values
Configure = Callable[..., Any]  # configure(config, *kernel names) -> config with the overrides of those kernels
Phase = Callable[[str], contextlib.AbstractContextManager]  # "forward" / "backward" -> a context around it


@dataclass(frozen=True)
class Shapes:
    """The sizes the tools run an op at, each a tuple in the spec's ``shape_names`` order."""

    default: tuple[int, ...]  # GPT-2 124M training
    small: tuple[int, ...]  # seconds under the Triton interpreter (``lab check``'s default)
    odd: tuple[tuple[int, ...], ...]  # sizes no block divides, for a correctness smoke on a GPU
    bench: tuple[tuple[int, ...], ...] = ()  # the GPU benchmark's full sizes (filled in from the benchmarks)


@dataclass(frozen=True)
class Tunable:
    """A kernel whose block configuration ``--config`` may set: the fields it takes (launch parameter
    names, as inspect prints them) and, when one configuration holds several kernels' (attention's
    ``AttentionConfigs``), the attribute that is this kernel's."""

    fields: tuple[str, ...]
    attribute: str | None = None

    def applied(self, config, values: dict[str, int]):
        """``config`` with this kernel's ``values`` (``{"BLOCK_M": 64}``) in place of its own."""
        fields = {name.lower(): v for name, v in values.items()}
        if self.attribute is None:
            return dataclasses.replace(config, **fields)
        part = dataclasses.replace(getattr(config, self.attribute), **fields)
        return dataclasses.replace(config, **{self.attribute: part})


@dataclass(frozen=True)
class KernelModel:
    """What one iteration of a kernel's main loop covers, for the lab's static estimates. ``iterations``
    counts them over the whole launch from the kernel's named arguments and grid (None: the kernel has no
    loop, one iteration per program). ``elements``: per iteration (None: the product of its BLOCK_*
    sizes). ``matmuls``: matrix products of (elements x HEAD_DIM_PAD) per iteration (a kernel without a
    HEAD_DIM_PAD: products of ``elements`` multiply-adds), or a function of the named arguments that counts
    them. ``masked``: for a kernel whose tiles run either the main loop or its other (masked) loops, the
    latter's iterations over the launch, each of the same work."""

    iterations: Callable[[dict, tuple], int] | None = None
    elements: Callable[[dict], int] | None = None
    matmuls: int | Callable[[dict], int] = 0
    masked: Callable[[dict, tuple], int] | None = None

    def matmuls_of(self, args: dict) -> int:
        return self.matmuls(args) if callable(self.matmuls) else self.matmuls


def row_tiles(args: dict, grid: tuple) -> int:
    """A row kernel's main-loop iterations: its tiles of BLOCK_M rows (per column block, if the grid has them)."""
    return -(-args["n_rows"] // args["BLOCK_M"]) * (grid[1] if len(grid) > 1 else 1)


def _no_problem(dtype: torch.dtype, device: torch.device) -> str | None:
    return None


@dataclass(frozen=True)
class OpSpec:
    """One op, as every tool sees it (see the module docstring)."""

    name: str
    # Its place in every listing of the ops (the registry, the benchmark report and its --group, gptfast
    # info, the lab's choices): ascending, each op its own number.
    order: int
    function: Callable  # the public op
    shape_names: tuple[str, ...]
    shapes: Shapes
    # (shape, dtype, device, options, generator) -> the public function's inputs; no generator: torch.empty
    make_inputs: Callable[[tuple, torch.dtype, torch.device, dict, torch.Generator | None], Inputs]
    # (inputs, configure, phase): the forward launcher, then the backward one on its outputs
    launchers: Callable[[Inputs, Configure, Phase], None]
    # (kernel, plain-math reference run on float64 inputs, same-dtype eager PyTorch), each called with
    # the inputs by name
    compared: tuple[Callable, Callable, Callable]
    config_type: type  # the configuration dataclass the launchers take
    every_config: Callable[[], dict[str, tuple]]  # tunable kernel -> every configuration it may launch with
    tunables: dict[str, Tunable]
    options: dict[str, type] = field(default_factory=dict)  # the variants make_inputs reads, with their types
    models: dict[str, KernelModel] = field(default_factory=dict)  # kernel short name -> its main loop's model
    benchmarks: tuple[KernelBench, ...] = ()  # the first is the lab's (``lab bench``, ``lab tune``)
    optional: int = 0  # how many trailing shape numbers may be left out
    check_problem: Callable[[torch.dtype, torch.device], str | None] = _no_problem  # why ``lab check`` cannot run
    tf32: bool = False  # its kernels multiply float32 in TF32 on a GPU (10 mantissa bits, not 23)
    # Its launchers choose configurations per GPU (common.target_gpu(): attention's tables); the lab
    # refuses a capture whose configurations are those chosen with no GPU targeted.
    per_gpu: bool = False
    tune_candidates: tuple[str, ...] = ()  # ``lab tune``'s default candidates (``--config`` texts)
    # (shape, dtype, overrides, note, path or None) -> what it wrote: the winner of ``lab tune`` into the
    # op's configuration table; None: the launchers derive the configuration, there is no table
    save_tuned: Callable[[tuple, torch.dtype, dict, str, Path | None], str] | None = None
    # inputs made in the activation dtype -> the same inputs as GPT training passes them (float32 parameters
    # and residual stream under autocast, q/k/v as views of one projection), without data; None: as made.
    # The lab inspects these unless asked for uniform dtypes.
    training_inputs: Callable[[Inputs], Inputs] | None = None

    def __post_init__(self) -> None:
        bench = tuple(b.shape_for(size) for b in self.benchmarks for size in b.sizes("full"))
        object.__setattr__(self, "shapes", dataclasses.replace(self.shapes, bench=bench))

    def inputs(self, shape: tuple, dtype: torch.dtype, device: torch.device | str, options: dict | None = None,
               generator: torch.Generator | None = None) -> Inputs:
        """The public function's inputs at ``shape``: random from ``generator``, else without data."""
        return self.make_inputs(tuple(shape), dtype, torch.device(device), options or {}, generator)

    def launch_meta(self, shape: tuple, dtype: torch.dtype, options: dict | None = None,
                    overrides: dict[str, dict[str, int]] | None = None, phase: Phase | None = None,
                    training: bool = False) -> None:
        """The forward and backward launchers on device-"meta" tensors, configured for
        ``common.target_gpu()`` with ``overrides`` ({kernel: {FIELD: value}}) applied; call it inside
        ``common.capture_launches()`` and ``common.targeting(gpu)``. ``phase(name)``: a context entered
        around each pass. ``training``: the inputs as training passes them (``training_inputs``)."""
        inputs = self.inputs(shape, dtype, "meta", options)
        if training and self.training_inputs is not None:
            inputs = self.training_inputs(inputs)
        self.launch(inputs, overrides, phase)

    def launch(self, inputs: Inputs, overrides: dict[str, dict[str, int]] | None = None,
               phase: Phase | None = None) -> None:
        """The forward and backward launchers on ``inputs`` (any device), with ``overrides`` applied."""
        overrides = overrides or {}

        def configure(config, *kernels: str):
            for kernel in kernels:
                if kernel in overrides:
                    config = self.tunables[kernel].applied(config, overrides[kernel])
            return config

        self.launchers(inputs, configure, phase or (lambda name: contextlib.nullcontext()))

    def example(self, device: torch.device | str, dtype: torch.dtype) -> Inputs:
        """Inputs without data for ``kernels.explain(spec.name, **inputs)``: the default (GPT-2) shape with
        one row (or batch), as the route depends on the widths, not on their count."""
        return self.inputs((1, *self.shapes.default[1:]), dtype, device)


def tensor(*size: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator | None = None,
           scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """A float tensor of ``size``: normal(``shift``, ``scale``) drawn in float64 from ``generator``, then
    cast; without a generator, one without data (``torch.empty``: GPT-2 sizes cost nothing)."""
    if generator is None:
        return torch.empty(size, dtype=dtype, device=device)
    return (torch.randn(size, generator=generator, dtype=torch.float64) * scale + shift).to(device, dtype)


def float32(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` in float32 (None stays None): a parameter or the residual stream as autocast training keeps them."""
    return None if t is None else t.float()


def row_tensor(n_rows: int, n_cols: int, dtype: torch.dtype, device: torch.device,
               generator: torch.Generator | None = None, row_stride: int | None = None, **normal) -> torch.Tensor:
    """(n_rows, n_cols) from :func:`tensor`, a view of rows ``row_stride`` apart when given."""
    return tensor(n_rows, row_stride or n_cols, dtype=dtype, device=device, generator=generator, **normal)[:, :n_cols]


def class_ids(n: int, classes: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """n int64 class ids below ``classes``, drawn from ``generator`` (without one: no data)."""
    if generator is None:
        return torch.empty(n, dtype=torch.int64, device=device)
    return torch.randint(0, classes, (n,), generator=generator).to(device)
