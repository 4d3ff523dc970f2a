"""The cross-entropy kernels compiled ahead of time for sm_80 (A100) and sm_90 (H100).

Every chunk size the launchers may pick must compile without register spills and within the
target's shared memory. GPT-2's 16-bit logits (rows of 50,304 padded columns holding 50,257
classes) must be read with 128-bit loads and their gradient written with 128-bit stores: whole
chunks are accessed unmasked for that, since the class count is odd. The launches are the
launchers' own, captured and compiled by the kernel lab (``gptfast.lab``).
"""

import dataclasses
import importlib

import pytest

from gptfast import lab
from gptfast.kernels.registry import SPECS
from gptfast.lab import sass

CONFIGS = SPECS["cross_entropy"].every_config()  # kernel -> every configuration it may launch with
ONE_PASS = SPECS["linear_cross_entropy"].every_config()["cross_entropy_one_pass"]  # the fused head's kernel
RESIDENT_COLUMNS = importlib.import_module("gptfast.kernels.cross_entropy").ONE_PASS_RESIDENT_COLUMNS
pytest.importorskip("triton.backends.nvidia", reason="needs Triton's NVIDIA backend (ptxas)")

ARCHS = (80, 90)
KERNELS = ("cross_entropy_fwd", "cross_entropy_bwd")
GPT2 = (16384, 50304, 50257)  # rows, padded columns, classes


def request(shape: tuple, dtype: str, arch: int, aligned: bool) -> lab.Request:
    """The op at ``shape``; not ``aligned``: an odd row stride, so Triton cannot assume aligned rows
    (the class count never is: 50,257)."""
    options = {} if aligned else {"row_stride": shape[1] + 1}
    return lab.Request(lab.get_op("cross_entropy"), shape, dtype,
                       lab.ARCHITECTURES[arch], {}, options)


def fused_request(shape: tuple, dtype: str, arch: int) -> lab.Request:
    """The fused head (linear_cross_entropy) at ``shape``: its launches with gradients wanted."""
    return lab.Request(lab.get_op("linear_cross_entropy"), shape, dtype, lab.ARCHITECTURES[arch], {}, {})


@pytest.fixture(scope="module")
def compiled() -> dict[str, list[tuple[dict, lab.Compiled]]]:
    """All launches of this file, compiled in one batch, by group: (inspect's kernel report, compiled)."""
    widest = max(config.block_v for configs in CONFIGS.values() for config in configs)
    # Rows as wide as each held configuration, and wider than the widest: every configuration.
    one_pass_widths = sorted({c.block_v for c in ONE_PASS} | {2 * RESIDENT_COLUMNS})
    chunk_sizes = range(4, widest.bit_length())  # rows of 2**k give every config
    groups = {
        "every": [request((8, 2**k), "bf16", arch, False) for k in chunk_sizes for arch in ARCHS],
        "gpt2": [request(GPT2, dtype, arch, True) for dtype in ("bf16", "fp16") for arch in ARCHS],
        "unhinted": [request(GPT2, "bf16", 90, False)],
        # The fused head's one-pass kernel at every configuration (held in registers up to
        # ONE_PASS_RESIDENT_COLUMNS, streamed beyond); GPT-2's head, held in three parts.
        "one_pass": [fused_request((64, 16, width), "bf16", 90) for width in one_pass_widths],
        "one_pass_gpt2": [fused_request((16384, 768, 50304, 50257), "bf16", arch) for arch in ARCHS],
    }
    results = iter(lab.inspect_many([r for requests in groups.values() for r in requests]))
    out = {}
    for name, requests in groups.items():
        out[name] = [pair for _ in requests for report, done in [next(results)]
                     for pair in zip(report["kernels"], done)]
    return out


def test_every_config_compiles_without_spills_within_shared_memory(compiled):
    every = compiled["every"]
    assert len(every) == sum(map(len, CONFIGS.values())) * len(ARCHS)
    for kernel in KERNELS:
        launched = {(k["config"]["BLOCK_V"], k["config"]["num_warps"]) for k, _ in every if k["name"] == kernel}
        assert launched == set(map(dataclasses.astuple, CONFIGS[kernel]))
    spilling = [str(c) for _, c in every if c.spill_bytes > 0]
    assert not spilling, "register spills:\n" + "\n".join(spilling)
    over = [str(c) for _, c in every if c.shared > lab.ARCHITECTURES[c.build.arch].shared_per_block]
    assert not over, "shared memory over the limit:\n" + "\n".join(over)


def test_16_bit_logits_use_128_bit_loads_and_stores(compiled):
    for kernel, c in compiled["gpt2"]:
        block_v, num_warps = kernel["config"]["BLOCK_V"], kernel["config"]["num_warps"]
        per_chunk = block_v // (32 * num_warps) // 8  # 128-bit accesses per thread for one whole chunk
        loads = sass.global_load_bits(c.asm["ptx"])
        assert loads[128] >= per_chunk > 0, f"{c}: global loads by width {dict(loads)}"
        if kernel["name"] == "cross_entropy_bwd":  # the gradient is written as wide as it is read
            stores = sass.global_store_bits(c.asm["ptx"])
            assert stores[128] >= per_chunk, f"{c}: global stores by width {dict(stores)}"


def test_load_width_check_can_fail(compiled):
    """With an odd row stride Triton must assume odd row starts: no 128-bit loads."""
    ((_, c),) = [pair for pair in compiled["unhinted"] if pair[0]["name"] == "cross_entropy_fwd"]
    assert sass.global_load_bits(c.asm["ptx"])[128] == 0


def test_one_pass_kernel_compiles_without_spills_at_every_config(compiled):
    reports = [(k, c) for k, c in compiled["one_pass"] + compiled["one_pass_gpt2"]
               if k["name"] == "cross_entropy_one_pass"]
    launched = {(k["config"]["BLOCK_V"], k["config"]["num_warps"]) for k, _ in reports}
    assert launched == set(map(dataclasses.astuple, ONE_PASS))
    spilling = [str(c) for _, c in reports if c.spill_bytes > 0]
    assert not spilling, "register spills:\n" + "\n".join(spilling)
    over = [str(c) for _, c in reports if c.shared > lab.ARCHITECTURES[c.build.arch].shared_per_block]
    assert not over, "shared memory over the limit:\n" + "\n".join(over)


def test_one_pass_kernel_reads_and_writes_16_bit_rows_128_bits_wide(compiled):
    """GPT-2's head (held in parts), the widest row held and the streamed configuration: 128-bit loads
    and stores."""
    widest_and_streamed = [(k, c) for k, c in compiled["one_pass"] if k["config"]["BLOCK_V"] == RESIDENT_COLUMNS
                           or c.constants["RESIDENT"] is False]
    assert len(widest_and_streamed) == 2
    for kernel, c in compiled["one_pass_gpt2"] + widest_and_streamed:
        assert kernel["name"] == "cross_entropy_one_pass"
        assert sass.global_load_bits(c.asm["ptx"])[128] > 0 and sass.global_store_bits(c.asm["ptx"])[128] > 0, c
