"""Sharded checkpoints (``--parallel fsdp``), written and read with ``torch.distributed.checkpoint`` (DCP).

Layout: ``out_dir/ckpt`` is a symbolic link to the folder of the latest complete save,
``out_dir/ckpt.step-N``. That folder holds DCP's files, one ``__R_0.distcp`` per process with its
shards of the model and optimizer state plus ``.metadata`` (where each shard lies), and
``train_state.pt``: the plain values of today's single-file checkpoint (step, configurations,
tokenizer, the data stream's position and generator). Dropout's random numbers are re-seeded at
every step from (seed, step, rank), so no process has other random state to keep.

A save writes ``ckpt.step-N.tmp``, renames it to ``ckpt.step-N`` once every process has written and
flushed its files, then makes it visible by one atomic rename of a new link over ``ckpt``; the
previous folder is deleted only after. A kill at any moment leaves ``ckpt`` naming a complete save;
leftovers of an interrupted one are deleted by the next. Every process writes its own file into the
same folder: on several nodes ``out_dir`` must be on a file system they share.

The tensors load into any model of the same configuration whatever its sharding
(:func:`load_sharded`): FSDP at another world size, or a whole model (DDP, one process, ``gptfast
export``). DCP's ``.metadata`` is a pickle: load sharded checkpoints you trust (your own runs).
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from .checkpoint import FIELD_TYPES, TRAINING_FIELDS, model_config_from, torch_load
from .distributed import World
from .durable import fsync_folder, no_space, replace_atomically, write_failure
from .model import GPT
from .optim import make_optimizer
from .outputs import SHARDED_CHECKPOINT_DIR as SHARDED_DIR
from .outputs import SHARDED_MARKER

STATE_FILE = "train_state.pt"  # the plain values, beside DCP's files
SHARDED_FORMAT = "gptfast-sharded-checkpoint-1"
TENSOR_FIELDS = ("model", "optimizer")  # what DCP holds; train_state.pt holds the rest


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a sharded checkpoint folder (or a training run's out_dir holding one)."""
    path = Path(path).expanduser()
    return (path / SHARDED_MARKER).is_file() or (path / SHARDED_DIR / SHARDED_MARKER).is_file()


def sharded_folder(path: str | os.PathLike) -> Path:
    """``path`` itself, or ``path/ckpt`` when ``path`` is a training run's out_dir."""
    path = Path(path).expanduser()
    return path / SHARDED_DIR if (path / SHARDED_DIR / SHARDED_MARKER).is_file() else path


def tensors_of(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The model's and optimizer's state keyed by parameter name, as DCP saves and loads it: each
    process's shards under FSDP, whole tensors otherwise."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def save_sharded(out_dir: Path, step: int, tensors: dict, plain: dict, world: World, device: torch.device) -> Path:
    """Write a sharded checkpoint of ``step`` (every process calls it, its collectives on ``device``) and
    make it ``out_dir/ckpt``; a failed write keeps the previous one."""
    final = out_dir / f"{SHARDED_DIR}.step-{step}"
    tmp = final.with_name(final.name + ".tmp")
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    world.barrier()
    if world.any(not tmp.is_dir(), device):
        raise OSError(f"rank {world.rank}: {tmp} is not there: on several nodes --out-dir must be on a file system "
                      "every node shares")
    needed = _local_bytes(tensors) + (1 << 20)
    if world.any(shutil.disk_usage(tmp).free < needed, device):
        raise no_space(tmp, needed)
    try:
        dcp.save(tensors, checkpoint_id=tmp, process_group=world.group)  # each process's file flushed to the disk
    except dcp.CheckpointException as error:  # DCP's gathers every process's failure (a BaseException)
        raise write_failure(tmp, needed, OSError(" ".join(str(error).split())[-300:])) from None
    if world.main:
        replace_atomically(tmp / STATE_FILE, 1 << 20, lambda f: torch.save({"format": SHARDED_FORMAT, **plain}, f))
        _make_current(out_dir, tmp, final)
    world.barrier()
    return out_dir / SHARDED_DIR


def _local_bytes(tree: object) -> int:
    """The bytes of this process's part of the tensors in a state dict (its shards under FSDP)."""
    if isinstance(tree, torch.Tensor):
        part = tree.to_local() if isinstance(tree, DTensor) else tree
        return part.numel() * part.element_size()
    values = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else ()
    return sum(_local_bytes(value) for value in values)


def _make_current(out_dir: Path, tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` to ``final``, point ``out_dir/ckpt`` at it by one atomic rename of a new
    link, then delete the previous save and any leftover of an interrupted one."""
    link = out_dir / SHARDED_DIR
    if final.exists() and not (link.is_symlink() and os.readlink(link) == final.name):
        shutil.rmtree(final)  # an unlinked leftover of another run of this out_dir
    os.replace(tmp, final)
    fsync_folder(out_dir)
    new_link = out_dir / f"{SHARDED_DIR}.link.tmp"
    new_link.unlink(missing_ok=True)
    os.symlink(final.name, new_link)
    os.replace(new_link, link)  # the one step that makes the new checkpoint the one to load
    fsync_folder(out_dir)
    for old in out_dir.glob(f"{SHARDED_DIR}.step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def remove_sharded(out_dir: Path) -> None:
    """Delete ``out_dir``'s sharded checkpoint: its link first (so no half-deleted one is ever loaded), then
    its folders."""
    link = out_dir / SHARDED_DIR
    if link.is_symlink():
        link.unlink()
    for folder in out_dir.glob(f"{SHARDED_DIR}.step-*"):
        shutil.rmtree(folder, ignore_errors=True)


def read_sharded_state(path: str | os.PathLike, require: tuple[str, ...] = ()) -> dict:
    """The plain values of the sharded checkpoint at ``path`` (a folder, or an out_dir holding ``ckpt``),
    checked: the format, the fields in ``require`` and their types, and that every shard file is there."""
    folder = sharded_folder(path)
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        raise ValueError(f"{str(folder)!r} is not a complete sharded checkpoint: it has no {STATE_FILE}")
    state = torch_load(state_file, what="sharded checkpoint's state")
    if not isinstance(state, dict) or state.get("format") != SHARDED_FORMAT:
        raise ValueError(f"{str(state_file)!r} is not a gptfast sharded checkpoint's state "
                         f"(expected format {SHARDED_FORMAT!r})")
    for field in require:
        if field not in state and field not in TENSOR_FIELDS:
            raise ValueError(f"{str(state_file)!r} is damaged: it has no {field!r} field")
    for field, kind in FIELD_TYPES.items():
        if field in state and not isinstance(state[field], kind):
            raise ValueError(f"{str(state_file)!r} is damaged: field {field!r} is {type(state[field]).__name__}, "
                             f"expected {kind.__name__}")
    _check_shard_files(folder)
    return state


def _check_shard_files(folder: Path) -> None:
    """Every file ``.metadata`` names is there and long enough: a missing or cut shard is one line."""
    try:
        metadata = dcp.FileSystemReader(folder).read_metadata()
    except Exception as error:
        raise ValueError(f"{str(folder)!r} is damaged: its .metadata cannot be read "
                         f"({type(error).__name__}: {str(error)[:200]})") from None
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        shard = folder / name
        if not shard.is_file():
            raise ValueError(f"{str(folder)!r} is damaged: shard file {name} is missing")
        if shard.stat().st_size < end:
            raise ValueError(f"{str(folder)!r} is damaged: shard file {name} is cut short "
                             f"({shard.stat().st_size:,} of {end:,} bytes)")


def consolidate(path: str | os.PathLike) -> dict:
    """The sharded checkpoint at ``path`` as one single-file checkpoint's state (:mod:`gptfast.checkpoint`'s,
    which generate, eval and a DDP ``--resume`` read), its tensors gathered whole in this process's memory."""
    folder = sharded_folder(path)
    if not is_sharded_checkpoint(folder):
        what = ("a single-file checkpoint, which generate and eval take as it is (export makes it a Hugging Face "
                "folder: --out a folder name, not a .pt file)") if folder.is_file() else \
            "not a sharded checkpoint (a folder written by train --parallel fsdp, or its out_dir)"
        raise ValueError(f"{str(folder)!r} is {what}")
    state = read_sharded_state(folder, require=TRAINING_FIELDS)
    model = GPT(model_config_from(state["model_config"], f"{folder / STATE_FILE}: field 'model_config'"))
    optimizer = make_optimizer(model, lr=0.0)
    load_sharded(folder, model, optimizer)
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **state}


def load_sharded(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 world: World | None = None) -> None:
    """Load the sharded checkpoint at ``path`` into ``model`` (and ``optimizer``): sharded or whole, at
    any world size (every process calls it); a tensor that does not fit is one error naming the folder."""
    folder = sharded_folder(path)
    tensors = tensors_of(model, optimizer) if optimizer is not None else {"model": get_model_state_dict(model)}
    try:
        with warnings.catch_warnings():  # one process, no process group: DCP's warning says so, as intended
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(tensors, checkpoint_id=folder, process_group=world.group if world is not None else None,
                     no_dist=not torch.distributed.is_initialized())
    except (Exception, dcp.CheckpointException) as error:  # DCP's gathers each process's failure (a BaseException)
        details = " ".join(str(error).split())[-300:]
        raise ValueError(f"{str(folder)!r} does not fit this model (another size or a damaged checkpoint): "
                         f"{details}") from None
    if optimizer is None:
        set_model_state_dict(model, tensors["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=tensors["model"], optim_state_dict=tensors["optimizer"])
