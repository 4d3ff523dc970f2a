"""The device's two ceilings, measured: copy bandwidth and matrix-multiply throughput.

Every kernel figure is also given as a percent of these: memory-bound kernels against the copy
bandwidth (bytes read plus bytes written), attention and training against the matmul rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from .harness import Record, measure
from .kernel_bench import bench_dtype


@dataclass(frozen=True)
class Ceilings:
    copy_gbps: float  # GB/s (1e9 bytes) of a large device-to-device copy, read + write
    matmul_tflops: float  # TFLOP/s of a large square matmul
    copy_bytes: int
    matmul_size: int
    matmul_dtype: str

    def percent(self, record: Record) -> float | None:
        """``record``'s figure as a percent of its ceiling: GB/s of the copy, TFLOP/s (a kernel's, or
        a training step's model FLOPs: the MFU) of the matmul; None for what has no ceiling."""
        if record.unit == "GB/s" and record.value:
            return 100.0 * record.value / self.copy_gbps
        tflops = record.value if record.unit == "TFLOP/s" else record.extra.get("model_tflops")
        return 100.0 * tflops / self.matmul_tflops if tflops else None


def measure_ceilings(device: torch.device, small: bool = False) -> Ceilings:
    """Measure both ceilings on ``device``: 1 GiB copies and an 8192^3 bf16 matmul on a GPU.

    ``small`` (the CPU sizes) copies 32 MiB and multiplies 512^3 in float32, the CPU's native type.
    """
    copy_bytes = 32 * 2**20 if small else 2**30
    src = torch.randn(copy_bytes // 4, device=device)  # random data: zeros can run faster
    dst = torch.empty_like(src)
    copy_ms = measure(partial(dst.copy_, src), device)[0]
    del src, dst

    n = 512 if small else 8192
    dtype = bench_dtype(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    matmul_ms = measure(partial(torch.matmul, a, b), device)[0]
    return Ceilings(copy_gbps=2 * copy_bytes / copy_ms / 1e6, matmul_tflops=2 * n**3 / matmul_ms / 1e9,
                    copy_bytes=copy_bytes, matmul_size=n, matmul_dtype=str(dtype).removeprefix("torch."))
