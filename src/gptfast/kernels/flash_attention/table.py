"""Block sizes as data: one table per GPU class (named by the compute capability it was made for, chosen
by the shared memory one block may use), kept in ``src/gptfast/kernels/configs/flash_attention_sm<table>.json``
with an entry per padded head dim and element size: the schema (:class:`BlockConfig`,
:class:`AttentionConfigs`, :class:`ConfigTable`), reading and writing the files (:func:`load_table`,
:func:`write_table`), and the choice for a device or the lab's target GPU (:func:`configs_for`).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from ..common import next_power_of_2, target_gpu


@dataclass(frozen=True)
class BlockConfig:
    """Tile shape and launch parameters of one kernel: BLOCK_M query rows by BLOCK_N key rows."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 1


@dataclass(frozen=True)
class AttentionConfigs:
    """The configurations of the forward kernel (plain and masked) and the backward kernels for one input kind."""

    forward: BlockConfig
    forward_masked: BlockConfig  # the forward with dropout or key_start: their masks take registers
    backward_kv: BlockConfig  # one key block (BLOCK_N) per program, loops over query blocks (dK, dV)
    backward_q: BlockConfig  # one query block (BLOCK_M) per program, loops over key blocks (dQ)
    backward_kv_dq: BlockConfig  # the dK/dV kernel computing dQ too (and the sum of its partials)
    backward_kv_dq_masked: BlockConfig  # the same with dropout or key_start (their masks take registers), and
    # the dK/dV kernel adding dQ by atomics (beyond the workspace, deterministic=False)


@dataclass(frozen=True)
class ConfigTable:
    """One GPU class's configurations by (head_dim_pad, element_size), and how they were chosen."""

    source: str
    configs: dict[tuple[int, int], AttentionConfigs]


# Under the interpreter tiles are small and unequal, so that short test sequences cross many block
# boundaries and both the masked and the unmasked loops run.
INTERPRETER_CONFIGS = AttentionConfigs(BlockConfig(32, 16), BlockConfig(32, 16), BlockConfig(16, 32),
                                       BlockConfig(32, 16), BlockConfig(16, 32), BlockConfig(16, 32))
# The tables, with the shared memory one block may use where they apply (the opt-in maximum):
# A100-class parts (8.0, 8.7); the smaller Ampere and Ada parts (8.6, 8.9: RTX 30xx/40xx, A10, L4,
# L40S) and any other part with less shared memory; Hopper (9.0, and later parts with as much).
SHARED_MEMORY = {80: 163 * 1024, 86: 99 * 1024, 90: 227 * 1024}
ARCHES = tuple(SHARED_MEMORY)
HEAD_DIM_PADS = (16, 32, 64, 128)
ELEMENT_SIZES = (2, 4)  # float16 and bfloat16 share their entries; float32
TABLE_KEYS = tuple(itertools.product(HEAD_DIM_PADS, ELEMENT_SIZES))  # the entries every table has
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# How the shipped entries were made: each tile keeps its float32 scores and accumulators in
# registers and streams K/V (forward, dQ) or Q/dO (dK, dV) through shared memory, multi-buffered
# over num_stages. 128-row tiles feed Hopper's 64-row wgmma instructions from two warp groups, or
# from one (sm_90's 16-bit forward at head dims up to 64 without dropout or key_start: 4 warps
# issue fewer instructions per score). The 99 KiB parts share the A100's 16-bit entries (at most
# 80 KiB) and take smaller float32 tiles. The dK/dV kernel holds two float32 accumulators of
# BLOCK_N x head_dim, so its key block shrinks where
# registers run short (Ampere keeps mma operands in registers too). float32 inputs multiply in TF32
# on tensor cores (float32 accumulation) with smaller tiles, as they take twice the space. Each
# entry was compiled ahead of time (the dropout variant, at the largest head dim it serves; the
# plain causal one for ``forward``); ``tests/test_aot_flash_attention.py`` checks every entry for
# spills and shared memory.

_KERNEL_FIELDS = tuple(f.name for f in fields(AttentionConfigs))
_BLOCK_FIELDS = tuple(f.name for f in fields(BlockConfig))
_ENTRY_FIELDS = ("head_dim_pad", "element_size", *_KERNEL_FIELDS)
_ONE_LINE_OBJECT = re.compile(r"\{\n\s*([^{}\[\]]*?)\n\s*\}")  # an object holding no object or list


def table_for(major: int, minor: int, shared_memory: int | None) -> int:
    """The table (a key of SHARED_MEMORY) for a GPU of compute capability major.minor with
    ``shared_memory`` bytes per block (opt-in maximum); None: guessed from the capability."""
    if shared_memory is None:
        known = {(8, 0): 80, (8, 7): 80, (9, 0): 90}
        shared_memory = SHARED_MEMORY[known.get((major, minor), 86)]
    if major >= 9 and shared_memory >= SHARED_MEMORY[90]:
        return 90
    return 80 if shared_memory >= SHARED_MEMORY[80] else 86


def table_path(table: int) -> Path:
    """The JSON file of ``table`` (a key of SHARED_MEMORY)."""
    return CONFIG_DIR / f"flash_attention_sm{table}.json"


def _parse_block_config(value, where: str) -> BlockConfig:
    if not (isinstance(value, dict) and sorted(value) == sorted(_BLOCK_FIELDS)
            and all(type(v) is int and v > 0 for v in value.values())):
        raise ValueError(f"{where}: needs {', '.join(_BLOCK_FIELDS)} as positive integers, got {value!r}")
    return BlockConfig(**value)


def _parse_table(data, path: Path) -> ConfigTable:
    """The ConfigTable of a table's JSON value; ValueError naming the file and the field if it is not one."""
    if not (isinstance(data, dict) and isinstance(data.get("source"), str) and isinstance(data.get("configs"), list)):
        raise ValueError(f'{path}: a configuration table needs a "source" string and a "configs" list')
    configs = {}
    for i, entry in enumerate(data["configs"]):
        where = f"{path}: configs[{i}]"
        if not isinstance(entry, dict) or sorted(entry) != sorted(_ENTRY_FIELDS):
            raise ValueError(f"{where} needs exactly the fields {', '.join(_ENTRY_FIELDS)}")
        key = (entry["head_dim_pad"], entry["element_size"])
        if not all(type(k) is int for k in key) or key not in TABLE_KEYS:
            raise ValueError(f"{where}: (head_dim_pad, element_size) {key} is not one of {TABLE_KEYS}")
        if key in configs:
            raise ValueError(f"{where}: a second entry for (head_dim_pad, element_size) {key}")
        configs[key] = AttentionConfigs(*(_parse_block_config(entry[name], f"{where}.{name}")
                                          for name in _KERNEL_FIELDS))
    missing = [key for key in TABLE_KEYS if key not in configs]
    if missing:
        raise ValueError(f"{path}: no entry for (head_dim_pad, element_size) {missing}")
    return ConfigTable(data["source"], configs)


def load_table(path: str | Path) -> ConfigTable:
    """Read a table written by :func:`write_table`; a file that is not one raises ValueError naming
    the file and the field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeError, ValueError) as e:
        raise ValueError(f"{path}: cannot read a configuration table: {e}") from None
    return _parse_table(data, path)


def write_table(path: str | Path, table: ConfigTable) -> None:
    """Write ``table`` as JSON: entries by element size then head dim, fields in a fixed order, one
    line per kernel configuration. It must have an entry for every key of TABLE_KEYS; the file is
    replaced only once the new one is complete."""
    path = Path(path)
    entries = [{"head_dim_pad": head_dim_pad, "element_size": element_size, **asdict(configs)}
               for (head_dim_pad, element_size), configs in sorted(table.configs.items(), key=lambda kv: kv[0][::-1])]
    data = {"source": table.source, "configs": entries}
    _parse_table(data, path)
    text = _ONE_LINE_OBJECT.sub(lambda m: "{" + " ".join(line.strip() for line in m[1].splitlines()) + "}",
                                json.dumps(data, indent=2))
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text + "\n", encoding="utf-8")
    os.replace(partial, path)


@functools.cache
def _shipped_table(table: int) -> ConfigTable:
    return load_table(table_path(table))


def tuned_configs(table: int, head_dim_pad: int, element_size: int) -> AttentionConfigs:
    """The configurations of ``table`` (a key of SHARED_MEMORY) for a padded head dim (a key of
    HEAD_DIM_PADS) and element size in bytes (ELEMENT_SIZES), from the table's JSON file."""
    return _shipped_table(table).configs[(head_dim_pad, element_size)]


def head_dim_pad(head_dim: int) -> int:
    """The head dim the kernels compute with (a power of two, at least 16): a table key."""
    return max(16, next_power_of_2(head_dim))


@functools.cache
def _table_of_device(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return table_for(props.major, props.minor, getattr(props, "shared_memory_per_block_optin", None))


def configs_for(q: torch.Tensor) -> AttentionConfigs:
    """The configurations for q's device, or for the GPU set by ``common.targeting`` (the kernel lab)."""
    gpu = target_gpu()
    if gpu is not None:
        table = table_for(gpu.arch // 10, gpu.arch % 10, gpu.shared_memory)
    elif q.device.type != "cuda":
        return INTERPRETER_CONFIGS
    else:
        table = _table_of_device(q.device.index if q.device.index is not None else torch.cuda.current_device())
    return tuned_configs(table, head_dim_pad(q.shape[-1]), q.element_size())
