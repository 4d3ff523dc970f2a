"""One measurement's record, shared by the report, its JSON and the pytest suite."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from gptfast import kernels

from .timing import Unavailable

OK, UNAVAILABLE, FAILED = "ok", "unavailable", "failed"


@dataclass
class Record:
    """A figure for one (group, provider, pass, size), or why there is none.

    ``status`` is "ok", "unavailable" (a baseline or kernel that cannot run here: ``note`` says why)
    or "failed" (an unexpected error, ``note`` holds it: a bug to look at).
    """

    group: str  # "layer_norm", "bias_gelu", "flash_attention", "cross_entropy", "train", "generate"
    provider: str  # "triton", "torch", "torch.compile", "liger", "sdpa-flash", ...
    pass_: str  # "forward", "backward", "forward+backward"; "step" (train); "cache", "no cache" (generate)
    size: dict
    status: str = OK
    ms: float | None = None  # median milliseconds per call
    value: float | None = None  # the figure, in ``unit``
    unit: str = ""
    pct_of_ceiling: float | None = None  # of the copy or matmul ceiling; for training, the MFU
    peak_mb: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Record":
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
