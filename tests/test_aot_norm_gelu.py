"""LayerNorm and bias + GELU kernels compiled ahead of time for sm_80 (A100) and sm_90 (H100).

Every block configuration the launchers may pick (``_kernel_configs``) must compile without
register spills and within the target's shared memory, and the memory-bound kernels must read
16-bit rows with 128-bit loads when the row length lets them (``aligned``: the pointers, row length
and strides are multiples of 16, as the launcher specialises them for GPT-2's hidden sizes).
Compilation runs in one subprocess without ``TRITON_INTERPRET`` (see ``aot.py``).
"""

import dataclasses
import importlib

import aot
import pytest

# The modules (the package's attributes of these names are the public functions).
layer_norm = importlib.import_module("gptfast.kernels.layer_norm")
bias_gelu = importlib.import_module("gptfast.kernels.bias_gelu")
pytest.importorskip("triton.backends.nvidia", reason="needs Triton's NVIDIA backend (ptxas)")

ARCHS = (80, 90)
# Pointers to float32 statistics and partial sums, whatever the input dtype.
FLOAT32_POINTERS = {"rstd_ptr", "dw_partial_ptr", "db_partial_ptr", "dbias_partial_ptr"}
KERNELS = {  # name: (module, kernel function name, its block configurations, fullest constexpr flags)
    "layer_norm_fwd": (layer_norm, "_layer_norm_fwd", layer_norm._kernel_configs(backward=False),
                       dict(HAS_WEIGHT=True, HAS_BIAS=True)),
    "layer_norm_bwd": (layer_norm, "_layer_norm_bwd", layer_norm._kernel_configs(backward=True),
                       dict(HAS_WEIGHT=True, HAS_BIAS=True)),
    "bias_gelu_fwd": (bias_gelu, "_bias_gelu_fwd", bias_gelu._kernel_configs(), dict(HAS_BIAS=True)),
    "bias_gelu_bwd": (bias_gelu, "_bias_gelu_bwd", bias_gelu._kernel_configs(), dict(HAS_BIAS=True)),
}


def build(name: str, config: tuple[int, int, int], dtype: str, arch: int, aligned: bool, **constexprs):
    """The aot.Build of kernel ``name`` at block config (BLOCK_M, BLOCK_N, num_warps) for ``dtype``."""
    module, kernel, _, flags = KERNELS[name]
    block_m, block_n, num_warps = config
    signature = {}
    for arg in getattr(module, kernel).arg_names:
        if arg.endswith("_ptr"):
            signature[arg] = "*fp32" if arg in FLOAT32_POINTERS else f"*{dtype}"
        elif arg.isupper():
            signature[arg] = "constexpr"
        else:
            signature[arg] = "fp32" if arg == "eps" else "i32"
    hinted = tuple(a for a in signature if a.endswith("_ptr") or a == "n_cols" or a.startswith("stride"))
    maxnreg = layer_norm._register_budget(num_warps) if module is layer_norm else None  # as launched
    return aot.Build(module.__name__, kernel, signature,
                     constexprs={**flags, **constexprs, "BLOCK_M": block_m, "BLOCK_N": block_n},
                     aligned=hinted if aligned else (), num_warps=num_warps, arch=arch, maxnreg=maxnreg)


def every_config_builds(dtype: str = "bf16", aligned: bool = False) -> list:
    """Each kernel at each block configuration, for each target, the erf and tanh GELU both.

    The default, bfloat16 without divisibility hints, needs the most registers (conversions,
    scalar accesses); float32 with hints compiled clean too when this test was written.
    """
    builds = []
    for name, (module, _, configs, _) in KERNELS.items():
        variants = [dict(TANH=True), dict(TANH=False)] if module is bias_gelu else [{}]
        builds += [build(name, config, dtype, arch, aligned, **variant)
                   for config in configs for arch in ARCHS for variant in variants]
    return builds


def wide_load_builds() -> list:
    """GPT-2's shapes in 16-bit dtypes: LayerNorm rows of 768, bias + GELU rows of 3072."""
    configs = {"layer_norm_fwd": layer_norm._block_config(768, backward=False),
               "layer_norm_bwd": layer_norm._block_config(768, backward=True),
               "bias_gelu_fwd": bias_gelu._block_config(3072), "bias_gelu_bwd": bias_gelu._block_config(3072)}
    return [build(name, config, dtype, arch, True, **({"TANH": True} if name.startswith("bias") else {}))
            for name, config in configs.items() for dtype in ("fp16", "bf16") for arch in ARCHS]


def without_parameters(full: aot.Build) -> aot.Build:
    """``full`` as launched with weight and bias None: those pointers become constexpr None."""
    params = [p for p in ("w_ptr", "b_ptr", "bias_ptr") if p in full.signature]
    flags = {k: False for k in full.constexprs if k.startswith("HAS_")}
    return dataclasses.replace(full, signature={**full.signature, **{p: "constexpr" for p in params}},
                               constexprs={**full.constexprs, **flags, **{p: None for p in params}},
                               aligned=tuple(a for a in full.aligned if a not in params))


def unhinted_build() -> aot.Build:
    """bias + GELU on fp16 rows of 3072 without divisibility hints: Triton must assume odd rows."""
    return build("bias_gelu_fwd", bias_gelu._block_config(3072), "fp16", 90, aligned=False, TANH=True)


@pytest.fixture(scope="module")
def compiled() -> dict[str, list[aot.KernelStats]]:
    """All builds of this file, compiled in one subprocess, by group."""
    wide = wide_load_builds()
    groups = {"every": every_config_builds(), "wide": wide, "unhinted": [unhinted_build()],
              "bare": [without_parameters(b) for b in wide if b.arch == 90 and b.signature["x_ptr"] == "*bf16"]}
    stats = iter(aot.compile_kernels([b for builds in groups.values() for b in builds]))
    return {name: [next(stats) for _ in builds] for name, builds in groups.items()}


def test_every_config_compiles_without_spills_within_shared_memory(compiled):
    every = compiled["every"]
    assert len(every) > 100  # configs x kernels x targets, all of them checked
    spilling = [str(s) for s in every if s.spill_bytes > 0]
    assert not spilling, "register spills:\n" + "\n".join(spilling)
    over = [str(s) for s in every if s.shared > s.shared_limit]
    assert not over, "shared memory over the limit:\n" + "\n".join(over)


def tile_loads(stats) -> int:
    """128-bit loads per thread needed to read the kernel's (BLOCK_M, BLOCK_N) 16-bit tiles: x, and
    dy in the backward."""
    b = stats.build
    values_per_thread = b.constexprs["BLOCK_M"] * b.constexprs["BLOCK_N"] // (32 * b.num_warps)
    tensors = 2 if b.kernel.endswith("_bwd") else 1
    return tensors * values_per_thread // 8


def test_16_bit_rows_use_128_bit_loads(compiled):
    for stats in compiled["wide"]:
        widths = aot.global_load_bits(stats.ptx)
        # Every value of the x (and dy) tiles comes through 128-bit loads; the narrower loads left
        # are per-row statistics and the one bias/weight row per tile.
        assert widths[128] >= tile_loads(stats) > 0, f"{stats}: global loads by width {dict(widths)}"


def test_kernels_compile_without_weight_and_bias(compiled):
    """weight / bias None reach the kernels as constexpr None, a path the interpreter cannot check."""
    bare = compiled["bare"]
    assert len(bare) == 4 and all(s.spill_bytes == 0 for s in bare)


def test_load_width_check_can_fail(compiled):
    """Without the divisibility hints Triton must assume odd row lengths: no 128-bit loads."""
    (stats,) = compiled["unhinted"]
    assert aot.global_load_bits(stats.ptx)[128] == 0
