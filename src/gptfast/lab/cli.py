"""``gptfast lab``: inspect, dump, check, bench and tune a kernel (``gptfast lab --help``)."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from gptfast.kernels.registry import SPECS

from .compiler import LabError
from .ops import get_op, parse_config, parse_options, parse_shape
from .targets import ARCHITECTURES, TARGETS, parse_target

CONFIG_HELP = ("try another block configuration: KERNEL:FIELD=VALUE[,FIELD=VALUE...], repeatable, e.g. "
               "attention_bwd_kv:BLOCK_N=64,num_warps=4 (the kernel names and fields are inspect's)")
SHAPE_HELP = ("the op's sizes, comma-separated, default: GPT-2 124M training; " + "; ".join(
    f"{spec.name} {','.join(spec.shape_names[:len(spec.shape_names) - spec.optional])}"
    + (f"[,{','.join(spec.shape_names[len(spec.shape_names) - spec.optional:])}]" if spec.optional else "")
    for spec in SPECS.values()))


def _dtype(text: str) -> str:
    from .analysis import parse_dtype

    try:
        return parse_dtype(text)
    except LabError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--dtype: ")) from None


def _bandwidth(text: str) -> float:
    """argparse's ``type=`` of ``--bandwidth``: a positive, finite number of bytes/s."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number of bytes/s, e.g. 3.35e12, got {text!r}")
    return value


def _add_target(p: argparse.ArgumentParser, dtype: str = "bf16") -> None:
    p.add_argument("op", choices=list(SPECS))
    p.add_argument("--shape", help=SHAPE_HELP)
    p.add_argument("--dtype", default=dtype, type=_dtype, metavar="{bf16,fp16,fp32}",
                   help=f"default {dtype} (bfloat16, float16 and float32 too)")


def _add_compile(p: argparse.ArgumentParser) -> None:
    _add_target(p)
    p.add_argument("--arch", choices=[f"sm_{a}" for a in ARCHITECTURES],
                   help="the architecture to compile for, at its first target's numbers (default: --target's)")
    p.add_argument("--target", choices=list(TARGETS), help="the GPU whose SMs, clock, bandwidth and peaks the "
                   "estimates use: " + ", ".join(f"{t.name} ({t.part}, sm_{t.arch})" for t in TARGETS.values())
                   + "; default: --arch's first, else h100")
    p.add_argument("--config", action="append", help=CONFIG_HELP)
    p.add_argument("--option", action="append", help="a variant of the op, NAME=VALUE, repeatable, e.g. "
                   "flash_attention's deterministic=false or dropout_p=0.1")
    p.add_argument("--uniform-dtype", action="store_true", help="every floating input in --dtype (default: as "
                   "GPT training passes them: float32 parameters and residual stream, q/k/v views of one matmul)")


def add_lab_parser(subparsers) -> argparse.ArgumentParser:
    """The ``lab`` command and its subcommands, on a parser's ``add_subparsers()``."""
    lab = subparsers.add_parser("lab", help="inspect (no GPU needed), check, bench and tune the kernels")
    sub = lab.add_subparsers(dest="lab_command", required=True)
    p = sub.add_parser("inspect", help="compile an op's kernels for a GPU (none needed) and report registers, "
                       "occupancy, instructions and static estimates")
    _add_compile(p)
    p.add_argument("--bandwidth", type=_bandwidth, help="bytes/s of the memory floor (default: the target's, "
                   "measured where the project recorded it, else nominal: h100 3.35e12, h200 4.3e12 measured)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p = sub.add_parser("dump", help="write each kernel's TTIR, TTGIR, PTX and SASS to a folder")
    _add_compile(p)
    p.add_argument("--out", type=Path, required=True, help="the folder to write to")
    p = sub.add_parser("check", help="forward and backward against the float64 reference, and determinism")
    _add_target(p, dtype="fp32")
    p = sub.add_parser("bench", help="time forward, backward and both against the baselines (GPU only)")
    _add_target(p)
    p = sub.add_parser("tune", help="time the spill-free, unserialised candidate configurations (GPU only)")
    _add_target(p)
    p.add_argument("--config", action="append", help="a candidate (" + CONFIG_HELP + "); attention's default: "
                   "the shipped table and one-kernel variations of it")
    p.add_argument("--write", type=Path, metavar="FILE", help="attention: write the table with the winner here "
                   "(default: the GPU's table in gptfast/kernels/configs/)")
    p = sub.add_parser("baseline", help="compare main-loop lengths with tests/lab_baseline.json, or --write it")
    p.add_argument("--write", action="store_true", help="record this Triton version's lengths")
    lab.set_defaults(func=run)
    return lab


def _request(args):
    from .analysis import Request

    op = get_op(args.op)
    return Request(op, parse_shape(op, args.shape), args.dtype, parse_target(args.target, args.arch),
                   parse_config(args.config), parse_options(op, args.option), getattr(args, "bandwidth", None),
                   training=not args.uniform_dtype)


def _inspect(args) -> int:
    from .analysis import format_report, inspect

    report = inspect(_request(args))
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def _dump(args) -> int:
    from .analysis import dump

    written = dump(_request(args), args.out)
    print(f"wrote {len(written)} files to {args.out}")
    return 0


def _check(args) -> int:
    import torch

    from gptfast.kernels import backend

    if not torch.cuda.is_available() and not backend.TRITON_INTERPRET:
        # Triton was imported without the interpreter: run the check in a process that has it.
        env = dict(os.environ, TRITON_INTERPRET="1")
        argv = ["check", args.op, "--dtype", args.dtype] + (["--shape", args.shape] if args.shape else [])
        return subprocess.run([sys.executable, "-m", "gptfast.lab", *argv], env=env).returncode
    from .analysis import DTYPES
    from .check import run_check

    op = get_op(args.op)
    shape = parse_shape(op, args.shape) if args.shape else op.shapes.small
    text, passed = run_check(op, shape, DTYPES[args.dtype])
    print(text)
    return 0 if passed else 1


def _needs_gpu(command: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise LabError(f"lab {command} measures on a GPU and there is none here (inspect and check need none)")


def _bench(args) -> int:
    _needs_gpu("bench")
    from .measure import bench

    print(bench(get_op(args.op), args.shape, args.dtype))
    return 0


def _tune(args) -> int:
    _needs_gpu("tune")
    from .measure import tune

    print(tune(get_op(args.op), args.shape, args.dtype, args.config, args.write))
    return 0


def _baseline(args) -> int:
    from . import baseline

    if args.write:
        entries = baseline.write()
        print(f"{baseline.BASELINE_FILE}: {len(entries)} entries recorded")
        return 0
    recorded = baseline.load().get(baseline.triton_version())
    if recorded is None:
        raise LabError(f"{baseline.BASELINE_FILE} has no entries for Triton {baseline.triton_version()} (--write them)")
    problems = baseline.regressions(baseline.current(), recorded)
    print("\n".join(problems) or "every main loop within 3% of the baseline")
    return 1 if problems else 0


COMMANDS = {"inspect": _inspect, "dump": _dump, "check": _check, "bench": _bench, "tune": _tune,
            "baseline": _baseline}


def run(args) -> None:
    """Run the parsed ``lab`` command; its exit status is raised as SystemExit when not 0."""
    status = COMMANDS[args.lab_command](args)
    if status:
        raise SystemExit(status)


def main(argv: list[str] | None = None) -> int:
    """``python -m gptfast.lab``: the same commands without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="python -m gptfast")
    add_lab_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["lab", *(sys.argv[1:] if argv is None else argv)])
    try:
        run(args)
    except LabError as error:
        print(f"gptfast lab {args.lab_command}: error: {error}", file=sys.stderr)
        return 2
    except SystemExit as done:
        return int(done.code or 0)
    return 0
