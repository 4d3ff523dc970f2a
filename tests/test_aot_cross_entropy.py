"""The cross-entropy kernels compiled ahead of time for sm_80 (A100) and sm_90 (H100).

Every chunk size the launchers may pick must compile without register spills and within the
target's shared memory. GPT-2's 16-bit logits (rows of 50,304 padded columns holding 50,257
classes) must be read with 128-bit loads and their gradient written with 128-bit stores: whole
chunks are accessed unmasked for that, since the class count is odd. Compilation runs in one
subprocess without ``TRITON_INTERPRET`` (see ``aot.py``).
"""

import importlib

import aot
import pytest

cross_entropy = importlib.import_module("gptfast.kernels.cross_entropy")
pytest.importorskip("triton.backends.nvidia", reason="needs Triton's NVIDIA backend (ptxas)")

ARCHS = (80, 90)
KERNELS = ("_cross_entropy_fwd", "_cross_entropy_bwd")
POINTER_TYPES = {"targets_ptr": "*i64", "loss_ptr": "*fp32", "stats_ptr": "*fp32", "dloss_ptr": "*fp32"}


def build(kernel: str, config: tuple[int, int], dtype: str, arch: int, aligned: bool) -> aot.Build:
    """The aot.Build of ``kernel`` at (BLOCK_V, num_warps) for logits of ``dtype``. ``aligned``: the
    pointers and row strides are multiples of 16, as for GPT-2's padded vocabulary; the class count
    never is (50,257)."""
    block_v, num_warps = config
    signature = {}
    for arg in getattr(cross_entropy, kernel).arg_names:
        if arg.endswith("_ptr"):
            signature[arg] = POINTER_TYPES.get(arg, f"*{dtype}")
        else:
            signature[arg] = "constexpr" if arg.isupper() else "i32"
    hinted = tuple(a for a in signature if a.endswith("_ptr") or a.startswith("stride"))
    return aot.Build(cross_entropy.__name__, kernel, signature, constexprs={"BLOCK_V": block_v},
                     aligned=hinted if aligned else (), num_warps=num_warps, arch=arch)


@pytest.fixture(scope="module")
def compiled() -> dict[str, list[aot.KernelStats]]:
    """All builds of this file, compiled in one subprocess, by group."""
    gpt2 = cross_entropy._block_config(50257)
    groups = {
        "every": [build(k, c, "bf16", arch, False) for k in KERNELS
                  for c in cross_entropy._kernel_configs() for arch in ARCHS],
        "gpt2": [build(k, gpt2, dtype, arch, True) for k in KERNELS for dtype in ("bf16", "fp16") for arch in ARCHS],
        "unhinted": [build("_cross_entropy_fwd", gpt2, "bf16", 90, False)],
    }
    stats = iter(aot.compile_kernels([b for builds in groups.values() for b in builds]))
    return {name: [next(stats) for _ in builds] for name, builds in groups.items()}


def test_every_config_compiles_without_spills_within_shared_memory(compiled):
    every = compiled["every"]
    assert len(every) == len(KERNELS) * len(cross_entropy._kernel_configs()) * len(ARCHS)
    spilling = [str(s) for s in every if s.spill_bytes > 0]
    assert not spilling, "register spills:\n" + "\n".join(spilling)
    over = [str(s) for s in every if s.shared > s.shared_limit]
    assert not over, "shared memory over the limit:\n" + "\n".join(over)


def test_16_bit_logits_use_128_bit_loads_and_stores(compiled):
    for stats in compiled["gpt2"]:
        block_v, num_warps = stats.build.constexprs["BLOCK_V"], stats.build.num_warps
        per_chunk = block_v // (32 * num_warps) // 8  # 128-bit accesses per thread for one whole chunk
        loads = aot.global_load_bits(stats.ptx)
        assert loads[128] >= per_chunk > 0, f"{stats}: global loads by width {dict(loads)}"
        if stats.build.kernel == "_cross_entropy_bwd":  # the gradient is written as wide as it is read
            stores = aot.global_store_bits(stats.ptx)
            assert stores[128] >= per_chunk, f"{stats}: global stores by width {dict(stores)}"


def test_load_width_check_can_fail(compiled):
    """Without the stride hints Triton must assume odd row starts: no 128-bit loads."""
    (stats,) = compiled["unhinted"]
    assert aot.global_load_bits(stats.ptx)[128] == 0
