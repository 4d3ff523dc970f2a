"""Every registered op (``gptfast.kernels.registry``) is inspectable, checkable, benchmarked and
opchecked: adding an op's file or package with its ``SPECS`` and its test file is all it takes, and
these tests say what is missing."""

import dataclasses
import importlib
import inspect
from pathlib import Path

import pytest
import torch

from gptfast import kernels
from gptfast.bench import report
from gptfast.kernels import backend
from gptfast.kernels.registry import SPECS, get_spec
from gptfast.lab import analysis, check

TESTS = Path(__file__).parent
TRITON = tuple(int(part) for part in analysis.triton_version().split(".")[:2])
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Triton 3.6's interpreter cannot take loop bounds computed from program ids (setup.py's test extra).
runs_kernels = pytest.mark.skipif(DEVICE.type == "cpu" and TRITON < (3, 7),
                                  reason="this Triton's interpreter cannot run the kernels")


def test_the_registry_finds_every_op():
    """Every public function of gptfast.kernels but the backend switch's is a registered op, listed
    by its spec's order."""
    public = {name for name in kernels.__all__
              if inspect.isfunction(getattr(kernels, name)) and getattr(kernels, name).__module__ != backend.__name__}
    assert set(SPECS) == public and len(public) >= 6
    orders = [spec.order for spec in SPECS.values()]
    assert orders == sorted(set(orders))
    assert list(report.KERNELS)[0] == SPECS[next(iter(SPECS))].benchmarks[0].name
    with pytest.raises(ValueError, match="unknown op 'softmax': choose one of .*flash_attention"):
        get_spec("softmax")


@pytest.mark.parametrize("op", SPECS)
def test_spec_is_complete(op):
    """The shapes the tools use fit the op's shape names; its public function is the package's and
    explain() takes its example inputs; every kernel --config names has configurations."""
    spec = SPECS[op]
    assert spec.function is getattr(kernels, op)
    shapes = (spec.shapes.default, spec.shapes.small, *spec.shapes.odd, *spec.shapes.bench)
    assert 2 <= len(spec.shapes.odd) <= 3 and spec.shapes.bench
    lengths = range(len(spec.shape_names) - spec.optional, len(spec.shape_names) + 1)
    assert all(len(shape) in lengths and min(shape) >= 1 for shape in shapes), shapes
    assert kernels.explain(op, **spec.example("cpu", torch.bfloat16)).op == op
    every = spec.every_config()
    assert dataclasses.is_dataclass(spec.config_type) and set(every) == set(spec.tunables) and all(every.values())
    for kernel, configs in every.items():  # --config's fields are the configurations' own
        assert all(hasattr(config, field.lower()) for config in configs for field in spec.tunables[kernel].fields)


def test_attention_odd_shapes_include_the_decode_path():
    from gptfast.kernels.flash_attention.launch import decodes

    spec = SPECS["flash_attention"]
    inputs = [spec.inputs(shape, torch.float32, "meta") for shape in spec.shapes.odd]
    assert any(decodes(i["q"], i["dropout_p"]) for i in inputs) and not all(decodes(i["q"], 0.0) for i in inputs)


@pytest.mark.parametrize("op", SPECS)
def test_every_op_is_inspectable(op):
    """`lab inspect` compiles the op's launches for sm_90 (at its small shape: the code is the GPT-2
    shape's; tests/test_lab.py inspects those)."""
    pytest.importorskip("triton.backends.nvidia", reason="needs Triton's NVIDIA backend (ptxas)")
    from gptfast import lab

    spec = SPECS[op]
    report = lab.inspect(lab.Request(spec, spec.shapes.small, "fp16", lab.ARCHITECTURES[90], {}, {}))
    assert report["kernels"] and all(k["registers"] > 0 and k["spill_bytes"] == 0 for k in report["kernels"])
    assert {k["phase"] for k in report["kernels"]} <= {"forward", "backward"}


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("op", SPECS)
def test_every_op_is_checkable(op, dtype):
    """`lab check` passes at the op's small shape: every output and gradient within 2x eager's error of
    float64, and a rerun bit-identical."""
    problem = check.check_problem(op, dtype, DEVICE)
    if problem:
        pytest.skip(problem)
    comparisons, deterministic = check.check(op, SPECS[op].shapes.small, dtype, DEVICE)
    assert deterministic and comparisons[0].tensor == "output" and len(comparisons) >= 2
    assert all(c.passed for c in comparisons), comparisons


def test_every_op_is_benchmarked():
    for spec in SPECS.values():
        assert spec.benchmarks, spec.name
        for bench in spec.benchmarks:
            assert report.KERNELS[bench.name] is bench and "triton" in bench.providers, bench.name
            assert bench.headline in bench.sizes("full") and bench.sizes("small")
            assert bench.shape_for(bench.size_for(bench.shape_for(bench.headline))) == bench.shape_for(bench.headline)


def test_every_op_is_opchecked():
    """Each op's test file gives tests/test_opcheck.py its custom operators' cases."""
    for op in SPECS:
        assert (TESTS / f"test_{op}.py").exists(), op
        assert callable(getattr(importlib.import_module(f"test_{op}"), "opcheck_cases", None)), op


@runs_kernels
@pytest.mark.parametrize("op", SPECS)
def test_launchers_run_with_explicit_configurations(op):
    """What `lab tune` times: the op's launchers, forward then backward, on real inputs, with a
    configuration given (the first tunable kernel's first block size set to 16)."""
    spec = SPECS[op]
    kernel, tunable = next(iter(spec.tunables.items()))
    field = next(f for f in tunable.fields if f.startswith("BLOCK"))
    inputs = spec.inputs(spec.shapes.small, torch.float32, DEVICE, generator=torch.Generator().manual_seed(0))
    spec.launch(inputs, {kernel: {field: 16}})


def test_check_floors_a_tf32_op_at_tf32_rounding_on_a_gpu_only():
    """Attention multiplies float32 in TF32 on a GPU, where eager PyTorch multiplies in float32: its
    yardstick there is TF32's rounding; every other case keeps float32's."""
    attention, layer_norm = get_spec("flash_attention"), get_spec("layer_norm")
    cuda, cpu, eps = torch.device("cuda"), torch.device("cpu"), torch.finfo(torch.float32).eps
    assert check._rounding(attention, torch.float32, cuda) == 2.0**-10
    assert check._rounding(attention, torch.float32, cpu) == eps
    assert check._rounding(attention, torch.float16, cuda) == eps
    assert check._rounding(layer_norm, torch.float32, cuda) == eps
