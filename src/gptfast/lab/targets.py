"""The GPUs the lab compiles for: one table of per-architecture constants, and occupancy.

One representative part per architecture (the lab's ``--arch``); its SM count sizes the grids the
launchers choose, and its clock and peaks turn instruction and FLOP counts into the static floors
of ``inspect``. Every number is a specification (or, for sm_90's bandwidth, a measurement) whose
source is given beside it; none is measured by the lab.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptfast.kernels.common import GPU


@dataclass(frozen=True)
class Architecture:
    arch: int  # compute capability x 10
    part: str  # the part whose numbers these are
    sm_count: int
    clock_hz: float  # boost clock
    bandwidth: float  # bytes/s: the default of --bandwidth
    bf16_dense_flops: float  # tensor-core peak, dense bf16 with float32 accumulation
    shared_per_block: int  # bytes one block may use (opt-in maximum)
    shared_per_sm: int  # bytes of shared memory per SM
    max_warps_per_sm: int
    max_blocks_per_sm: int
    registers_per_sm: int = 65536  # 32-bit registers, in 4 sub-partitions of 16K
    register_unit: int = 256  # registers are allocated per warp in units of 256 (8 per thread)
    reserved_shared_per_block: int = 1024  # the CUDA runtime's per-block reservation (sm_80 and later)
    mufu_per_clock: int = 16  # special-function (ex2, rcp, rsqrt...) results per clock per SM
    schedulers: int = 4  # warp schedulers per SM, each issuing one warp-instruction per clock

    def gpu(self) -> GPU:
        return GPU(self.arch, self.sm_count, self.shared_per_block)


KiB = 1024
ARCHITECTURES = {
    # NVIDIA A100 SXM4 80GB datasheet: 108 SMs, 1410 MHz boost, 2039 GB/s, 312 TFLOP/s bf16 dense;
    # CUDA C Programming Guide, "Compute capabilities" table: 164 KiB shared per SM (163 per block),
    # 64 warps and 32 blocks per SM.
    80: Architecture(80, "A100-SXM4-80GB", 108, 1.410e9, 2.039e12, 312e12, 163 * KiB, 164 * KiB, 64, 32),
    # NVIDIA A10 datasheet: 72 SMs, 1695 MHz boost, 600 GB/s, 125 TFLOP/s bf16 dense; Programming Guide:
    # 100 KiB shared per SM (99 per block), 48 warps and 16 blocks per SM.
    86: Architecture(86, "A10", 72, 1.695e9, 600e9, 125e12, 99 * KiB, 100 * KiB, 48, 16),
    # NVIDIA L40S datasheet: 142 SMs, 2520 MHz boost, 864 GB/s, 362 TFLOP/s bf16 dense; Programming Guide:
    # 100 KiB shared per SM (99 per block), 48 warps and 24 blocks per SM.
    89: Architecture(89, "L40S", 142, 2.520e9, 864e9, 362e12, 99 * KiB, 100 * KiB, 48, 24),
    # NVIDIA H100 SXM5 / H200 datasheets: 132 SMs, 1980 MHz boost, 989 TFLOP/s bf16 dense; 4.3e12 B/s
    # is the copy bandwidth measured on an H200 (kernel lab issue); Programming Guide: 228 KiB shared per
    # SM (227 per block), 64 warps and 32 blocks per SM.
    90: Architecture(90, "H100-SXM5 / H200", 132, 1.980e9, 4.3e12, 989e12, 227 * KiB, 228 * KiB, 64, 32),
}


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
