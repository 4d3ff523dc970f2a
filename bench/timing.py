"""Timing on any device: warm up, then the median of many repeats.

On CUDA each call is timed with CUDA events; elsewhere (where work runs eagerly) with
``time.perf_counter``. Inputs that fit in the L2 cache are rotated by the caller (several input
sets, one callable each) so repeats do not measure the cache.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

WARMUP_MS, REP_MS = 25.0, 100.0  # default warm-up and timed repeats per case


class Unavailable(Exception):
    """A provider (a baseline, a kernel, a compiler) cannot run here; the message says why."""


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, which runs eagerly)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: the median and the spread of the repeats."""

    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int


def time_calls(calls: Sequence[Callable[[], object]], device: torch.device, *,
               warmup_ms: float = WARMUP_MS, rep_ms: float = REP_MS, min_repeats: int = 3,
               max_repeats: int = 1000) -> Timing:
    """Time ``calls`` in rotation: each call is one input set of the same work.

    Warm-up runs every call at least once and lasts about ``warmup_ms``; then about ``rep_ms`` of
    timed repeats (``min_repeats`` to ``max_repeats``), each timed on its own.
    """
    if not calls:
        raise ValueError("time_calls: need at least one callable")
    synchronize(device)
    start = time.perf_counter()
    n_warm = 0
    while n_warm < len(calls) or (time.perf_counter() - start) * 1e3 < warmup_ms:
        calls[n_warm % len(calls)]()
        synchronize(device)
        n_warm += 1
    estimate_ms = (time.perf_counter() - start) * 1e3 / n_warm
    repeats = int(min(max(rep_ms / max(estimate_ms, 1e-3), min_repeats), max_repeats))
    order = [calls[i % len(calls)] for i in range(repeats)]
    times = _event_times(order) if device.type == "cuda" else [_host_time(call) for call in order]
    return Timing(statistics.median(times), min(times), max(times), repeats)


def _event_times(calls: list[Callable[[], object]]) -> list[float]:
    """CUDA-event milliseconds of each call, queued back to back with one synchronisation at the end
    (as ``triton.testing.do_bench`` does), so the host's launch time hides behind the GPU's work."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in calls]
    for call, (begin, end) in zip(calls, events):
        begin.record()
        call()
        end.record()
    torch.cuda.synchronize()
    return [begin.elapsed_time(end) for begin, end in events]


def _host_time(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1e3


def input_sets(one_set_bytes: int, device: torch.device, cache_bytes: int = 50 * 2**20,
               max_sets: int = 8) -> int:
    """How many input sets to rotate so that repeats stream from memory, not from the cache.

    Enough sets to span twice the device's L2 (50 MB on an H100); one on the CPU, whose caches
    the small CPU sizes fit anyway and where the numbers only keep the code working.
    """
    if device.type != "cuda":
        return 1
    cache_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", cache_bytes)
    return max(1, min(max_sets, -(-2 * cache_bytes // max(one_set_bytes, 1))))


def peak_memory_mb(device: torch.device) -> float | None:
    """The peak allocated device memory since the last reset, in MiB (None off CUDA)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
