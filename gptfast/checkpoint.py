"""Training checkpoints: one file written atomically, read back without executing pickled code.

A checkpoint is a dictionary of tensors and plain Python values (no classes): the model and
optimizer state dicts, the step, the model and training configurations, the tokenizer, the data
stream's position and RNG state. ``torch.save`` writes it to a temporary file that is then renamed
over the old one, so an interrupted write never leaves a broken checkpoint; ``torch.load`` reads it
with ``weights_only=True``, which refuses anything but tensors and primitive containers.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .model import GPT, GPTConfig
from .tokenizer import Tokenizer, tokenizer_from_dict

CHECKPOINT_FILE = "ckpt.pt"
FORMAT = "gptfast-checkpoint-1"


def checkpoint_path(path: str | os.PathLike) -> Path:
    """``path`` itself, or ``path/ckpt.pt`` when ``path`` is a folder (a training run's out_dir)."""
    path = Path(path).expanduser()
    return path / CHECKPOINT_FILE if path.is_dir() else path


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` to ``path`` (a file, or a folder to hold ``ckpt.pt``) atomically."""
    path = checkpoint_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain values only)."""
    path = checkpoint_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise ValueError(f"{str(path)!r} is not a readable gptfast checkpoint: {error}") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a gptfast checkpoint (expected format {FORMAT!r})")
    return state


def load_for_inference(path: str | os.PathLike, device: str | torch.device = "cpu", *,
                       tiktoken_file: str | os.PathLike | None = None) -> tuple[GPT, Tokenizer]:
    """The trained model (in eval mode, on ``device``) and its tokenizer from a training checkpoint."""
    state = load_checkpoint(path)
    model = GPT(GPTConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    tokenizer = tokenizer_from_dict(state["tokenizer"], tiktoken_file=tiktoken_file)
    return model.to(device).eval(), tokenizer
