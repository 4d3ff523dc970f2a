"""Training checkpoints: one file written atomically, read back without executing pickled code.

A checkpoint is a dictionary of tensors and plain Python values (no classes): the model and
optimizer state dicts, the step, the model and training configurations, the tokenizer, the data
stream's position and RNG state. ``torch.save`` writes it to a temporary file, which is flushed to
the disk and then renamed over the old one, the folder flushed too (:mod:`gptfast.durable`), so an
interrupted write, a full disk or a power loss leaves the old checkpoint or the new one, never a
broken one. ``torch.load`` reads it with ``weights_only=True``, which refuses anything but tensors
and primitive containers; every field is checked, so a damaged or foreign file is one clear error
naming the file and field. One training run at a time writes to a folder: :func:`out_dir_lock`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from .config import named
from .durable import no_space, replace_atomically
from .memory import check_model_fits
from .model import GPT, ConfigFieldError, GPTConfig
from .outputs import CHECKPOINT_FILE, SHARDED_CHECKPOINT_DIR, SHARDED_MARKER
from .tokenizer import Tokenizer, tokenizer_from_dict

FORMAT = "gptfast-checkpoint-1"
# The fields a checkpoint may hold and their types; inference needs the first three, resuming all but the scaler.
FIELD_TYPES = {"model": dict, "model_config": dict, "tokenizer": dict, "step": int, "optimizer": dict,
               "train_config": dict, "data": dict, "scaler": dict, "processes": int}
INFERENCE_FIELDS = ("model", "model_config", "tokenizer")
TRAINING_FIELDS = INFERENCE_FIELDS + ("step", "optimizer", "train_config", "data")


def checkpoint_path(path: str | os.PathLike) -> Path:
    """``path`` itself, or ``path/ckpt.pt`` when ``path`` is a folder (a training run's out_dir)."""
    path = Path(path).expanduser()
    return path / CHECKPOINT_FILE if path.is_dir() else path


def _nbytes(value) -> int:
    """The bytes of the tensors in a nested structure of dicts, lists and tensors."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` to ``path`` (a file, or a folder to hold ``ckpt.pt``) atomically and durably.

    A failed write (a full disk, Ctrl-C) removes its partial temporary file and keeps the old checkpoint.
    """
    path = checkpoint_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    needed = _nbytes(state) + (1 << 20)  # the tensors, and room for the zip directory and plain values
    if shutil.disk_usage(path.parent).free < needed:
        raise no_space(path, needed)
    replace_atomically(path, needed, lambda f: torch.save({"format": FORMAT, **state}, f))
    return path


def torch_load(path: Path, map_location: str | torch.device = "cpu", what: str = "gptfast checkpoint"):
    """``torch.load(weights_only=True)``, its failures one line naming ``path`` (not torch's advice to
    load with weights_only=False, which would run whatever code the file holds)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise ValueError(f"{str(path)!r} is empty, not a {what}")
    if head != b"PK\x03\x04":  # torch.save writes a zip archive
        raise ValueError(f"{str(path)!r} is not a {what}: it is not a file torch.save writes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        if "weights_only" in str(error) or type(error).__name__ == "UnpicklingError":
            name = found.group(1) if found else None
            raise ValueError(f"{str(path)!r} is not a {what}: it holds pickled Python objects"
                             f"{f' ({name})' if name else ''}, not only tensors and plain values; refused "
                             "(loading them could run code)") from None
        raise ValueError(f"{str(path)!r} is damaged (truncated or corrupt), not a readable {what}: "
                         f"{str(error).splitlines()[0][:200]}") from None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                    require: Sequence[str] = ()) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain values only).

    Every field present must have its type (:data:`FIELD_TYPES`) and the fields in ``require`` must
    be there; otherwise the error names the file and the field.
    """
    path = checkpoint_path(path)
    if not path.is_file():
        for folder in (path.parent, path.parent / SHARDED_CHECKPOINT_DIR):
            if (folder / SHARDED_MARKER).is_file():
                raise ValueError(f"{str(folder)!r} is a sharded checkpoint (train --parallel fsdp), not one file: "
                                 f"make it one with `gptfast export {folder} --out FILE.pt`")
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    state = torch_load(path, map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a gptfast checkpoint (expected format {FORMAT!r})")
    for field in require:
        if field not in state:
            raise ValueError(f"{str(path)!r} is damaged: it has no {field!r} field")
    for field, kind in FIELD_TYPES.items():
        value = state.get(field)
        if field in state and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise ValueError(f"{str(path)!r} is damaged: field {field!r} is {type(value).__name__}, "
                             f"expected {kind.__name__}")
    if "step" in state and state["step"] < 0:
        raise ValueError(f"{str(path)!r} is damaged: field 'step' is {state['step']}, expected >= 0")
    for name, tensor in state.get("model", {}).items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{str(path)!r} is damaged: field 'model' tensor {name!r} is {kind}, "
                             "not a floating-point tensor")
    return state


def model_config_from(d: object, source: str) -> GPTConfig:
    """A :class:`GPTConfig` from a saved dictionary, each bad field one error naming ``source``; a model too
    large for this machine's memory is refused from its sizes, before anything is built."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: the model configuration is a {type(d).__name__}, expected a dictionary")
    try:
        config = GPTConfig.from_dict(d)
    except ConfigFieldError as error:
        raise ValueError(f"{source}: {error.problem}") from None
    except (ValueError, TypeError) as error:
        raise ValueError(f"{source}: {error}") from None
    check_model_fits(config, torch.device("cpu"), source)
    return config


def load_for_inference(path: str | os.PathLike, device: str | torch.device = "cpu", *,
                       tiktoken_file: str | os.PathLike | None = None) -> tuple[GPT, Tokenizer]:
    """The trained model (in eval mode, on ``device``) and its tokenizer from a training checkpoint."""
    path = checkpoint_path(path)
    state = load_checkpoint(path, require=INFERENCE_FIELDS)
    model = build_model(state, path)
    tokenizer = tokenizer_from_dict(state["tokenizer"], tiktoken_file=tiktoken_file)
    return model.to(device).eval(), tokenizer


def build_model(state: dict, path: Path) -> GPT:
    """The GPT of a loaded checkpoint, its weights in place; mismatches name the file and the tensors."""
    model = GPT(model_config_from(state["model_config"], f"{path}: field 'model_config'"))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        details = " ".join(str(error).split())
        raise ValueError(f"{str(path)!r} is damaged: field 'model' does not fit its model_config: "
                         f"{details[:300]}") from None
    return model


@contextlib.contextmanager
def out_dir_lock(out_dir: Path, main: bool) -> Iterator[None]:
    """Hold ``out_dir/.lock`` (an advisory lock: a second run refuses, naming the holder's pid; the
    lock dies with its process, so a killed run never blocks the next). A no-op without fcntl."""
    try:
        import fcntl
    except ImportError:  # Windows
        fcntl = None
    if not main or fcntl is None:
        yield
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise BlockingIOError(f"{str(out_dir)!r} is in use by another training run (pid {holder}): wait for "
                                  f"it to finish, stop it, or choose another {named('out_dir')}") from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
