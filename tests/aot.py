"""Ahead-of-time compilation of Triton kernels for NVIDIA targets, without a GPU.

Tests use it to check that a kernel compiles for sm_80 / sm_90 at each block configuration it may
launch with, without register spills and within the target's shared memory, and to inspect its PTX
(e.g. that fp16 rows are read with 128-bit loads). Under ``TRITON_INTERPRET=1`` ``triton.jit``
returns an interpreted function, so compilation runs in a fresh Python process without that
variable; one process compiles a whole list of builds to pay Triton's start-up once::

    from aot import Build, compile_kernels, global_load_bits

    # for a kernel `def copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr)` in the module mypkg.ops:
    stats = compile_kernels([Build("mypkg.ops", "copy",
                                   signature={"x_ptr": "*fp16", "y_ptr": "*fp16", "n": "i32", "BLOCK": "constexpr"},
                                   constexprs={"BLOCK": 1024}, aligned=("x_ptr", "y_ptr", "n"), arch=90)])
    assert stats[0].spill_bytes == 0 and stats[0].shared <= stats[0].shared_limit
    assert global_load_bits(stats[0].ptx)[128] > 0  # 128-bit loads of x

Registers and spills come from ``ptxas -v`` run on the PTX (the bundled ptxas Triton itself uses);
shared memory from the compiled kernel's metadata.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Shared memory one block may use (opt-in maximum): A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB,
# RTX 30xx / A10 (sm_86) and RTX 40xx / L4 / L40S (sm_89) 99 KiB.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@dataclass(frozen=True)
class Build:
    """One kernel specialisation to compile.

    ``signature`` maps every argument of the kernel to its Triton type ("*fp16", "*fp32", "i32",
    "fp32", ... and "constexpr" for compile-time arguments, whose values go in ``constexprs``).
    ``aligned`` names pointer and integer arguments to assume 16-divisible, as the launcher does for
    16-byte aligned pointers and strides that are multiples of 16: vectorised loads depend on it.
    """

    module: str
    kernel: str
    signature: dict[str, str]
    constexprs: dict[str, int | float | bool] = field(default_factory=dict)
    aligned: tuple[str, ...] = ()
    num_warps: int = 4
    num_stages: int = 3
    arch: int = 90
    maxnreg: int | None = None  # the launcher's register cap per thread, if it sets one


@dataclass(frozen=True)
class KernelStats:
    """What the compiler reports for one :class:`Build`."""

    build: Build
    registers: int  # per thread
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    shared: int  # bytes of shared memory per block
    ptx: str

    @property
    def spill_bytes(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def shared_limit(self) -> int:
        return SHARED_MEMORY_LIMIT[self.build.arch]

    def __str__(self) -> str:
        b = self.build
        return (f"{b.kernel} sm_{b.arch} {b.constexprs} warps={b.num_warps} stages={b.num_stages} "
                f"maxnreg={b.maxnreg}: "
                f"{self.registers} registers, {self.spill_stores}+{self.spill_loads} spill bytes, "
                f"{self.shared} bytes shared")


def compile_kernels(builds: list[Build], timeout: float = 600.0) -> list[KernelStats]:
    """Compile every build in one subprocess without ``TRITON_INTERPRET``; stats in the same order."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    request = json.dumps([dataclasses.asdict(b) for b in builds])
    result = subprocess.run([sys.executable, __file__], input=request, env=env, capture_output=True,
                            text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"ahead-of-time compilation failed:\n{result.stderr[-4000:]}")
    reports = json.loads(result.stdout)
    return [KernelStats(build=b, **r) for b, r in zip(builds, reports)]


_GLOBAL_ACCESS = {op: re.compile(rf"\b{op}\.global(?:\.[\w:]+)*?(?:\.v(\d))?\.[bfus](\d+)\b") for op in ("ld", "st")}


def global_load_bits(ptx: str) -> Counter[int]:
    """How many global-memory load instructions ``ptx`` has of each width in bits
    (ld.global.v4.b32 counts as one 128-bit load)."""
    return Counter(int(vec or 1) * int(bits) for vec, bits in _GLOBAL_ACCESS["ld"].findall(ptx))


def global_store_bits(ptx: str) -> Counter[int]:
    """The same for global-memory stores (st.global.v4.b32: one 128-bit store)."""
    return Counter(int(vec or 1) * int(bits) for vec, bits in _GLOBAL_ACCESS["st"].findall(ptx))


# ---- the subprocess side: runs with the real (compiling) Triton ----

_PTXAS_USAGE = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill-store bytes, spill-load bytes) from ``ptxas -v`` on the PTX."""
    import tempfile

    from triton.backends.nvidia import compiler as nvidia

    ptxas = nvidia.get_ptxas(arch).path if hasattr(nvidia, "get_ptxas") else nvidia.knobs.nvidia.ptxas.path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "kernel.ptx")
        src.write_text(ptx)
        log = subprocess.run([ptxas, "-v", f"--gpu-name={nvidia.sm_arch_from_capability(arch)}", str(src),
                              "-o", str(Path(tmp, "kernel.cubin"))], capture_output=True, text=True, check=True)
    text = log.stdout + log.stderr
    registers, spills = _PTXAS_USAGE.search(text), _PTXAS_SPILLS.search(text)
    if registers is None or spills is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{text}")
    return int(registers.group(1)), int(spills.group(1)), int(spills.group(2))


def _compile(build: dict) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(build["module"]), build["kernel"])
    if not isinstance(fn, triton.runtime.JITFunction):
        raise TypeError(f"{build['module']}.{build['kernel']} is not a @triton.jit kernel "
                        "(is TRITON_INTERPRET set?)")
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in build["aligned"]}
    source = ASTSource(fn, signature=build["signature"], constexprs=build["constexprs"], attrs=attrs)
    target = GPUTarget("cuda", build["arch"], 32)
    options = {"num_warps": build["num_warps"], "num_stages": build["num_stages"]}
    if build["maxnreg"] is not None:
        options["maxnreg"] = build["maxnreg"]
    compiled = triton.compile(source, target=target, options=options)
    ptx = compiled.asm["ptx"]
    registers, spill_stores, spill_loads = _ptxas_report(ptx, build["arch"])
    return dict(registers=registers, spill_stores=spill_stores, spill_loads=spill_loads,
                shared=int(compiled.metadata.shared), ptx=ptx)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("tests/aot.py compiles kernels: run it without TRITON_INTERPRET=1")
    json.dump([_compile(b) for b in json.load(sys.stdin)], sys.stdout)
