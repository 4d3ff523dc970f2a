"""Mixed precision: the one policy that training, evaluation and generation share.

``--dtype`` names an autocast dtype (:data:`AMP_DTYPES`) by its full or short name
(:func:`autocast_dtype_name`: bf16 is bfloat16); "auto" picks one for the device
(:func:`amp_dtype_for`). Training autocasts its forward passes to it and, for float16, scales the
loss (:func:`grad_scaler`) so that small gradients survive; ``eval`` and ``generate`` cast the
weights to it.
"""

from __future__ import annotations

import contextlib

import torch

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
