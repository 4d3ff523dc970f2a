"""Ahead-of-time compilation of captured kernel launches for an NVIDIA target, without a GPU.

A :class:`Build` is one launch as a launcher asked for it (``common.capture_launches``), made
JSON-able: the kernel's module and the name of its handle there (a kernel may have a second,
``common.jit_variant``), each argument (tensors by dtype, shape, strides and offset; plain values as
they are), the meta-parameters and the target architecture. Under ``TRITON_INTERPRET=1``
``triton.jit`` gives interpreted functions, so compilation runs in a fresh Python process without
that variable (one process per share of the builds: Triton starts once).

There the launch goes through Triton's own launcher steps (its argument binder and ``_pack_args``):
the signature and specialisation are exactly what ``kernel[grid](*args)`` would compile on that GPU,
integers equal to 1 becoming constants, 16-divisible integers and 16-byte aligned pointers hinted.
Then ``triton.compile`` for ``GPUTarget("cuda", arch, 32)``, ``ptxas -v`` on its PTX (registers,
spills and the notes on serialised wgmma) and ``cuobjdump -sass`` on its cubin.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg", "num_ctas")


class LabError(ValueError):
    """A request the lab cannot serve (unknown op, bad shape, failed compilation); one line says why."""


def describe_arg(value) -> object:
    """A launch argument as JSON: a tensor by its dtype, shape, strides and storage offset."""
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "shape": list(value.shape),
                "stride": list(value.stride()), "offset": value.storage_offset()}
    if isinstance(value, torch.dtype):
        raise LabError(f"a torch.dtype launch argument ({value}) cannot be compiled ahead of time")
    return value


def rebuild_arg(spec: object) -> object:
    """The inverse of :func:`describe_arg`: tensors come back on device "meta" (no data), their data
    pointer the storage offset in bytes, as if the allocation were aligned (CUDA's are)."""
    if isinstance(spec, dict) and "tensor" in spec:
        base = torch.empty(spec["offset"] + max(1, sum((n - 1) * s for n, s in zip(spec["shape"], spec["stride"])) + 1),
                           dtype=getattr(torch, spec["tensor"]), device="meta")
        return base.as_strided(spec["shape"], spec["stride"], spec["offset"])
    return spec


@dataclass(frozen=True)
class Build:
    """One kernel launch to compile for ``arch`` (80 for sm_80)."""

    module: str
    kernel: str
    args: tuple
    meta: dict
    arch: int

    @classmethod
    def of(cls, launch, arch: int) -> Build:
        """The build of a captured ``common.Launch``."""
        fn = getattr(launch.kernel, "fn", launch.kernel)
        handles = vars(importlib.import_module(fn.__module__))
        name = next((name for name, obj in handles.items() if obj is launch.kernel), fn.__name__)
        return cls(fn.__module__, name, tuple(describe_arg(a) for a in launch.args), dict(launch.meta), arch)


@dataclass(frozen=True)
class Compiled:
    """What the compiler made of a :class:`Build`."""

    build: Build
    signature: dict  # argument -> Triton type ("*bf16", "i32", "constexpr", ...)
    constants: dict  # constexpr arguments and their values (JSON-able: str() of others)
    hinted: list  # arguments specialised as 16-divisible (aligned pointers, ints)
    options: dict  # num_warps, num_stages, maxnreg as compiled
    registers: int  # per thread, from ptxas -v
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    shared: int  # bytes of shared memory per block
    ptxas_log: str
    asm: dict  # "ttir", "ttgir", "ptx", "sass"

    @property
    def spill_bytes(self) -> int:
        return self.spill_stores + self.spill_loads

    def __str__(self) -> str:
        config = {k: v for k, v in self.constants.items() if k.isupper() and not k.startswith(("HAS_", "stride"))}
        return (f"{self.build.kernel} sm_{self.build.arch} {config} {self.options}: {self.registers} registers, "
                f"{self.spill_stores}+{self.spill_loads} spill bytes, {self.shared} bytes shared")


def compile_builds(builds: list[Build], workers: int | None = None, timeout: float = 900.0) -> list[Compiled]:
    """Compile every build, in ``workers`` subprocesses (default: one per CPU core) without
    ``TRITON_INTERPRET``; the results in the same order. A build given twice (the same kernel as the
    inputs of two requests make it) is compiled once."""
    keys = [json.dumps(dataclasses.asdict(b), sort_keys=True, default=str) for b in builds]
    distinct = list({key: b for key, b in zip(keys, builds)}.items())
    if not distinct:
        return []
    workers = max(1, min(len(distinct), workers or os.cpu_count() or 1))
    shares = [[b for _, b in distinct[i::workers]] for i in range(workers)]
    with ThreadPoolExecutor(workers) as pool:
        done = list(pool.map(lambda share: _compile_in_subprocess(share, timeout), shares))
    by_key = {key: compiled for i, share in enumerate(done) for (key, _), compiled in zip(distinct[i::workers], share)}
    return [by_key[key] for key in keys]


def _compile_in_subprocess(builds: list[Build], timeout: float) -> list[Compiled]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    request = json.dumps([dataclasses.asdict(b) for b in builds])
    result = subprocess.run([sys.executable, "-m", "gptfast.lab.compiler"], input=request, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        last = [line for line in result.stderr.splitlines() if line.strip()][-1:] or [f"exit {result.returncode}"]
        raise LabError(f"ahead-of-time compilation failed: {last[0]}")
    compiled = json.loads(result.stdout)
    for build, r in zip(builds, compiled):
        if "error" in r:
            raise LabError(f"ahead-of-time compilation of {build.kernel} for sm_{build.arch} failed: {r['error']}")
    return [Compiled(build=b, **r) for b, r in zip(builds, compiled)]


# ---- the subprocess side: runs with the real (compiling) Triton ----

def nvidia_tool(name: str, arch: int) -> str:
    """The path of a CUDA tool Triton bundles (ptxas; cuobjdump and nvdisasm lie beside it)."""
    from triton.backends.nvidia import compiler as nvidia

    ptxas = nvidia.get_ptxas(arch).path if hasattr(nvidia, "get_ptxas") else nvidia.knobs.nvidia.ptxas.path
    return ptxas if name == "ptxas" else str(Path(ptxas).with_name(name))


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int, int, str]:
    """(registers, spill-store bytes, spill-load bytes, the log) from ``ptxas -v`` on the PTX."""
    import re

    from triton.backends.nvidia import compiler as nvidia

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "kernel.ptx")
        src.write_text(ptx)
        log = subprocess.run([nvidia_tool("ptxas", arch), "-v", f"--gpu-name={nvidia.sm_arch_from_capability(arch)}",
                              str(src), "-o", str(Path(tmp, "kernel.cubin"))],
                             capture_output=True, text=True, check=True)
    text = log.stdout + log.stderr
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if registers is None or spills is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{text}")
    return int(registers.group(1)), int(spills.group(1)), int(spills.group(2)), text


def _sass(cubin: bytes, arch: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "kernel.cubin")
        path.write_bytes(cubin)
        return subprocess.run([nvidia_tool("cuobjdump", arch), "-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout


def _json_value(value: object) -> object:
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _compile(build: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = getattr(importlib.import_module(build["module"]), build["kernel"])
    if not isinstance(fn, triton.runtime.JITFunction):
        raise TypeError(f"{build['module']}.{build['kernel']} is not a @triton.jit kernel (is TRITON_INTERPRET set?)")
    target = GPUTarget("cuda", build["arch"], 32)
    backend = make_backend(target)
    # The launcher's own steps (JITFunction.run): bind and specialise the arguments, pack the options.
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(build["meta"], debug=False)
    bound, specialization, options = binder(*[rebuild_arg(a) for a in build["args"]], **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    registers, spill_stores, spill_loads, log = _ptxas_report(compiled.asm["ptx"], build["arch"])
    names = list(fn.arg_names)
    return dict(signature=dict(signature), constants={names[p[0]]: _json_value(v) for p, v in constexprs.items()},
                hinted=[names[p[0]] for p, attr in attrs.items() if attr], registers=registers,
                spill_stores=spill_stores,
                spill_loads=spill_loads, shared=int(compiled.metadata.shared), ptxas_log=log,
                options={k: getattr(options, k) for k in LAUNCH_OPTIONS if hasattr(options, k)},
                asm={"ttir": compiled.asm["ttir"], "ttgir": compiled.asm["ttgir"], "ptx": compiled.asm["ptx"],
                     "sass": _sass(compiled.asm["cubin"], build["arch"])})


def _root_cause(error: BaseException) -> str:
    """The first cause of a failed compilation in one line (Triton's errors wrap it in the kernel's source)."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


def _compile_or_error(build: dict) -> dict:
    try:
        return _compile(build)
    except Exception as error:  # reported to the parent in one line, with the build it belongs to
        return {"error": _root_cause(error)}


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("gptfast.lab.compiler compiles kernels: run it without TRITON_INTERPRET=1")
    json.dump([_compile_or_error(b) for b in json.load(sys.stdin)], sys.stdout)
