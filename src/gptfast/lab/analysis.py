"""``lab inspect`` and ``lab dump``: every kernel an op launches, compiled for a GPU it need not have.

The numbers per kernel: what the compiler reports (registers, spills, shared memory, ptxas's notes),
what the SASS shows (matrix instructions, access widths, the main loop: see ``sass``), occupancy
(``targets.occupancy``), and four static floors at the shape, each an estimate, never a measurement:

* memory: every tensor argument read or written once, at the bandwidth (``--bandwidth``);
* issue: warp-instructions (main loop x its iterations; attention's masked tiles x the longest
  masked loop, ``KernelModel.masked``; the rest of the program once per program) over the SMs the
  grid can occupy, 4 schedulers each issuing one per clock;
* mufu: the special-function unit's operations (ex2, rcp, rsqrt...) counted the same way, at 16 per
  clock per SM;
* tensor_core: the matrix products' FLOPs (attention: per score tile, ``KernelModel.matmuls``
  products with the head dim) at the dense bf16 peak.

Every floor runs at the target's one clock (``targets``: the clock its tensor-core peak is quoted at).
What a kernel's main loop covers comes from its op's spec (``OpSpec.models``).
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from gptfast.kernels import common
from gptfast.kernels.spec import OpSpec
from gptfast.precision import DTYPE_NAMES, SHORT_NAMES, dtype_name

from . import sass
from .compiler import Build, Compiled, LabError, compile_builds, describe_arg
from .ops import check_inputs, check_overrides, kernel_name, refusals_as_lab_errors
from .targets import Architecture

DTYPES = {short: DTYPE_NAMES[full] for short, full in SHORT_NAMES.items()}  # the lab's names: bf16, fp16, fp32


@dataclass(frozen=True)
class Request:
    """One op at one shape, dtype, architecture and configuration."""

    op: OpSpec
    shape: tuple[int, ...]
    dtype: str
    arch: Architecture
    overrides: dict  # --config: {kernel: {field: value}}
    options: dict  # variants: weight/bias present, dropout_p, causal, row_stride...
    bandwidth: float | None = None  # bytes/s; None: the architecture's default
    training: bool = False  # the inputs' dtypes and layouts as training passes them (OpSpec.training_inputs)


def parse_dtype(text: str) -> str:
    """The lab's name (bf16, fp16, fp32) of a dtype given by either name (bfloat16 or bf16...)."""
    try:
        full = dtype_name(text)
    except ValueError as error:
        raise LabError(f"--dtype: {error}") from None
    return next(short for short, name in SHORT_NAMES.items() if name == full)


def capture(request: Request) -> list[tuple[str, common.Launch]]:
    """(phase, launch) for every launch of the op's forward then backward launcher, as they would
    run on ``request.arch``; a launch repeated exactly (the fused LM head's chunks) is listed once."""
    return [(phase, launch) for phase, launch, _ in capture_counted(request)]


def capture_counted(request: Request) -> list[tuple[str, common.Launch, int]]:
    """:func:`capture`'s launches, each with the number of times it ran."""
    check_overrides(request.op, request.overrides)
    check_inputs(request.op, request.shape, request.dtype, request.options)
    records = _launches(request, request.overrides, request.arch.gpu())
    _check_grids(request, records)
    _check_memory(request, records)
    _refuse_untargeted(request, records if not request.overrides else _launches(request, {}, request.arch.gpu()))
    counts: dict[tuple, list] = {}
    for name, launch in records:
        key = (name, launch.kernel, launch.grid, repr(_aligned(launch.args)), repr(sorted(launch.meta.items())))
        counts.setdefault(key, [name, launch, 0])[2] += 1
    return [tuple(entry) for entry in counts.values()]


def _launches(request: Request, overrides: dict, gpu: common.GPU | None) -> list[tuple[str, common.Launch]]:
    """(phase, launch) of the op's launchers on "meta" tensors with ``overrides``, configured for
    ``gpu`` (None: for no GPU in particular, as the interpreter would be)."""
    records: list[tuple[str, common.Launch]] = []

    @contextlib.contextmanager
    def phase(name: str):
        with common.capture_launches() as launches:
            yield
        records.extend((name, launch) for launch in launches)

    targeting = common.targeting(gpu) if gpu is not None else contextlib.nullcontext()
    with targeting, refusals_as_lab_errors(request.op, request.shape, request.dtype):
        request.op.launch_meta(request.shape, DTYPES[request.dtype], request.options, overrides, phase,
                               request.training)
    return records


GRID_LIMITS = (2**31 - 1, 65535, 65535)  # CUDA's largest grid, x, y and z


def _check_grids(request: Request, records: list[tuple[str, common.Launch]]) -> None:
    """A LabError naming the shape when a launch's grid is over CUDA's limits (it could not run)."""
    for _, launch in records:
        if any(n > limit for n, limit in zip(launch.grid, GRID_LIMITS)):
            raise LabError(f"{request.op.name} {','.join(map(str, request.shape))} {request.dtype}: "
                           f"{kernel_name(launch.kernel)}'s grid {tuple(launch.grid)} is over CUDA's limits "
                           f"({', '.join(f'{a} {n:,}' for a, n in zip('xyz', GRID_LIMITS))})")


def _check_memory(request: Request, records: list[tuple[str, common.Launch]]) -> None:
    """A LabError naming the shape when one launch's tensors alone exceed the target's memory."""
    name, launch = max(records, key=lambda record: _bytes(record[1]))
    target = request.arch
    if _bytes(launch) > target.memory_bytes:
        raise LabError(f"{request.op.name} {','.join(map(str, request.shape))} {request.dtype}: "
                       f"{kernel_name(launch.kernel)} ({name}) moves {_bytes(launch) / 1e9:,.1f} GB of tensors, "
                       f"more than the {target.name}'s {target.memory_bytes / 1e9:,.0f} GB")


def _refuse_untargeted(request: Request, targeted: list[tuple[str, common.Launch]]) -> None:
    """A LabError when an op whose launchers choose configurations per GPU (``OpSpec.per_gpu``) launched
    a configurable kernel, without overrides, exactly as it does with no GPU targeted (attention: the
    interpreter's tiles): its launcher ignores ``common.target_gpu()``."""
    if not request.op.per_gpu:
        return
    for (_, launch), (_, plain) in zip(targeted, _launches(request, {}, None)):
        name = kernel_name(launch.kernel)
        if name in request.op.tunables and name == kernel_name(plain.kernel) and _tiles(launch) == _tiles(plain):
            raise LabError(f"{request.op.name}'s launcher ignores common.target_gpu(): it configured {name} "
                           f"for no GPU in particular (the interpreter), not for sm_{request.arch.arch}")


def _tiles(launch: common.Launch) -> dict:
    """The launch's block configuration: its BLOCK_* sizes, warps and stages."""
    return {k: v for k, v in launch.meta.items() if k.startswith("BLOCK") or k in ("num_warps", "num_stages")}


def _aligned(args: tuple) -> list:
    """The launch's arguments as they compile: tensors by dtype, shape, strides and their offset's
    16-byte alignment (the only part of it Triton specialises on)."""
    described = [describe_arg(a) for a in args]
    for d, a in zip(described, args):
        if isinstance(a, torch.Tensor):
            d["offset"] = d["offset"] * a.element_size() % 16
    return described


def _named_args(launch: common.Launch) -> dict:
    names = list(getattr(launch.kernel, "arg_names", []))
    return {**dict(zip(names, launch.args)), **launch.meta}


def _bytes(launch: common.Launch) -> int:
    return sum(a.numel() * a.element_size() for a in launch.args if isinstance(a, torch.Tensor))


def _config(launch: common.Launch, compiled: Compiled) -> dict:
    blocks = {k: v for k, v in launch.meta.items() if k.startswith("BLOCK")}
    return {**blocks, **{k: compiled.options.get(k) for k in ("num_warps", "num_stages", "maxnreg")}}


def _widths(counter: Counter) -> dict[str, int]:
    return {str(bits): n for bits, n in sorted(counter.items())}


def kernel_report(request: Request, phase: str, launch: common.Launch, compiled: Compiled, launches: int = 1) -> dict:
    """The inspect fields of one kernel (see the module docstring for the estimates); ``launches``: how many
    times it runs, the bytes, FLOPs and floors being those of them all."""
    arch, name = request.arch, kernel_name(launch.kernel)
    model = request.op.models.get(name)
    args = _named_args(launch)
    warps = compiled.options["num_warps"]
    programs = math.prod(launch.grid)
    code = sass.instructions(compiled.asm["sass"])
    whole = sass.count(code)
    loop, loops = sass.main_loop(code)
    if model and model.iterations and loop:
        iterations, body = model.iterations(args, launch.grid), sass.count(code[loop.start:loop.end + 1])
        masked_loops = [sass.count(code[lp.start:lp.end + 1]) for lp in sass.innermost(loops) if lp != loop]
        masked = max(masked_loops, key=lambda c: c.instructions) if model.masked and masked_loops else None
        masked_iterations = model.masked(args, launch.grid) if masked else 0
        looped = [body, *(masked_loops if masked else [])]  # the rest runs once per program
        rest_instructions = whole.instructions - sum(c.instructions for c in looped)
        rest_mufu = whole.mufu - sum(c.mufu for c in looped)
    else:  # no loop: the main loop is the whole program
        iterations, body, masked, masked_iterations, rest_instructions, rest_mufu = programs, whole, None, 0, 0, 0
    elements = (model.elements(args) if model and model.elements
                else math.prod(v for k, v in launch.meta.items() if k.startswith("BLOCK")))
    occupancy = _occupancy(arch, warps, compiled)
    sms = min(arch.sm_count, programs)
    per_tile = [(iterations, body), (masked_iterations, masked or body)]
    warp_instructions = (sum(n * c.instructions for n, c in per_tile) + programs * rest_instructions) * warps
    mufu_ops = (sum(n * c.mufu for n, c in per_tile) + programs * rest_mufu) * warps * 32
    flops = (2 * (model.matmuls_of(args) if model else 0) * elements * args.get("HEAD_DIM_PAD", 1)
             * (iterations + masked_iterations)) * launches
    warp_instructions, mufu_ops = warp_instructions * launches, mufu_ops * launches
    bandwidth = request.bandwidth or arch.bandwidth
    estimate = {"memory": _bytes(launch) * launches / bandwidth * 1e6,
                "issue": warp_instructions / (sms * arch.schedulers * arch.clock_hz) * 1e6,
                "mufu": mufu_ops / (sms * arch.mufu_per_clock * arch.clock_hz) * 1e6,
                "tensor_core": flops / (arch.bf16_dense_flops * sms / arch.sm_count) * 1e6}
    notes = sass.serialized_mma(compiled.ptxas_log)
    return {
        "name": name, "phase": phase, "config": _config(launch, compiled),
        "registers": compiled.registers, "spill_bytes": compiled.spill_bytes, "shared_memory": compiled.shared,
        "ctas_per_sm": occupancy.ctas_per_sm, "warps_per_sm": occupancy.warps_per_sm,
        "occupancy_limit": occupancy.limit, "programs": programs, "grid": list(launch.grid),
        "sm_count": arch.sm_count, "waves": programs / max(1, occupancy.ctas_per_sm * arch.sm_count),
        "hgmma": whole.hgmma, "hmma": whole.hmma, "serialized_mma": bool(notes), "serialized_notes": notes,
        "load_bits": _widths(body.load_bits), "store_bits": _widths(body.store_bits),
        "tma": whole.tma_loads > 0 or "cp.async.bulk.tensor" in compiled.asm["ptx"],
        "cp_async": whole.async_copies > 0,
        "main_loop": loop is not None and body is not whole,
        "main_loop_instructions": body.instructions * warps,
        "loop_instructions_per_warp": [sass.count(code[lp.start:lp.end + 1]).instructions for lp in loops],
        "warpgroup_waits": body.warpgroup_waits,
        "elements_per_iteration": elements, "iterations": iterations,
        "masked_iterations": masked_iterations,
        "masked_loop_instructions": masked.instructions * warps if masked else 0,
        "mufu_per_element": body.mufu * warps * 32 / elements,
        "launches": launches, "bytes": _bytes(launch) * launches, "flops": flops,
        "signature": compiled.signature, "hinted": compiled.hinted,
        "estimate_us": estimate, "bound": max(estimate, key=estimate.get),
    }


def _occupancy(arch: Architecture, warps: int, compiled: Compiled):
    from .targets import occupancy

    return occupancy(arch, warps, compiled.registers, compiled.shared)


def inspect_many(requests: list[Request], workers: int | None = None) -> list[tuple[dict, list[Compiled]]]:
    """:func:`inspect` of several requests, compiled together (one Triton start per worker)."""
    captured = [capture_counted(r) for r in requests]
    builds = [Build.of(launch, r.arch.arch) for r, records in zip(requests, captured) for _, launch, _ in records]
    compiled = iter(compile_builds(builds, workers))
    results = []
    for request, records in zip(requests, captured):
        done = [next(compiled) for _ in records]
        kernels = [kernel_report(request, phase, launch, c, n) for (phase, launch, n), c in zip(records, done)]
        target = request.arch
        results.append(({"op": request.op.name, "arch": f"sm_{target.arch}", "target": target.name,
                         "part": target.part, "clock_hz": target.clock_hz, "dtype": request.dtype,
                         "shape": list(request.shape), "inputs": _inputs_kind(request),
                         "triton_version": triton_version(),
                         "bandwidth": request.bandwidth or target.bandwidth,
                         "bandwidth_source": "--bandwidth" if request.bandwidth else target.bandwidth_source,
                         "tensor_core_flops": target.bf16_dense_flops, "kernels": kernels}, done))
    return results


def _inputs_kind(request: Request) -> str:
    """How the report's inputs were made: as training passes them, or every floating input in the dtype."""
    return "training" if request.training and request.op.training_inputs else "uniform"


def inspect(request: Request) -> dict:
    """The ``lab inspect --json`` document of one request."""
    return inspect_many([request])[0][0]


def dump(request: Request, out: Path) -> list[Path]:
    """Write each kernel's TTIR, TTGIR, PTX, SASS and ptxas log under ``out``; the files written."""
    report, compiled = inspect_many([request])[0]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for kernel, c in zip(report["kernels"], compiled):
        stem = f"{kernel['phase']}.{kernel['name']}"
        for ext, text in (*c.asm.items(), ("ptxas.log", c.ptxas_log)):
            path = out / f"{stem}.{ext}"
            path.write_text(text)
            written.append(path)
    return written


def triton_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("triton")


def format_report(report: dict) -> str:
    """The human-readable table of one inspect report."""
    inputs = "inputs as training passes them" if report["inputs"] == "training" else "every input in the dtype"
    head = (f"{report['op']} {report['dtype']} ({inputs}) shape {','.join(map(str, report['shape']))} "
            f"on {report['arch']}, "
            f"target {report['target']} ({report['part']}, "
            f"{report['kernels'][0]['sm_count'] if report['kernels'] else '?'} SMs), Triton {report['triton_version']}")
    columns = ("kernel", "config", "regs", "spill", "smem", "CTA/SM", "warp/SM", "limit", "programs", "mma",
               "serial", "loads", "stores", "tma", "loop", "elem/it", "mufu/el")
    rows = [columns]
    for k in report["kernels"]:
        config = " ".join(f"{key.removeprefix('BLOCK_')}={v}" if key.startswith("BLOCK") else f"{key[4:] or key}={v}"
                          for key, v in k["config"].items() if v is not None)
        mma = f"HGMMA {k['hgmma']}" if k["hgmma"] else (f"HMMA {k['hmma']}" if k["hmma"] else "-")
        rows.append((k["name"], config, k["registers"], k["spill_bytes"], k["shared_memory"], k["ctas_per_sm"],
                     k["warps_per_sm"], k["occupancy_limit"], k["programs"], mma,
                     "YES" if k["serialized_mma"] else "no",
                     _bits(k["load_bits"]), _bits(k["store_bits"]),
                     "TMA" if k["tma"] else ("cp.async" if k["cp_async"] else "-"),
                     k["main_loop_instructions"], k["elements_per_iteration"], f"{k['mufu_per_element']:.2f}"))
    lines = [head, *_table(rows), "",
             f"Static estimates (not measurements), microseconds, at {report['bandwidth'] / 1e12:.2f} TB/s "
             f"({report['bandwidth_source']}), every floor at {report['clock_hz'] / 1e9:.3g} GHz "
             f"(tensor cores {report['tensor_core_flops'] / 1e12:.0f} TFLOP/s):"]
    rows = [("kernel", "memory", "issue", "mufu", "tensor core", "bound by")]
    for k in report["kernels"]:
        e = k["estimate_us"]
        name = k["name"] + (f" x{k['launches']}" if k["launches"] > 1 else "")
        rows.append((name, *(f"{e[key]:.1f}" for key in ("memory", "issue", "mufu", "tensor_core")), k["bound"]))
    lines += _table(rows)
    lines.append("loop: SASS instructions of the main loop per iteration x warps; elem/it: elements per iteration; "
                 "xN: a launch repeated N times (the floors are of all N)")
    return "\n".join(lines)


def _bits(widths: dict) -> str:
    return "+".join(f"{n}x{bits}" for bits, n in widths.items()) or "-"


def _table(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
