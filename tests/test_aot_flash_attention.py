"""The flash-attention configuration tables (``src/gptfast/kernels/configs/flash_attention_sm*.json``) and their
kernels compiled ahead of time for sm_80 (A100), sm_86 (RTX 30xx, A10; its table also serves sm_89:
RTX 40xx, L4, L40S) and sm_90 (H100).

Every table has an entry for each padded head dim and element size the launcher asks for, and
reads back as it was written. The launches are the launchers' own, captured and compiled by the
kernel lab (``gptfast.lab``): each configuration of the tables at the largest head dim that uses
it, in its fullest variant (causal with dropout: the most live registers; ``forward`` and
``backward_kv_dq``, which run without dropout or key_start, plain causal), at a length Triton cannot
assume 16-divisible, for each target its table serves. None may spill registers or overflow shared memory (163 KiB on
sm_80, 99 KiB on sm_86, 227 KiB on sm_90), and on sm_90 the matrix products of 16-bit inputs must
compile to Hopper's wgmma instructions, never serialised by ptxas (C7515, C7512).
"""

import dataclasses
import importlib
import json
from unittest import mock

import pytest

from gptfast import lab
from gptfast.kernels.common import KERNEL_DTYPES
from gptfast.lab import analysis, ops, sass

fa = importlib.import_module("gptfast.kernels.flash_attention")  # the module, not the public function
fa_launch = importlib.import_module("gptfast.kernels.flash_attention.launch")

DTYPES = {2: "fp16", 4: "fp32"}  # bfloat16 shares float16's configurations (checked separately)
# table: the compute capabilities it is compiled for. The 86 table also serves sm_89, left out: with
# Triton 3.6 every sm_89 build of it had the registers, spills and shared memory of its sm_86 build.
TARGETS = {80: (80,), 86: (86,), 90: (90,)}
TABLES = {table: fa.load_table(fa.table_path(table)) for table in fa.ARCHES}
SEQ = 1000  # not a multiple of 16: the masked loads the launcher's hints would otherwise spare
FIELDS = {  # table field: the kernel it configures
    "forward": "attention_fwd",
    "forward_masked": "attention_fwd",  # the forward with dropout or key_start
    "backward_kv_dq": "attention_bwd_kv",  # the dK/dV kernel writing dQ's partials too (where they fit)
    "backward_kv_dq_masked": "attention_bwd_kv",  # the same with dropout, and with atomics
    "backward_kv": "attention_bwd_kv",  # beyond the workspace's limit: dK/dV alone, then the dQ kernel
    "backward_q": "attention_bwd_q",
}
# variant: (the op's options, the table fields compiled in it, the dQ workspace's limit: None as shipped,
# 0 for the paths beyond it): each field in its fullest variant, the dK/dV kernel with dQ in each of its
# two forms (the partials; atomics, deterministic=False beyond the limit).
VARIANTS = {"plain": ({}, ("forward", "backward_kv_dq"), None),
            "dropout": ({"dropout_p": 0.1}, ("forward_masked", "backward_kv_dq_masked"), None),
            "fallback": ({"dropout_p": 0.1}, ("backward_kv", "backward_q"), 0),
            "plain atomic": ({"deterministic": False}, ("backward_kv_dq_masked",), 0),
            "atomic": ({"dropout_p": 0.1, "deterministic": False}, ("backward_kv_dq_masked",), 0)}
WORKSPACE_FIELDS = ("backward_kv_dq", "backward_kv_dq_masked")


def launches(head_dim: int, dtype: str, arch: int, options: dict, seq: int = SEQ,
             limit: int | None = None) -> dict[str, object]:
    """{kernel name: launch} of the op forward and backward, as the launchers would run it on ``arch``
    (``limit``: with that dQ workspace limit)."""
    request = lab.Request(lab.get_op("flash_attention"), (2, 2, seq, head_dim), dtype, lab.ARCHITECTURES[arch], {},
                          options)
    with mock.patch.object(fa_launch, "DQ_WORKSPACE_LIMIT", fa_launch.DQ_WORKSPACE_LIMIT if limit is None else limit):
        return {ops.kernel_name(launch.kernel): launch for _, launch in analysis.capture(request)}


def every_config_builds() -> list[tuple[str, lab.Build]]:
    """(table field, build) of each configuration at the largest head dim using it, per target; the
    dK/dV kernel writing dQ's partials (and their sum) at every head dim on its own table's target
    (ptxas spilled its sm_80 float16 tile at head dim 16, not at 128)."""
    largest = {}  # (target, element size, variant, field, config, head dim or 0) -> the largest head dim
    for table, entries in TABLES.items():
        for (head_dim, element_size), configs in entries.configs.items():
            for target in TARGETS[table]:
                for variant, (_, fields, limit) in VARIANTS.items():
                    for field in fields:
                        every = field in WORKSPACE_FIELDS and limit is None and target == table
                        key = (target, element_size, variant, field, getattr(configs, field), head_dim if every else 0)
                        largest[key] = max(largest.get(key, 0), head_dim)
    builds = []
    for (target, size, variant, field, config, _), head_dim in largest.items():
        options, _, limit = VARIANTS[variant]
        captured = launches(head_dim, DTYPES[size], target, options, limit=limit)
        meta = captured[FIELDS[field]].meta  # the variant runs the field's configuration, not another's
        assert ((meta["BLOCK_M"], meta["BLOCK_N"], meta["num_warps"], meta["num_stages"])
                == (config.block_m, config.block_n, config.num_warps, config.num_stages)), (target, variant, field)
        kernels = [FIELDS[field]] + (["attention_bwd_dq_reduce"] if field in WORKSPACE_FIELDS and limit is None else [])
        builds += [(field, lab.Build.of(captured[kernel], target)) for kernel in kernels]
    return builds


def extra_builds() -> list[tuple[str, lab.Build]]:
    """On sm_90: bfloat16 without dropout (GPT-2's training path, head dims 64 and 128, every backward
    path), the left-padding variant (key_start counts) of the masked forward and the backward
    kernels, and a padded head dim (80 -> 128)."""
    found = []
    for head_dim in (64, 128):
        for options, fields, limit in (({}, ("forward", "backward_kv_dq"), None),
                                       ({}, ("backward_kv", "backward_q"), 0),
                                       ({"deterministic": False}, ("backward_kv_dq_masked",), 0)):
            captured = launches(head_dim, "bf16", 90, options, limit=limit)
            found += [(field, captured[FIELDS[field]]) for field in fields]
    for options, fields, limit in (({"key_start": True, "dropout_p": 0.1}, ("forward_masked", "backward_kv_dq_masked"),
                                    None),
                                   ({"key_start": True, "dropout_p": 0.1}, ("backward_kv", "backward_q"), 0)):
        captured = launches(128, "fp16", 90, options, limit=limit)
        found += [(field, captured[FIELDS[field]]) for field in fields]
    found.append(("forward", launches(80, "fp16", 90, {})["attention_fwd"]))
    return [(field, lab.Build.of(launch, 90)) for field, launch in found]


@pytest.fixture(scope="module")
def compiled() -> list[tuple[str, lab.Compiled]]:
    """(table field, what the compiler made of it) for every build of this file."""
    pytest.importorskip("triton.backends.nvidia", reason="needs Triton's NVIDIA backend (ptxas)")
    fields, builds = zip(*(every_config_builds() + extra_builds()))
    return list(zip(fields, lab.compile_builds(list(builds))))


# ---- the tables as data ----


def test_every_table_has_every_entry_the_launcher_asks_for():
    asked = {(fa.head_dim_pad(head_dim), dtype.itemsize)
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

def _config(c: lab.Compiled) -> tuple[int, int, int, int]:
    return (c.constants["BLOCK_M"], c.constants["BLOCK_N"], c.options["num_warps"], c.options["num_stages"])


def test_every_config_is_compiled(compiled):
    """Each table's every (field, configuration) on each target it serves, in both element sizes."""
    done = {(c.build.arch, field, _config(c), c.signature["Q"] == "*fp32") for field, c in compiled
            if "Q" in c.signature}
    # and the sum of dQ's partials (no Q argument) with the workspace's configurations, on every target
    assert {c.build.arch for _, c in compiled if "Q" not in c.signature} == {t for ts in TARGETS.values() for t in ts}
    for table, entries in TABLES.items():
        for (_, element_size), configs in entries.configs.items():
            for target, field in ((t, f) for t in TARGETS[table] for f in FIELDS):
                config = getattr(configs, field)
                key = (target, field, (config.block_m, config.block_n, config.num_warps, config.num_stages),
                       element_size == 4)
                assert key in done, key


def test_each_table_is_checked_against_its_shared_memory():
    assert set(TARGETS) == set(fa.ARCHES)
    assert {(table, lab.ARCHITECTURES[target].shared_per_block) for table in fa.ARCHES for target in TARGETS[table]} \
        == set(fa.SHARED_MEMORY.items())


def test_no_spills_and_shared_memory_fits(compiled):
    assert [str(c) for _, c in compiled if c.spill_bytes] == []
    assert [str(c) for _, c in compiled if c.shared > lab.ARCHITECTURES[c.build.arch].shared_per_block] == []


def test_hopper_uses_wgmma_never_serialised(compiled):
    sixteen_bit = [c for _, c in compiled if c.build.arch == 90 and c.signature.get("Q") in ("*fp16", "*bf16")]
    assert len(sixteen_bit) >= 3 * len(FIELDS)
    assert [str(c) for c in sixteen_bit if "wgmma.mma_async" not in c.asm["ptx"]] == []
    # Every product, dQ's too, from head dim 64 (a wgmma is 64 rows: dQ^T's are the head dim's).
    assert [str(c) for c in sixteen_bit if c.constants["HEAD_DIM_PAD"] >= 64 and "mma.sync" in c.asm["ptx"]] == []
    assert [(str(c), sass.serialized_mma(c.ptxas_log)) for _, c in compiled if sass.serialized_mma(c.ptxas_log)] == []


def test_the_lengths_are_compiled_unhinted(compiled):
    """SEQ reaches the kernels as a plain integer: neither the constant 1 nor hinted 16-divisible."""
    for _, c in compiled:
        assert c.signature["q_len"] == "i32" and "q_len" not in c.hinted and "q_len" not in c.constants, str(c)
