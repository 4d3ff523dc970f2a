"""Triton's cache in the GPU run (``bash bench/gpu.sh``): which folder it uses, and what it saved.

A cache compiled ahead without a GPU (``python bench/gpu_run_prepare.py``, into ``bench/triton-cache/``,
gitignored, copied with the checkout) holds a manifest of what Triton's cache keys are made of beside
the kernel itself: Triton's own key (its version, its sources and its compiled library), the backend's
(ptxas and the target) and the default options' (libdevice included). The run (:func:`choose`) uses
that folder as TRITON_CACHE_DIR only when all of them match the machine's; each stage then counts
Triton's cache hits and misses (:func:`listen`, Triton's compilation listener), so the run says what
the cache saved. ``python bench/gpu_run_cache.py`` prints this machine's fingerprint and the choice.

Run as a script (the run's scripts import each other from bench/); it imports Triton only when asked.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

PREPARED = Path(__file__).resolve().parent / "triton-cache"
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
    return {"dir": prepared, "used": True, "here": here, "reason": f"prepared cache used: "
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_run_cache.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=PREPARED, help=f"the prepared folder (default {PREPARED})")
    args = parser.parse_args(argv)
    fresh = Path(os.environ.get("TMPDIR", "/tmp")) / "gptfast-fresh-cache"
    choice = choose(fresh, rehearse=False, prepared=args.dir)
    print(json.dumps({"here": fingerprint(), "choice": choice}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
