"""A Triton cache compiled ahead on a machine without a GPU for the rented one (sm_90, Triton 3.6), and the
count of its hits there.

On a fresh GPU machine Triton compiles every kernel specialisation at its first call, seconds each,
out of a run paid by the minute. ``prepare`` (run without a GPU, under the GPU machine's Triton) compiles
the specialisations the smoke and the kernel benchmarks launch into ``bench/triton-cache/`` (gitignored,
copied to the GPU machine with the checkout), with a manifest of what Triton's cache keys are
made of: Triton's own key (its sources and its compiled library), the backend's (ptxas and the
target) and the default options' (libdevice included). The run (:func:`choose`) uses the folder as
TRITON_CACHE_DIR only when those match the machine's; each stage then counts Triton's cache hits and
misses (:func:`listen`, Triton's compilation listener), so the run says what the cache saved.

The launches are the launchers' own (``kernels.common.capture_launches``) on tensors of device "meta",
configured for the target GPU (``kernels.common.targeting``); each is compiled through the kernel's own
``warmup``, so that Triton specialises it (dtypes, 16-byte alignment, integer arguments) as at a run.
Triton's key covers its compiled library, which differs by Python version: ``--wheel`` names the GPU
machine's Triton wheel (Python 3.12); its Python sources must equal the local Triton's, and its library's
hash stands in for the local one's. The prepared folder is used there only if every part of the key
matches; the correctness smoke then runs on the very kernels compiled ahead.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import importlib
import json
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

PREPARED = Path("bench") / "triton-cache"  # relative to the repository root
MANIFEST = "manifest.json"
# The H200 (the H100's sm_90 and multiprocessors; 227 KiB of shared memory per block).
TARGET = dict(arch=90, sm_count=132, shared_memory=227 * 1024)
FINGERPRINT_KEYS = ("triton", "triton_key", "backend", "options")


def fingerprint(arch: int = TARGET["arch"]) -> dict:
    """What Triton's cache keys are made of, beside the kernel itself, for CUDA ``arch`` here."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import CUDABackend
        from triton.runtime.cache import triton_key

        backend = CUDABackend(GPUTarget("cuda", arch, 32))
        return {"triton": triton.__version__, "python": sys.version.split()[0],
                "triton_key": hashlib.sha256(triton_key().encode()).hexdigest(), "backend": backend.hash(),
                "options": backend.parse_options({}).hash()}
    except Exception as error:  # noqa: BLE001 - reported, not fatal: the run then compiles as usual
        return {"error": f"{type(error).__name__}: {str(error).strip()[:300]}"}


def choose(fresh: Path, rehearse: bool, prepared: Path = PREPARED) -> dict:
    """The cache folder for this run: ``prepared`` if its manifest's fingerprint matches this machine's,
    else the empty ``fresh``; with the reason, for stages.json."""
    fresh.mkdir(parents=True, exist_ok=True)
    manifest = prepared / MANIFEST
    if rehearse:
        return {"dir": fresh, "used": False, "reason": "rehearsal: the kernels run under the interpreter, "
                "no compilation"}
    if not manifest.exists():
        return {"dir": fresh, "used": False, "reason": f"no prepared cache ({prepared}/ is not in the checkout): "
                "every kernel compiles on this machine"}
    made = json.loads(manifest.read_text())
    here = fingerprint()
    differ = [key for key in FINGERPRINT_KEYS if made["fingerprint"].get(key) != here.get(key)]
    if differ:
        return {"dir": fresh, "used": False, "reason": "prepared cache not used: it differs from this machine's in "
                + ", ".join(differ), "prepared": made["fingerprint"], "here": here}
    return {"dir": prepared.resolve(), "used": True, "here": here, "reason": f"prepared cache used: "
            f"{len(made['kernels'])} kernels compiled ahead on {made['created']}"}


def entries(cache_dir: Path) -> int:
    """Compiled kernels in a Triton cache folder (each a folder with a ``__grp__`` file)."""
    return sum(1 for _ in Path(cache_dir).glob("*/__grp__*.json"))


@dataclass
class Counts:
    hits: int = 0
    misses: int = 0
    compile_us: int = 0  # Triton's own timing of its compilations (misses)

    def as_dict(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "compile_s": round(self.compile_us / 1e6, 1)}


def listen() -> Counts | None:
    """Count this process's Triton compilations from now on: cache hits, misses and compile seconds
    (Triton's compilation listener); None where this Triton has none."""
    try:
        from triton import knobs
    except ImportError:
        return None
    if not hasattr(getattr(knobs, "compilation", None), "listener"):
        return None
    counts = Counts()

    def listener(*, cache_hit: bool, times=None, **_) -> None:
        if cache_hit:
            counts.hits += 1
        else:
            counts.misses += 1
            counts.compile_us += getattr(times, "total", 0)

    knobs.compilation.listener = listener
    return counts


# ---------------------------------------------------------------- preparing it, without a GPU


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


def _wheel_key(wheel: Path) -> str:
    """Triton's key as the Triton of ``wheel`` (the GPU image's: the same version for another Python) makes
    it: its Python sources must be this Triton's, byte for byte; its compiled library's hash replaces ours."""
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
    return key.replace(mine, theirs)


def _smoke_launches() -> list[str]:
    """Run the smoke's cases on "meta" tensors: their launches are recorded, and what stopped each case is
    returned. Most stop at a check, after their launches (meta tensors hold no values); those under autocast
    (no autocast for meta) stop before theirs, which then compile at the run."""
    import torch

    from . import gpu_smoke

    torch.set_default_device("meta")
    for case in gpu_smoke.CASES:
        module = gpu_smoke._test_function(case.test).__module__
        if hasattr(sys.modules[module], "DEVICE"):
            sys.modules[module].DEVICE = torch.device("meta")
    stopped = []
    for case in gpu_smoke.CASES:
        try:
            gpu_smoke._test_function(case.test)(**{k: gpu_smoke._resolve(v) for k, v in case.kwargs.items()})
        except Exception as error:  # noqa: BLE001 - the checks cannot pass on meta tensors; the launches are in
            stopped.append(f"{case.name}: {type(error).__name__}: {str(error).strip().splitlines()[0][:160]}")
    torch.set_default_device("cpu")
    return stopped


def _benchmark_launches() -> None:
    """Our kernel's forward and backward at every benchmark size, in bf16 (the GPU's dtype)."""
    import torch

    from .kernel_bench import pass_call
    from .report import KERNELS

    device = torch.device("meta")
    for bench in KERNELS.values():
        for size in bench.sizes("full"):
            inputs = bench.make_inputs(size, device, torch.bfloat16)
            for name, provider in bench.providers.items():  # ours: "triton" and its variants
                if name.startswith("triton"):
                    pass_call(provider(device), inputs, "forward+backward")()


def prepare(out: Path, wheel: Path | None) -> dict:
    """Compile the smoke's and the benchmarks' kernels for the target into ``out``; the manifest."""
    import torch  # noqa: F401 - before triton: the kernels' module needs both
    import triton
    from triton.runtime import cache, driver

    from gptfast.kernels import backend, common

    fa = importlib.import_module("gptfast.kernels.flash_attention")  # the module: its configuration tables
    table = fa.table_for(TARGET["arch"] // 10, TARGET["arch"] % 10, TARGET["shared_memory"])
    patches = [mock.patch.object(backend, "_device_problem", lambda tensors: None),  # meta tensors to Triton
               mock.patch.object(fa, "_configs_for", lambda q: fa.tuned_configs(
                   table, fa._head_dim_pad(q.shape[-1]), q.element_size()))]  # the GPU's table, not the interpreter's
    for name in ("cross_entropy", "linear_cross_entropy"):  # their target check reads values: meta has none
        module = importlib.import_module(f"gptfast.kernels.{name}")
        if hasattr(module, "check_target_values"):
            patches.append(mock.patch.object(module, "check_target_values", lambda *args: None))
    if wheel is not None:
        key = _wheel_key(wheel)
        patches.append(mock.patch.object(cache, "triton_key", lambda: key))
    driver.set_active(_TargetDriver(TARGET["arch"]))  # for this process: it prepares, then ends
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        with common.targeting(common.GPU(**TARGET)), common.capture_launches() as launches:
            stopped = _smoke_launches()
            _benchmark_launches()
        compiled, failed = {}, []
        for launch in launches:
            name = getattr(launch.kernel, "__name__", str(launch.kernel))
            try:
                kernel = launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.meta)
                compiled[kernel.hash] = name
            except Exception as error:  # noqa: BLE001 - listed in the manifest
                failed.append(f"{name}: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        fingerprint_made = fingerprint()
    if wheel is not None:
        fingerprint_made["python"] = f"that of {wheel.name}"
    manifest = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "target": TARGET, "fingerprint": fingerprint_made, "launches": len(launches),
                "kernels": sorted(f"{name} {digest}" for digest, name in compiled.items()),
                "failed": failed, "smoke_cases_stopped_on_meta": stopped, "triton_version": triton.__version__}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptfast.bench.triton_cache", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="compile the kernels for sm_90 into a cache folder (no GPU needed)")
    p.add_argument("--out", type=Path, default=PREPARED, help=f"default {PREPARED}")
    p.add_argument("--wheel", type=Path, help="the GPU image's Triton wheel, when its Python is not this one "
                   "(pip download triton==3.6.0 --no-deps --only-binary=:all: --python-version 3.12)")
    p = sub.add_parser("status", help="this machine's fingerprint, and whether a prepared folder matches it")
    p.add_argument("--dir", type=Path, default=PREPARED)
    args = parser.parse_args(argv)
    if args.command == "status":
        print(json.dumps({"here": fingerprint(), "choice": {k: str(v) for k, v in choose(
            Path(os.environ.get("TMPDIR", "/tmp")) / "gptfast-fresh-cache", False, args.dir).items()}}, indent=1))
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("prepare compiles kernels: run it without TRITON_INTERPRET=1")
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = str(args.out.resolve())
    os.environ["TRITON_STORE_BINARY_ONLY"] = "1"  # the cubin and its metadata: a run needs no more
    manifest = prepare(args.out, args.wheel)
    print(f"{args.out}: {len(manifest['kernels'])} kernels from {manifest['launches']} launches, "
          f"{len(manifest['failed'])} failed to compile, {entries(args.out)} cache entries")
    for line in manifest["failed"]:
        print("  failed: " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
