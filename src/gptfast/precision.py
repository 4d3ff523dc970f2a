"""Mixed precision: the one policy that training, evaluation and generation share.

``--dtype`` names an autocast dtype (:data:`AMP_DTYPES`) by its full or short name
(:func:`autocast_dtype_name`: bf16 is bfloat16); "auto" picks one for the device
(:func:`amp_dtype_for`). Training autocasts its forward passes to it and, for float16, scales the
loss (:func:`grad_scaler`) so that small gradients survive; ``eval`` and ``generate`` cast the
weights to it. Each command declares its ``--dtype`` with :func:`dtype_option`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from .options import option

# --dtype: the autocast dtype of each choice (None: float32, no autocast; "auto": see amp_dtype_for).
AMP_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}
# The one dtype vocabulary of every command: a name torch uses, or its short form, means the same dtype.
DTYPE_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SHORT_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def dtype_name(text: str, choices: tuple[str, ...] = tuple(DTYPE_NAMES)) -> str:
    """The full name (``bfloat16``) of a dtype given as it or its short form (``bf16``), if one of
    ``choices``; otherwise a ValueError saying "must be one of ..., got ...", for the caller to
    prefix with the option's name (argparse's ``type=`` does: ``argument --dtype: must be ...``)."""
    name = SHORT_NAMES.get(text, text)
    if name not in choices:
        shorts = [short for short, full in SHORT_NAMES.items() if full in choices]
        also = f" (or {', '.join(shorts)})" if shorts else ""
        raise ValueError(f"must be one of {', '.join(choices)}{also}, got {text!r}")
    return name


def autocast_dtype_name(text: str) -> str:
    """A ``--dtype`` choice of training, ``eval`` and ``generate`` by either name: "auto", "bf16"..."""
    return dtype_name(text, tuple(AMP_DTYPES))


def dtype_option(use: str, older_gpus: str, **declaration: Any) -> Any:
    """A command's ``--dtype`` (:func:`~gptfast.options.option`): one of :data:`AMP_DTYPES` by either
    name, "auto" by default. ``use`` is what it sets ("autocast", "weights"), ``older_gpus`` what
    "auto" picks on GPUs without bfloat16, ``declaration`` the rest (``group``, ``resume``)."""
    return option("auto", help=f"{use} dtype; bf16, fp16, fp32 for short", choices=tuple(AMP_DTYPES),
                  parse=autocast_dtype_name, default_help=f"auto: bfloat16 on GPUs that have it, {older_gpus} on "
                  "older ones, float32 on CPUs", **declaration)


def amp_dtype_for(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a ``--dtype`` choice on ``device`` (None: float32, no autocast).

    "auto" is bfloat16 on GPUs with bf16 arithmetic (compute capability 8.0 and up), float16 on
    older ones (the trainer then scales the loss), and float32 on CPUs.
    """
    if dtype != "auto":
        return AMP_DTYPES[dtype]
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def autocast(device_type: str, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``amp_dtype``, or no autocast at all when it is None."""
    return torch.autocast(device_type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()


def grad_scaler(amp_dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """The loss scaler float16 autocast needs (its small gradients would underflow); None otherwise."""
    return torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
