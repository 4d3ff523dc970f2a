"""Prepare a Triton cache for the GPU run on a machine without a GPU: ``python bench/gpu_run_prepare.py``.

On a fresh GPU machine Triton compiles every kernel specialisation at its first call, seconds each, out
of a run paid by the minute. This compiles, under the GPU machine's Triton, the specialisations the
run's smoke and kernel benchmarks launch, for its GPU (sm_90, ``gpu_run_cache.TARGET``), into
``bench/triton-cache/`` with the manifest the run compares with its machine (``gpu_run_cache.choose``).

The launches come from the op registry (``gptfast.kernels.registry``): each op's ``launch_meta`` (its
forward and backward launchers on "meta" tensors) at the smoke's shapes and dtypes and at its benchmark
shapes in bfloat16, inside ``common.targeting`` (the launchers choose grids and configurations for the
target) and ``common.capture_launches`` (they record their launches instead of running them). Each
launch is then compiled through the kernel's own ``warmup``, so that Triton specialises it (dtypes,
16-byte alignment, integer arguments) and keys its cache exactly as at a run there. Not covered, so
compiled there: the model's training step, generation and ``torch.compile``'s own kernels.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path

import gpu_run_cache
import gpu_run_smoke

TARGET = gpu_run_cache.TARGET


class _TargetDriver:
    """Triton's active driver while preparing: the target GPU's device, stream and architecture, no GPU."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


def use_wheel_key(wheel: Path) -> None:
    """Key this process's Triton cache as the Triton of ``wheel`` (the GPU image's: the same version for
    another Python) keys it. Every cache key starts with Triton's ``triton_key()``: its version and the
    hashes of its Python sources and of its compiled library, which differs by Python version, and no
    knob sets it. So this replaces that one function of Triton's: the wheel's Python sources must be
    this Triton's byte for byte, and its library's hash stands in for this one's. Under the GPU image's
    Python (3.12), with the same wheel installed, the key is already its and no ``--wheel`` is needed."""
    import triton
    from triton.runtime import cache

    root = Path(triton.__file__).parent
    with zipfile.ZipFile(wheel) as archive:
        members = {name.removeprefix("triton/"): name for name in archive.namelist() if name.startswith("triton/")}
        for name in sorted(n for n in members if n.endswith(".py")):
            if not (root / name).exists() or (root / name).read_bytes() != archive.read(members[name]):
                raise SystemExit(f"--wheel {wheel.name}: its triton/{name} differs from this Triton's "
                                 f"({triton.__version__}): prepare with that wheel's Python")
        theirs = hashlib.sha256(archive.read(members["_C/libtriton.so"])).hexdigest()
    mine = hashlib.sha256((root / "_C" / "libtriton.so").read_bytes()).hexdigest()
    key = cache.triton_key()
    if mine not in key:
        raise SystemExit(f"this Triton's key does not hold the hash of its {root}/_C/libtriton.so")
    wheel_key = key.replace(mine, theirs)
    cache.triton_key = lambda: wheel_key


def wanted() -> list[tuple[str, tuple, str]]:
    """(op, shape, dtype) of every launch to prepare: the smoke's op cases, each op's benchmark shapes in
    bfloat16 (the GPU's dtype)."""
    from gptfast.kernels.registry import SPECS

    smoke = [(c.op, c.shape, c.dtype) for c in gpu_run_smoke.plan(rehearse=False) if c.op != gpu_run_smoke.MODEL]
    bench = [(name, tuple(shape), "bfloat16") for name, spec in SPECS.items() for shape in spec.shapes.bench]
    return list(dict.fromkeys(smoke + bench))


def capture(cases: list[tuple[str, tuple, str]]) -> tuple[list, list[str]]:
    """The launches the launchers make for the target at ``cases``, and the cases they refused."""
    import torch

    from gptfast.kernels import common
    from gptfast.kernels.registry import SPECS

    refused = []
    with common.targeting(common.GPU(**TARGET)), common.capture_launches() as launches:
        for op, shape, dtype in cases:
            try:
                SPECS[op].launch_meta(shape, getattr(torch, dtype))
            except Exception as error:  # noqa: BLE001 - listed in the manifest
                refused.append(f"{op} {','.join(map(str, shape))} {dtype}: {type(error).__name__}: "
                               f"{str(error).strip().splitlines()[0][:200]}")
    return list(launches), refused


def compile_all(launches: list) -> tuple[dict[str, str], list[str]]:
    """Each launch compiled through its kernel's ``warmup`` for the target: {hash: kernel name}, failures."""
    from triton.runtime import driver

    driver.set_active(_TargetDriver(TARGET["arch"]))  # for this process: it prepares, then ends
    compiled, failed = {}, []
    for launch in launches:
        name = getattr(launch.kernel, "__name__", str(launch.kernel))
        try:
            kernel = launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.meta)
            compiled[kernel.hash] = name
        except Exception as error:  # noqa: BLE001 - listed in the manifest
            failed.append(f"{name}: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
    return compiled, failed


def prepare(out: Path, wheel: Path | None) -> dict:
    """Compile the run's kernels for the target into ``out`` (its TRITON_CACHE_DIR); the manifest."""
    import triton

    if wheel is not None:
        use_wheel_key(wheel)
    launches, refused = capture(wanted())
    compiled, failed = compile_all(launches)
    made = gpu_run_cache.fingerprint()
    if wheel is not None:
        made["python"] = f"that of {wheel.name}"
    manifest = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "target": TARGET,
                "fingerprint": made, "launches": len(launches),
                "kernels": sorted(f"{name} {digest}" for digest, name in compiled.items()),
                "failed": failed, "refused": refused, "triton_version": triton.__version__}
    (out / gpu_run_cache.MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_run_prepare.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=gpu_run_cache.PREPARED,
                        help=f"default {gpu_run_cache.PREPARED}")
    parser.add_argument("--wheel", type=Path, help="the GPU image's Triton wheel, when its Python is not this one "
                        "(pip download triton==3.6.0 --no-deps --only-binary=:all: --python-version 3.12)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("gpu_run_prepare.py compiles kernels: run it without TRITON_INTERPRET=1")
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = str(args.out.resolve())  # before Triton reads it
    os.environ["TRITON_STORE_BINARY_ONLY"] = "1"  # the cubin and its metadata: a run needs no more
    manifest = prepare(args.out, args.wheel)
    print(f"{args.out}: {len(manifest['kernels'])} kernels from {manifest['launches']} launches, "
          f"{len(manifest['failed'])} failed to compile, {len(manifest['refused'])} cases refused, "
          f"{gpu_run_cache.entries(args.out)} cache entries")
    for line in manifest["failed"] + manifest["refused"]:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
