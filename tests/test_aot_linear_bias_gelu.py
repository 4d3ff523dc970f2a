"""The persistent matmuls of linear_bias_gelu compiled ahead of time for sm_90 (H100) and sm_80 (A100).

At GPT-2's MLP shape, both kernels (the forward with bias + GELU in its epilogue, the backward's
matmul with GELU's gradient in its epilogue) and every configuration the launchers may pick must
compile without register spills within shared memory; on sm_90 the aligned operands come through
TMA and the products through wgmma that ptxas does not serialise (no C7515/C7512 notes), with one
wgmma wait per BLOCK_K step, at sizes no block divides too; sm_80 uses mma.sync with cp.async.
"""

import pytest

from gptfast import lab

pytest.importorskip("triton.backends.nvidia", reason="needs Triton's NVIDIA backend (ptxas)")

SHAPE = (16384, 768, 3072)  # c_fc of GPT-2 124M at 16 x 1024 tokens
ODD = (1000, 776, 3080)  # no block divides them; rows still of 16-byte multiples


def request(shape, dtype, arch) -> lab.Request:
    return lab.Request(lab.get_op("linear_bias_gelu"), shape, dtype, lab.ARCHITECTURES[arch], {}, {})


@pytest.fixture(scope="module")
def compiled() -> dict[tuple, list[tuple[dict, lab.Compiled]]]:
    """(shape, dtype, arch) -> [(inspect's kernel report, compiled)], compiled in one batch."""
    keys = [(SHAPE, dtype, arch) for dtype in ("bf16", "fp32") for arch in (80, 90)] + [(ODD, "bf16", 90)]
    results = lab.inspect_many([request(*key) for key in keys])
    return {key: list(zip(report["kernels"], done)) for key, (report, done) in zip(keys, results)}


def test_both_kernels_compile_without_spills_within_shared_memory(compiled):
    pairs = [pair for found in compiled.values() for pair in found]
    assert {k["name"] for k, _ in pairs} == {"linear_bias_gelu", "matmul_gelu_grad"} and len(pairs) == 10
    configs = {(c.build.arch, str(c.constants)) for _, c in pairs}
    assert len(configs) >= 8  # every dtype's configuration on both targets, each kernel
    assert all(c.spill_bytes == 0 for _, c in pairs), [str(c) for _, c in pairs if c.spill_bytes]
    assert all(c.shared <= lab.ARCHITECTURES[c.build.arch].shared_per_block for _, c in pairs)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_hopper_reads_through_tma_into_unserialised_wgmma(compiled, dtype):
    for kernel, c in compiled[(SHAPE, dtype, 90)]:
        assert kernel["tma"] and kernel["hgmma"] > 0 and kernel["hmma"] == 0, str(c)
        assert not kernel["serialized_mma"], kernel["serialized_notes"]
        assert kernel["main_loop"] and kernel["warpgroup_waits"] <= 1, str(c)
        assert kernel["flops"] == 2 * SHAPE[0] * SHAPE[1] * SHAPE[2]  # the blocks divide GPT-2's shape


def test_sizes_no_block_divides_keep_tma_and_wgmma(compiled):
    for kernel, c in compiled[(ODD, "bf16", 90)]:
        assert kernel["tma"] and kernel["hgmma"] > 0 and not kernel["serialized_mma"], str(c)


def test_ampere_uses_mma_sync_with_async_copies(compiled):
    for kernel, c in compiled[(SHAPE, "bf16", 80)]:
        assert kernel["hmma"] > 0 and kernel["hgmma"] == 0 and kernel["cp_async"] and not kernel["tma"], str(c)
