"""How every figure is measured and recorded: the report and ``pytest --benchmark`` both go through here.

On CUDA a call is timed by ``triton.testing.do_bench``, which flushes the L2 cache before each timed
call (so repeats stream their inputs from memory) and reports quantiles of CUDA-event times. Off CUDA,
where work runs eagerly and there are no events, :func:`wall_clock` stands in with the same interface.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from gptfast import kernels
from gptfast.kernels.benchmark import Unavailable

WARMUP_MS, REP_MS = 25.0, 100.0  # default warm-up and timed repeats per kernel case
QUANTILES = (0.5, 0.2, 0.8)  # the median, then the 20th and 80th percentiles
OK, UNAVAILABLE, FAILED = "ok", "unavailable", "failed"


def measure(fn: Callable[[], object], device: torch.device, *, warmup_ms: float = WARMUP_MS,
            rep_ms: float = REP_MS, grad_to_none: Sequence[torch.Tensor] = ()) -> list[float]:
    """Milliseconds per call of ``fn`` at :data:`QUANTILES`: do_bench on CUDA, :func:`wall_clock` elsewhere.

    ``grad_to_none``: tensors whose gradients are cleared before each timed call, so none accumulate.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grad_to_none) or None,
                        quantiles=list(QUANTILES))
    return wall_clock(fn, warmup_ms=warmup_ms, rep_ms=rep_ms, grad_to_none=grad_to_none)


def wall_clock(fn: Callable[[], object], *, warmup_ms: float, rep_ms: float,
               grad_to_none: Sequence[torch.Tensor] = ()) -> list[float]:
    """do_bench's interface, timed by ``time.perf_counter``: warm-up calls filling ``warmup_ms``, then
    timed calls filling ``rep_ms`` (one at least: the CPU benchmark tests, which check that the code
    runs, ask for no more, and a call there can take seconds in the interpreter); their quantiles."""
    start = time.perf_counter()
    while (time.perf_counter() - start) * 1e3 < warmup_ms:
        fn()
    times: list[float] = []
    while not times or sum(times) < rep_ms:
        for tensor in grad_to_none:
            tensor.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    quantiles = torch.tensor(QUANTILES, dtype=torch.float64)
    return torch.quantile(torch.tensor(times, dtype=torch.float64), quantiles).tolist()


@dataclass
class Record:
    """A figure for one (group, provider, pass, size), or why there is none.

    ``status`` is "ok", "unavailable" (a baseline or kernel that cannot run here: ``note`` says why)
    or "failed" (an unexpected error, ``note`` holds it: a bug to look at).
    """

    group: str  # a kernel benchmark's name (report.KERNELS), "train" or "generate"
    provider: str  # "triton", "torch", "torch.compile", "liger", "sdpa-flash", ...
    pass_: str  # "forward", "backward", "forward+backward"; "step" (train); "cache", "no cache" (generate)
    size: dict
    status: str = OK
    ms: float | None = None  # median milliseconds per call
    p20_ms: float | None = None  # the 20th and 80th percentiles of the timed calls
    p80_ms: float | None = None
    value: float | None = None  # the figure, in ``unit``, at the median
    unit: str = ""
    pct_of_ceiling: float | None = None  # of the copy or matmul ceiling; for training, the MFU
    peak_mb: float | None = None  # peak device memory of the first call (CUDA only), inputs included
    first_call_s: float | None = None  # the first call alone: compilation and autotuning show here
    note: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Record:
        return cls(**d)


def failure_status(error: BaseException) -> tuple[str, str]:
    """Classify an exception raised while building or running a provider: (status, note)."""
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    if isinstance(error, (Unavailable, kernels.BackendError, ImportError)):
        return UNAVAILABLE, first_line
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return UNAVAILABLE, "out of memory"
    if type(error).__module__.startswith(("torch._dynamo", "torch._inductor")):
        return UNAVAILABLE, f"torch.compile failed: {type(error).__name__}: {first_line}"
    return FAILED, f"{type(error).__name__}: {first_line}"


def measure_record(record: Record, build: Callable[[], tuple[Callable[[], object], Sequence[torch.Tensor]]],
                   work: float, device: torch.device, **timing: float) -> Record:
    """Fill ``record`` with the timing of the call ``build()`` returns (with its ``grad_to_none``).

    The call runs once first (``first_call_s``, ``peak_mb``), then :func:`measure` times it
    (``timing``: ``warmup_ms``, ``rep_ms``); ``value`` is ``work`` per second at the median. Whatever
    goes wrong is recorded, never raised: one provider that cannot run must not stop a run.
    """
    try:
        fn, grad_to_none = build()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            record.peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        record.first_call_s = time.perf_counter() - start
        record.ms, record.p20_ms, record.p80_ms = measure(fn, device, grad_to_none=grad_to_none, **timing)
    except Exception as error:
        record.status, record.note = failure_status(error)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return record
    record.value = work / (record.ms * 1e-3)
    return record
