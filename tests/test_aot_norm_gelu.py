"""LayerNorm and bias + GELU kernels compiled ahead of time for sm_80 (A100) and sm_90 (H100).

Every block configuration the launchers may pick (their specs' ``every_config``) must compile without
register spills and within the target's shared memory, and the memory-bound kernels must read
16-bit rows with 128-bit loads when the row length lets them (the pointers, row length and strides
are multiples of 16, as Triton's launcher specialises them for GPT-2's hidden sizes). The launches
are the launchers' own, captured and compiled by the kernel lab (``gptfast.lab``).
"""

import importlib

import pytest

from gptfast import lab
from gptfast.kernels.registry import SPECS
from gptfast.lab import sass

layer_norm = importlib.import_module("gptfast.kernels.layer_norm")  # the module, not the public function
pytest.importorskip("triton.backends.nvidia", reason="needs Triton's NVIDIA backend (ptxas)")

ARCHS = (80, 90)
ROWS = 64  # enough for every tile; the grid does not change what compiles


def request(op: str, columns: int, dtype: str, arch: int, aligned: bool = True, **options) -> lab.Request:
    """The op at rows of ``columns``; not ``aligned``: rows one element apart from a multiple of 16 (an
    odd row stride), so that Triton cannot assume aligned row starts."""
    if not aligned:
        options["row_stride"] = columns + 1
    return lab.Request(lab.get_op(op), (ROWS, columns), dtype, lab.ARCHITECTURES[arch], {}, options)


def layer_norm_widths() -> list[int]:
    """A row length for each block configuration of either LayerNorm kernel (the widest it takes)."""
    widest = {(backward, layer_norm.block_config(n, backward)): n
              for n in range(1, layer_norm.MAX_ROW_LENGTH + 1) for backward in (False, True)}
    return sorted(set(widest.values()))


def every_config_requests() -> list[lab.Request]:
    """Each kernel at each block configuration (LayerNorm: rows of layer_norm_widths(); bias + GELU:
    rows of 2**k columns give every one), for each target, the erf and tanh GELU both, in bfloat16
    with unaligned rows: the most registers."""
    requests = [request("layer_norm", n, "bf16", arch, aligned=False) for n in layer_norm_widths() for arch in ARCHS]
    requests += [request("bias_gelu", 2**k, "bf16", arch, aligned=False, approximate=approximate)
                 for k in range(9) for arch in ARCHS for approximate in ("tanh", "none")]
    return requests


def wide_load_requests(**options) -> list[lab.Request]:
    """GPT-2's shapes in 16-bit dtypes: LayerNorm rows of 768, bias + GELU rows of 3072."""
    return [request(op, columns, dtype, arch, **options) for op, columns in (("layer_norm", 768), ("bias_gelu", 3072))
            for dtype in ("fp16", "bf16") for arch in ARCHS]


@pytest.fixture(scope="module")
def compiled() -> dict[str, list[tuple[dict, lab.Compiled]]]:
    """All launches of this file, compiled in one batch, by group: (inspect's kernel report, compiled)."""
    groups = {"every": every_config_requests(), "wide": wide_load_requests(),
              "unhinted": [request("bias_gelu", 3072, "fp16", 90, aligned=False, bias=False)],
              "bare": [r for r in wide_load_requests(weight=False, bias=False)
                       if r.arch.arch == 90 and r.dtype == "bf16"]}
    results = iter(lab.inspect_many([r for requests in groups.values() for r in requests]))
    out = {}
    for name, requests in groups.items():
        out[name] = [pair for _ in requests for report, done in [next(results)]
                     for pair in zip(report["kernels"], done)]
    return out


def test_every_config_compiles_without_spills_within_shared_memory(compiled):
    every = compiled["every"]
    configs = {(c.build.kernel, c.build.arch, str(c.constants)) for _, c in every}
    layer_norm_configs, bias_gelu_configs = SPECS["layer_norm"].every_config(), SPECS["bias_gelu"].every_config()
    expected = (sum(map(len, layer_norm_configs.values())) + 2 * sum(map(len, bias_gelu_configs.values()))) * len(ARCHS)
    assert len(configs) == expected and len(every) > 100  # configs x kernels x targets, all of them checked
    spilling = [str(c) for _, c in every if c.spill_bytes > 0]
    assert not spilling, "register spills:\n" + "\n".join(spilling)
    over = [str(c) for _, c in every if c.shared > lab.ARCHITECTURES[c.build.arch].shared_per_block]
    assert not over, "shared memory over the limit:\n" + "\n".join(over)


def tile_loads(kernel: dict) -> int:
    """128-bit loads per thread needed to read the kernel's (BLOCK_M, BLOCK_N) 16-bit tiles: x, and
    dy in the backward."""
    config = kernel["config"]
    values_per_thread = config["BLOCK_M"] * config["BLOCK_N"] // (32 * config["num_warps"])
    tensors = 2 if kernel["name"].endswith("_bwd") else 1
    return tensors * values_per_thread // 8


def test_16_bit_rows_use_128_bit_loads(compiled):
    for kernel, c in compiled["wide"]:
        widths = sass.global_load_bits(c.asm["ptx"])
        # Every value of the x (and dy) tiles comes through 128-bit loads; the narrower loads left
        # are per-row statistics and the one bias/weight row per tile.
        assert widths[128] >= tile_loads(kernel) > 0, f"{c}: global loads by width {dict(widths)}"


def test_kernels_compile_without_weight_and_bias(compiled):
    """weight / bias None reach the kernels as constexpr None, a path the interpreter cannot check."""
    bare = compiled["bare"]
    assert len(bare) == 4 and all(c.spill_bytes == 0 for _, c in bare)
    assert all(c.signature[p] == "constexpr" for _, c in bare for p in ("w_ptr", "b_ptr", "bias_ptr")
               if p in c.signature)


def test_load_width_check_can_fail(compiled):
    """With odd row strides Triton must assume unaligned rows: no 128-bit loads."""
    ((_, c),) = [pair for pair in compiled["unhinted"] if pair[0]["name"] == "bias_gelu_fwd"]
    assert "stride_x" not in c.hinted
    assert sass.global_load_bits(c.asm["ptx"])[128] == 0
