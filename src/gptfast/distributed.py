"""The training processes: where this one stands among them, its device, and the collectives training needs.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the processes join one process group, NCCL on GPUs, gloo on
CPUs; a plain ``python`` run is a world of one, where every collective is the identity. Training's
collectives (DDP's gradient averages, the loss, the stop flag) run in a group with a timeout of
``timeout_s`` (default :data:`DEFAULT_TIMEOUT_S`), so a stopped or dead peer ends the run with one
clear error (:class:`PeerFailure`) instead of a long hang; the wait while rank 0 prepares text has
the default group's longer timeout.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    """This process's place among the training processes."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    group: object = None  # the process group of training's collectives (None: the default group)

    @property
    def main(self) -> bool:
        """The process that prepares data, writes the checkpoint and the log, and prints."""
        return self.rank == 0

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` averaged over the processes."""
        if self.size > 1:
            value = value.clone()
            dist.all_reduce(value, group=self.group)
            value /= self.size
        return value

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every process when ``flag`` is true on any of them."""
        if self.size == 1:
            return flag
        t = torch.tensor(float(flag), device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


DEFAULT_TIMEOUT_S = 300.0  # a collective of training that takes longer than this means a peer is gone
PREPARE_TIMEOUT_S = 3600.0  # the other ranks' wait while rank 0 prepares text


class PeerFailure(ConnectionError):
    """A collective failed: another training process stopped, died or did not answer in time."""


def resolve_device(device: str, local_rank: int = 0, option: str = "device") -> torch.device:
    """The device ``device`` names ("auto": the process's GPU if there is one, else cpu), checked to run
    a model: an unknown name, ``meta`` (shapes without data), a CUDA device without a usable GPU (a
    CPU-only build of torch, no GPU visible) or another kind this torch cannot place tensors on is one
    clear error naming the option as ``option`` spells it ("--device" in the CLI)."""
    if device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    given, cpu = f"{option} {device!r}", f"{option} cpu"
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ValueError(f"{given}: unknown device: use cpu, cuda or cuda:N") from None
    if chosen.type == "meta":
        raise ValueError(f"{given} cannot run a model: meta tensors hold shapes without data; use cpu or cuda")
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            if torch.version.cuda is None:
                raise ValueError(f"{given}: this torch has no CUDA (CPU build {torch.__version__}); install a "
                                 f"CUDA build of torch, or use {cpu}")
            raise ValueError(f"{given}: no CUDA GPU is visible to torch {torch.__version__} "
                             f"(check the driver and CUDA_VISIBLE_DEVICES), or use {cpu}")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise ValueError(f"{given}: this machine has {torch.cuda.device_count()} GPU(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif chosen.type != "cpu":
        try:
            torch.empty(0, device=chosen)
        except Exception as error:  # each kind fails its own way: NotImplementedError, AssertionError, ...
            reason = (str(error).strip() or type(error).__name__).split(". ")[0].splitlines()[0][:150]
            raise ValueError(f"{given}: this torch ({torch.__version__}) cannot place tensors on {chosen.type} "
                             f"({reason}); use cpu or cuda") from None
    return chosen


def init_distributed(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S,
                     device_option: str = "device", group_of_one: bool = False) -> tuple[World, torch.device]:
    """This process's :class:`World` (from torchrun's environment) and device, joining the process group.

    ``device`` "auto" is the process's GPU under torchrun, else cuda if present, else cpu; errors name
    it as ``device_option`` spells it. ``group_of_one``: a world of one gets a process group too (of
    itself alone, in memory), as FSDP's sharding needs one.
    """
    if timeout_s <= 0:
        raise ValueError(f"the collective timeout must be positive, got {timeout_s} s")
    size = int(os.environ.get("WORLD_SIZE", "1"))
    world = World(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), size)
    chosen = resolve_device(device, world.local_rank, device_option)
    if chosen.type == "cuda":
        if chosen.index is None:  # plain "cuda": the current GPU, named by index for set_device and DDP
            chosen = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(chosen)
    if (size > 1 or group_of_one) and not dist.is_initialized():
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        alone = {"store": dist.HashStore(), "rank": 0, "world_size": 1} if size == 1 else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=max(timeout_s, PREPARE_TIMEOUT_S)),
                                **alone)
        world.group = dist.new_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return world, chosen


def _is_collective_failure(error: BaseException) -> bool:
    markers = ("timed out", "connection closed", "connection reset", "broken pipe", "nccl", "gloo")
    return isinstance(error, getattr(dist, "DistError", ())) or any(m in str(error).lower() for m in markers)


@contextlib.contextmanager
def peers_watched(world: World, timeout_s: float) -> Iterator[None]:
    """Turn a failed collective (a peer stopped, died or timed out) into one clear :class:`PeerFailure`."""
    try:
        yield
    except RuntimeError as error:
        if world.size == 1 or not _is_collective_failure(error):
            raise
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise PeerFailure(f"rank {world.rank}: lost contact with the other training processes ({first}): one "
                          f"stopped, died or did not answer within the {timeout_s:g} s collective timeout; "
                          "see its output") from None


@contextlib.contextmanager
def distributed(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S, device_option: str = "device",
                group_of_one: bool = False) -> Iterator[tuple[World, torch.device]]:
    """:func:`init_distributed` for a ``with`` block, leaving the process group when it ends."""
    world, chosen = init_distributed(device, timeout_s, device_option, group_of_one)
    try:
        with peers_watched(world, timeout_s):
            yield world, chosen
    finally:
        if (world.size > 1 or world.group is not None) and dist.is_initialized():
            with contextlib.suppress(RuntimeError):  # after a lost peer, leaving the group can fail too
                dist.destroy_process_group()
