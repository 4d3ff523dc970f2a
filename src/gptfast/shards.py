"""llm.c's (and modded-nanogpt's) token shards, read in place and written.

A shard is a header of 256 little-endian int32 (magic 20240520, version 1, the token count; the
rest zero), then that many uint16 GPT-2 token ids. A folder of them is a corpus: the shards whose
name holds ``_val_`` are the validation split, the others the training split, each in name order.
:func:`open_shards` maps them into memory (:class:`ShardedTokens`, one sequence over several
files) after checking every header against its file's size; :func:`write_shards` cuts a token
file into shards of the same layout.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MAGIC = 20240520
VERSION = 1  # GPT-2 tokens as uint16 (llm.c's version 2 holds LLaMA-3's uint32 tokens)
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
VAL_MARK = "_val_"
MAX_SHARD_TOKENS = 2**31 - 1  # the header's int32 count
WRITE_TOKENS = 1 << 24  # a shard is written this many tokens at a time (bounded memory)


def is_shard(path: Path) -> bool:
    """Whether ``path`` is a ``.bin`` file that begins with llm.c's magic number."""
    if path.suffix != ".bin" or not path.is_file():
        return False
    with open(path, "rb") as f:
        return np.frombuffer(f.read(4).ljust(4, b"\0"), dtype="<i4")[0] == MAGIC


def shard_files(folder: Path) -> list[Path]:
    """The llm.c shards in ``folder`` (not below it), sorted by name."""
    return sorted(p for p in folder.glob("*.bin") if is_shard(p)) if folder.is_dir() else []


def read_shard(path: Path) -> np.memmap:
    """A shard's tokens, memory-mapped; a header that does not fit the file is one error naming the
    file, the byte offset and the problem."""
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: truncated at byte offset {size}: an llm.c shard's header alone is "
                         f"{HEADER_BYTES} bytes")
    magic, version, count = np.fromfile(path, dtype="<i4", count=3)
    if magic != MAGIC:
        raise ValueError(f"{path}: byte offset 0: magic number {magic}, expected {MAGIC} (not an llm.c shard)")
    if version != VERSION:
        raise ValueError(f"{path}: byte offset 4: version {version}; only version {VERSION} (GPT-2 uint16 "
                         "tokens) is read")
    expected = HEADER_BYTES + 2 * int(count)
    if count < 0 or size != expected:
        problem = "truncated" if size < expected else "longer than its header says"
        raise ValueError(f"{path}: {problem}: the header (byte offset 8) counts {count:,} tokens, {expected:,} "
                         f"bytes in all, but the file ends at byte offset {size:,}")
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(int(count),))


class ShardedTokens:
    """Several shards' tokens as one sequence: ``len`` and slices ``[a:b]`` (copied out of the maps)."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)
        self.parts = [read_shard(p) for p in self.paths]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.dtype = np.dtype(np.uint16)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("ShardedTokens takes slices [start:stop] only")
        start, stop, _ = index.indices(len(self))
        if start >= stop:
            return np.empty(0, dtype=self.dtype)
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            offset = start - self.starts[first]
            take = min(stop - start, len(self.parts[first]) - offset)
            pieces.append(self.parts[first][offset: offset + take])
            start += take
            first += 1
        return np.concatenate(pieces) if len(pieces) > 1 else np.asarray(pieces[0])

    def locate(self, position: int) -> tuple[Path, int]:
        """The shard holding token ``position`` and the token's byte offset in that file."""
        shard = int(np.searchsorted(self.starts, position, side="right")) - 1
        return self.paths[shard], HEADER_BYTES + 2 * (position - int(self.starts[shard]))


def split_shards(folder: Path) -> tuple[list[Path], list[Path]]:
    """(training shards, validation shards) of an llm.c folder; a split with none is an error. Every
    ``.bin`` file there is taken (one with a wrong magic number is refused by :func:`read_shard`, not
    left out: a damaged shard never silently shrinks the corpus)."""
    shards = sorted(p for p in folder.glob("*.bin") if p.is_file())
    val = [p for p in shards if VAL_MARK in p.name]
    train = [p for p in shards if VAL_MARK not in p.name]
    if not val or not train:
        missing = "validation (*_val_*.bin)" if not val else "training (.bin without _val_)"
        raise ValueError(f"{folder}: llm.c shards but no {missing} shard: both splits are needed")
    return train, val


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """One shard: the header, then ``tokens`` as uint16, flushed to the disk."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        for start in range(0, len(tokens), WRITE_TOKENS):
            f.write(np.asarray(tokens[start: start + WRITE_TOKENS], dtype="<u2").tobytes())
        f.flush()
        os.fsync(f.fileno())


def write_shards(tokens: np.ndarray, num_val: int, folder: Path, shard_tokens: int, prefix: str = "data") -> list[str]:
    """The last ``num_val`` of ``tokens`` as ``PREFIX_val_NNNNNN.bin`` shards, then the rest as
    ``PREFIX_train_NNNNNN.bin``, ``shard_tokens`` each (the last of a split fewer), numbered on
    across both as llm.c numbers them; returns their names."""
    split = len(tokens) - num_val
    names = []
    for kind, part in (("val", tokens[split:]), ("train", tokens[:split])):
        for start in range(0, len(part), shard_tokens):
            name = f"{prefix}_{kind}_{len(names):06d}.bin"
            write_shard(folder / name, part[start: start + shard_tokens])
            names.append(name)
    return names
