"""The GPUs the lab compiles for: one table of named GPUs (``--target``) and occupancy.

Each target is a GPU part: its architecture (what the kernels compile for, ``--arch``), its SM count
(which sizes the grids the launchers choose), the one clock every floor of ``inspect`` runs at (issue,
MUFU and tensor core alike: the clock its tensor-core peak is quoted at), its memory (nominal and, where
the project has measured one, measured bandwidth) and its dense bf16 tensor-core peak. Every number is
a specification or a recorded measurement whose source is given beside it; none is measured by the lab.
``--arch sm_XX`` alone picks that architecture's first target (``ARCHITECTURES``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from gptfast.kernels.common import GPU

from .compiler import LabError


@dataclass(frozen=True)
class Architecture:
    """One target GPU: the part's numbers and its architecture's per-SM limits."""

    name: str  # --target
    arch: int  # compute capability x 10
    part: str  # the part whose numbers these are
    sm_count: int
    clock_hz: float  # the clock of every floor: the one the tensor-core peak is quoted at
    nominal_bandwidth: float  # bytes/s, the datasheet's
    measured_bandwidth: float | None  # bytes/s of a copy measured on this part and recorded; None: not measured
    datasheet_bf16_flops: float  # the datasheet's dense bf16 tensor-core peak (float32 accumulation)
    memory_bytes: int  # the GPU's memory
    tensor_flops_per_clock: int  # dense bf16 FLOPs per clock per SM, float32 accumulation
    shared_per_block: int  # bytes one block may use (opt-in maximum)
    shared_per_sm: int  # bytes of shared memory per SM
    max_warps_per_sm: int
    max_blocks_per_sm: int
    registers_per_sm: int = 65536  # 32-bit registers, in 4 sub-partitions of 16K
    register_unit: int = 256  # registers are allocated per warp in units of 256 (8 per thread)
    reserved_shared_per_block: int = 1024  # the CUDA runtime's per-block reservation (sm_80 and later)
    mufu_per_clock: int = 16  # special-function (ex2, rcp, rsqrt...) results per clock per SM
    schedulers: int = 4  # warp schedulers per SM, each issuing one warp-instruction per clock

    @property
    def bf16_dense_flops(self) -> float:
        """The tensor-core floor's FLOP/s: every SM's FLOPs per clock at ``clock_hz`` (within 2% of the
        datasheet's peak, ``datasheet_bf16_flops``: tests/test_lab.py)."""
        return self.sm_count * self.tensor_flops_per_clock * self.clock_hz

    @property
    def bandwidth(self) -> float:
        """The memory floor's bytes/s (the default of ``--bandwidth``): measured where recorded, else nominal."""
        return self.measured_bandwidth or self.nominal_bandwidth

    @property
    def bandwidth_source(self) -> str:
        return "measured" if self.measured_bandwidth else "nominal, not measured"

    def gpu(self) -> GPU:
        return GPU(self.arch, self.sm_count, self.shared_per_block)


KiB, GB = 1024, 10**9
# Per architecture, from the CUDA C Programming Guide's "Compute capabilities" table: shared memory per
# block (opt-in) and per SM, warps and blocks per SM; and the tensor cores' dense bf16 FLOPs per clock per
# SM with float32 accumulation (NVIDIA's Ampere, Ada and Hopper architecture whitepapers: 4 tensor cores
# per SM of 256 (A100), 128 (GA10x, AD10x) and 512 (H100) FMAs per clock).
_SM80 = dict(arch=80, shared_per_block=163 * KiB, shared_per_sm=164 * KiB, max_warps_per_sm=64, max_blocks_per_sm=32,
             tensor_flops_per_clock=2048)
_SM86 = dict(arch=86, shared_per_block=99 * KiB, shared_per_sm=100 * KiB, max_warps_per_sm=48, max_blocks_per_sm=16,
             tensor_flops_per_clock=1024)
_SM89 = dict(arch=89, shared_per_block=99 * KiB, shared_per_sm=100 * KiB, max_warps_per_sm=48, max_blocks_per_sm=24,
             tensor_flops_per_clock=1024)
_SM90 = dict(arch=90, shared_per_block=227 * KiB, shared_per_sm=228 * KiB, max_warps_per_sm=64, max_blocks_per_sm=32,
             tensor_flops_per_clock=4096)
_TARGETS = (
    # NVIDIA H100 datasheet and whitepaper: H100 SXM5, 132 SMs, 80 GB HBM3 at 3.35 TB/s, 989.4 TFLOP/s
    # dense bf16 = 132 SMs x 4096 FLOP/clock x 1.83 GHz: the clock every floor uses (its boost clock,
    # 1.98 GHz, is not what tensor-core work sustains). No copy bandwidth measured on an H100 is recorded.
    Architecture(name="h100", part="H100-SXM5-80GB", sm_count=132, clock_hz=1.83e9, nominal_bandwidth=3.35e12,
                 measured_bandwidth=None, datasheet_bf16_flops=989.4e12, memory_bytes=80 * GB, **_SM90),
    # NVIDIA H200 datasheet: the H100's GH100 (132 SMs, the same tensor cores and clocks) with 141 GB of
    # HBM3e at 4.8 TB/s; 4.3e12 B/s is the copy bandwidth measured on an H200 (kernel lab issue).
    Architecture(name="h200", part="H200-SXM-141GB", sm_count=132, clock_hz=1.83e9, nominal_bandwidth=4.8e12,
                 measured_bandwidth=4.3e12, datasheet_bf16_flops=989.4e12, memory_bytes=141 * GB, **_SM90),
    # NVIDIA A100 datasheet: A100 SXM4 80GB, 108 SMs, 1410 MHz boost, 2039 GB/s, 312 TFLOP/s bf16 dense
    # (108 SMs x 2048 FLOP/clock x 1.41 GHz).
    Architecture(name="a100", part="A100-SXM4-80GB", sm_count=108, clock_hz=1.410e9, nominal_bandwidth=2.039e12,
                 measured_bandwidth=None, datasheet_bf16_flops=312e12, memory_bytes=80 * GB, **_SM80),
    # NVIDIA A10 datasheet: 72 SMs, 1695 MHz boost, 600 GB/s, 125 TFLOP/s bf16 dense, 24 GB.
    Architecture(name="a10", part="A10", sm_count=72, clock_hz=1.695e9, nominal_bandwidth=600e9,
                 measured_bandwidth=None, datasheet_bf16_flops=125e12, memory_bytes=24 * GB, **_SM86),
    # NVIDIA L40S datasheet: 142 SMs, 2520 MHz boost, 864 GB/s, 362 TFLOP/s bf16 dense (at ~2.49 GHz; the
    # floors' 366 at the boost clock), 48 GB.
    Architecture(name="l40s", part="L40S", sm_count=142, clock_hz=2.520e9, nominal_bandwidth=864e9,
                 measured_bandwidth=None, datasheet_bf16_flops=362e12, memory_bytes=48 * GB, **_SM89),
)
TARGETS = {target.name: target for target in _TARGETS}
# --arch alone: the architecture's first target (sm_90: the H100).
ARCHITECTURES = {arch: next(t for t in _TARGETS if t.arch == arch) for arch in sorted({t.arch for t in _TARGETS})}


def parse_target(name: str | None, arch: str | None) -> Architecture:
    """The target ``--target NAME`` names, or ``--arch``'s first (default: sm_90's, the H100); a
    LabError when they disagree or name none."""
    if name is None:
        return parse_arch(arch or "sm_90")
    if name not in TARGETS:
        raise LabError(f"unknown target {name!r}: choose one of {', '.join(TARGETS)}")
    target = TARGETS[name]
    if arch is not None and parse_arch(arch).arch != target.arch:
        raise LabError(f"--target {name} is sm_{target.arch}, not {arch}")
    return target


def target_for_device(device_name: str, capability: tuple[int, int], sm_count: int, memory_bytes: int) -> Architecture:
    """The target a GPU is: the one its name names ("NVIDIA H100 80GB HBM3" -> h100) when the architecture,
    SM count and memory (within 10%) agree too; else its architecture's first target with this GPU's SM
    count, named "like-NAME" (an H100 PCIe or NVL, an A100 40GB: not the part whose numbers these are)."""
    arch = 10 * capability[0] + capability[1]
    for target in _TARGETS:
        named = re.search(rf"\b{target.name}\b", device_name, re.IGNORECASE)
        if (named and (target.arch, target.sm_count) == (arch, sm_count)
                and abs(memory_bytes - target.memory_bytes) <= 0.1 * target.memory_bytes):
            return target
    nearest = ARCHITECTURES.get(arch, ARCHITECTURES[90 if arch >= 90 else 80])
    return replace(nearest, name=f"like-{nearest.name}", part=f"{device_name} (as {nearest.part})", sm_count=sm_count)


def parse_arch(text: str) -> Architecture:
    """``sm_90`` (or ``90``) -> its Architecture; a ValueError naming the known ones otherwise."""
    digits = text.removeprefix("sm_")
    if not digits.isdigit() or int(digits) not in ARCHITECTURES:
        known = ", ".join(f"sm_{a}" for a in ARCHITECTURES)
        raise ValueError(f"unknown architecture {text!r}: choose one of {known}")
    return ARCHITECTURES[int(digits)]


@dataclass(frozen=True)
class Occupancy:
    ctas_per_sm: int
    warps_per_sm: int
    limit: str  # the resource that bounds it: "warps", "blocks", "registers" or "shared_memory"


def occupancy(arch: Architecture, num_warps: int, registers: int, shared: int) -> Occupancy:
    """CTAs per SM as the CUDA occupancy calculator counts them: registers by warp in units of 256
    over each of the 4 sub-partitions' 16K, shared memory in 128-byte units plus the 1 KiB the runtime
    reserves per block, the SM's warp and block limits. A tie names the SM's own limit (warps,
    blocks) before the kernel's (registers, shared memory)."""
    per_warp = -(-registers * 32 // arch.register_unit) * arch.register_unit
    warps_by_registers = 4 * ((arch.registers_per_sm // 4) // per_warp)
    block_shared = -(-shared // 128) * 128 + arch.reserved_shared_per_block
    limits = {"warps": arch.max_warps_per_sm // num_warps,
              "blocks": arch.max_blocks_per_sm,
              "registers": warps_by_registers // num_warps,
              "shared_memory": arch.shared_per_sm // block_shared}
    limit = min(limits, key=limits.get)
    return Occupancy(limits[limit], limits[limit] * num_warps, limit)
