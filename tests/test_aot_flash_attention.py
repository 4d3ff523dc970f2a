"""The flash-attention configuration tables (``kernels/configs/flash_attention_sm*.json``) and their
kernels compiled ahead of time for sm_80 (A100), sm_86 (RTX 30xx, A10; its table also serves sm_89:
RTX 40xx, L4, L40S) and sm_90 (H100).

Every table has an entry for each padded head dim and element size the launcher asks for, and
reads back as it was written. Every configuration of the tables is compiled at the largest head dim
that uses it, in its fullest variant (causal with dropout: the most live registers; ``forward``,
the forward without dropout or key_start, plain causal), for each target its table serves, and
must not spill registers and must fit in shared memory (163 KiB on sm_80, 99 KiB on sm_86, 227 KiB
on sm_90). On sm_90 the matrix products of 16-bit inputs
must compile to Hopper's wgmma instructions. Compilation runs in subprocesses without
``TRITON_INTERPRET`` (see ``aot.py``), split over the CPU cores.
"""

import dataclasses
import importlib
import itertools
import json
import os
from concurrent.futures import ThreadPoolExecutor

import aot
import pytest

from gptfast.kernels.common import KERNEL_DTYPES

fa = importlib.import_module("gptfast.kernels.flash_attention")  # the module, not the public function

KERNELS = {  # configuration field: kernel
    "forward": "_attention_fwd_kernel",
    "forward_masked": "_attention_fwd_kernel",  # the forward with dropout or key_start
    "backward_kv": "_attention_bwd_kv_kernel",
    "backward_q": "_attention_bwd_q_kernel",
    "backward_kv_atomic": "_attention_bwd_kv_kernel",  # deterministic=False: dQ added up by atomics
}
DTYPES = {2: "fp16", 4: "fp32"}  # bfloat16 shares float16's configurations (checked separately)
# table: the compute capabilities it is compiled for. The 86 table also serves sm_89, left out: with
# Triton 3.6 every sm_89 build of it had the registers, spills and shared memory of its sm_86 build.
TARGETS = {80: (80,), 86: (86,), 90: (90,)}
TABLES = {table: fa.load_table(fa.table_path(table)) for table in fa.ARCHES}


def build(kernel: str, dtype: str, head_dim: int, config, arch: int, dropout: bool = True,
          padded: bool = False, atomic_dq: bool = False) -> aot.Build:
    """The aot.Build of ``kernel`` as the launcher specialises it for the model's strided q/k/v:
    unit head-dim strides, 16-divisible pointers and row strides, causal; with int64 key_start
    counts if ``padded``, else KEY_START is a constexpr None; the dK/dV kernel adding dQ up by
    atomics (deterministic=False) if ``atomic_dq``, else DQ_SUM is a constexpr None."""
    signature, constexprs, aligned = {}, {}, []
    for arg in getattr(fa, kernel).arg_names:
        if arg in ("KEY_START", "DQ_SUM"):
            present = padded if arg == "KEY_START" else atomic_dq
            signature[arg] = ("*i64" if arg == "KEY_START" else "*fp32") if present else "constexpr"
            if not present:
                constexprs[arg] = None
        elif arg in ("LSE", "DELTA"):
            signature[arg], aligned = "*fp32", aligned + [arg]
        elif arg in ("Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV"):
            signature[arg], aligned = f"*{dtype}", aligned + [arg]
        elif arg.startswith("stride_") and arg.endswith("d"):  # 1: Triton specialises it
            signature[arg], constexprs[arg] = "constexpr", 1
        elif arg.startswith("stride_"):
            signature[arg], aligned = "i32", aligned + [arg]
        elif arg in ("scale", "dropout_p"):
            signature[arg] = "fp32"
        elif arg.isupper():
            signature[arg] = "constexpr"
        else:
            signature[arg] = "i32"
    constexprs.update(HEAD_DIM=head_dim, HEAD_DIM_PAD=fa._head_dim_pad(head_dim), BLOCK_M=config.block_m,
                      BLOCK_N=config.block_n, CAUSAL=True, DROPOUT=dropout)
    return aot.Build(fa.__name__, kernel, signature, constexprs, tuple(aligned), config.num_warps,
                     config.num_stages, arch)


def every_config_builds() -> list[aot.Build]:
    """Each configuration at the largest head dim using it; the atomic dK/dV kernel's at every head
    dim on one target per table (ptxas spilled its sm_80 float16 tile at head dim 16, not at 128)."""
    largest = {}  # (target, element size, field, config) -> the largest head dim using it
    for table, entries in TABLES.items():
        for (head_dim, element_size), configs in entries.configs.items():
            for field, target in itertools.product(KERNELS, TARGETS[table]):
                every = field == "backward_kv_atomic" and target == table
                key = (target, element_size, field, getattr(configs, field), head_dim if every else 0)
                largest[key] = max(largest.get(key, 0), head_dim)
    return [build(KERNELS[field], DTYPES[size], head_dim, config, target, dropout=field != "forward",
                  atomic_dq=field == "backward_kv_atomic")
            for (target, size, field, config, _), head_dim in largest.items()]


def extra_builds() -> list[aot.Build]:
    """On sm_90: bfloat16 without dropout (GPT-2's training path, head dims 64 and 128), a padded head
    dim (80 -> 128), and the left-padding variant (key_start counts) of the masked forward and the
    backward kernels."""
    bf16 = [build(kernel, "bf16", head_dim, getattr(TABLES[90].configs[(head_dim, 2)], field), 90, dropout=False,
                  atomic_dq=field == "backward_kv_atomic")
            for field, kernel in KERNELS.items() if field != "forward_masked" for head_dim in (64, 128)]
    configs = TABLES[90].configs[(128, 2)]
    key_start = [build(kernel, "fp16", 128, getattr(configs, field), 90, padded=True,
                       atomic_dq=field == "backward_kv_atomic") for field, kernel in KERNELS.items()
                 if field != "forward"]
    return bf16 + key_start + [build("_attention_fwd_kernel", "fp16", 80, configs.forward, 90, dropout=False)]


def compile_all(builds: list[aot.Build]) -> list[aot.KernelStats]:
    """Compile in one subprocess per CPU core (each compiles a share of the builds)."""
    workers = max(1, min(len(builds), os.cpu_count() or 1))
    shares = [builds[i::workers] for i in range(workers)]
    with ThreadPoolExecutor(workers) as pool:
        return [stats for share in pool.map(aot.compile_kernels, shares) for stats in share]


@pytest.fixture(scope="module")
def compiled() -> list[aot.KernelStats]:
    pytest.importorskip("triton.backends.nvidia", reason="needs Triton's NVIDIA backend (ptxas)")
    return compile_all(every_config_builds() + extra_builds())


# ---- the tables as data ----


def test_every_table_has_every_entry_the_launcher_asks_for():
    asked = {(fa._head_dim_pad(head_dim), dtype.itemsize)
             for head_dim in range(2, fa.MAX_HEAD_DIM + 1, 2) for dtype in KERNEL_DTYPES}
    assert asked == set(fa.TABLE_KEYS)
    assert {table: set(entries.configs) for table, entries in TABLES.items()} == {t: asked for t in fa.ARCHES}
    assert all(fa.tuned_configs(table, *key) == TABLES[table].configs[key] for table in fa.ARCHES for key in asked)


def test_tables_are_written_as_stored(tmp_path):
    """write_table reproduces each shipped file byte for byte (stable order and layout), and what it
    writes reads back equal."""
    for table, entries in TABLES.items():
        copy = tmp_path / f"{table}.json"
        fa.write_table(copy, entries)
        assert copy.read_text() == fa.table_path(table).read_text()
        assert fa.load_table(copy) == entries and entries.source


def _write_json(path, data):
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("edit, words", [
    (lambda d: d.pop("source"), '"source" string'),
    (lambda d: d["configs"][3]["forward"].pop("num_warps"), "configs[3].forward: needs block_m, block_n, num_warps"),
    (lambda d: d["configs"][0]["backward_q"].update(block_m="128"), "configs[0].backward_q: needs"),
    (lambda d: d["configs"][1].update(head_dim_pad=256), "configs[1]: (head_dim_pad, element_size) (256, 2)"),
    (lambda d: d["configs"].append(d["configs"][0]), "configs[8]: a second entry for"),
    (lambda d: d["configs"].pop(), "no entry for (head_dim_pad, element_size) [(128, 4)]"),
])
def test_a_bad_table_names_the_file_and_the_field(tmp_path, edit, words):
    data = json.loads(fa.table_path(90).read_text())
    edit(data)
    path = _write_json(tmp_path / "bad.json", data)
    with pytest.raises(ValueError) as error:
        fa.load_table(path)
    assert str(path) in str(error.value) and words in str(error.value)


def test_a_table_that_is_not_json_or_missing_names_the_file(tmp_path):
    (tmp_path / "broken.json").write_text('{"source": ')
    for path in (tmp_path / "broken.json", tmp_path / "absent.json"):
        with pytest.raises(ValueError, match="cannot read a configuration table"):
            fa.load_table(path)


def test_write_table_refuses_an_incomplete_table_and_keeps_the_file(tmp_path):
    path = tmp_path / "table.json"
    fa.write_table(path, TABLES[80])
    before = path.read_text()
    incomplete = dataclasses.replace(TABLES[80], configs=dict(list(TABLES[80].configs.items())[1:]))
    with pytest.raises(ValueError, match="no entry for"):
        fa.write_table(path, incomplete)
    assert path.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["table.json"]


# ---- the compiled kernels ----


def test_every_config_is_compiled(compiled):
    kernels_per_target = {(s.build.arch, s.build.kernel) for s in compiled}
    assert kernels_per_target == {(target, kernel) for table in fa.ARCHES for target in TARGETS[table]
                                  for kernel in KERNELS.values()}


def test_each_table_is_checked_against_its_shared_memory():
    assert set(TARGETS) == set(fa.ARCHES)
    assert {(table, aot.SHARED_MEMORY_LIMIT[target]) for table in fa.ARCHES for target in TARGETS[table]} \
        == set(fa.SHARED_MEMORY.items())


def test_no_spills_and_shared_memory_fits(compiled):
    assert [str(s) for s in compiled if s.spill_bytes] == []
    assert [str(s) for s in compiled if s.shared > s.shared_limit] == []


def test_hopper_uses_wgmma(compiled):
    sixteen_bit = [s for s in compiled if s.build.arch == 90 and s.build.signature["Q"] in ("*fp16", "*bf16")]
    assert len(sixteen_bit) >= 3 * len(KERNELS)
    assert [str(s) for s in sixteen_bit if "wgmma.mma_async" not in s.ptx] == []
