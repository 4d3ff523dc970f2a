"""The training processes: where this one stands among them, its device, and the collectives training needs.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the processes join one process group, NCCL on GPUs, gloo on
CPUs; a plain ``python`` run is a world of one, where every collective is the identity.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist


@dataclass
class World:
    """This process's place among the training processes."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """The process that prepares data, writes the checkpoint and the log, and prints."""
        return self.rank == 0

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` averaged over the processes."""
        if self.size > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.size
        return value

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every process when ``flag`` is true on any of them."""
        if self.size == 1:
            return flag
        t = torch.tensor(float(flag), device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def init_distributed(device: str = "auto") -> tuple[World, torch.device]:
    """This process's :class:`World` (from torchrun's environment) and device, joining the process group.

    ``device`` "auto" is the process's GPU under torchrun, else cuda if present, else cpu.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    world = World(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), size)
    if device == "auto":
        chosen = torch.device(f"cuda:{world.local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        chosen = torch.device(device)
    if chosen.type == "cuda":
        if chosen.index is None:  # plain "cuda": the current GPU, named by index for set_device and DDP
            chosen = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(chosen)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return world, chosen


@contextlib.contextmanager
def distributed(device: str = "auto") -> Iterator[tuple[World, torch.device]]:
    """:func:`init_distributed` for a ``with`` block, leaving the process group when it ends."""
    world, chosen = init_distributed(device)
    try:
        yield world, chosen
    finally:
        if world.size > 1 and dist.is_initialized():
            dist.destroy_process_group()
