"""The test machinery itself: the interpreter fixtures of conftest.py and kernel_testing's checks."""

import pytest
import torch
import triton
import triton.language as tl
from kernel_testing import assert_within_eager_error, run_and_compare

from gptfast import kernels

pytestmark = pytest.mark.usefixtures("on_kernel_device")  # the GPU when there is one
INTERPRETED = kernels.backend.TRITON_INTERPRET


@triton.jit
def _store_kernel(x_ptr, implicit_ptr, explicit_ptr, n, BLOCK: tl.constexpr):
    """Stores float32 values to bfloat16 memory twice: converted by the store, and by ``.to``."""
    offsets = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < n)
    tl.store(implicit_ptr + offsets, x, mask=offsets < n)
    tl.store(explicit_ptr + offsets, x.to(tl.bfloat16), mask=offsets < n)


def awkward_float32() -> torch.Tensor:
    """Random values of every scale, and the cases a rounding can get wrong: ties to an even and to an
    odd half, a carry into the exponent, overflow to inf, subnormals, signed zeros, inf and NaN."""
    special = torch.tensor([0x3F808000, 0x3F818000, 0x3F7FFFFF, 0x7F7FFFFF, 0x00018000, 0x807FFFFF, 0, 0x80000000,
                            0x7F800000, 0xFF800000, 0x7F800001, 0xFFFFFFFF], dtype=torch.int64)
    return torch.cat([torch.randn(500) * torch.logspace(-30, 30, 500), special.to(torch.int32).view(torch.float32)])


def bf16_stores(x: torch.Tensor) -> list[torch.Tensor]:
    outputs = [torch.empty(x.shape, dtype=torch.bfloat16) for _ in range(2)]
    _store_kernel[(1,)](x, *outputs, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    return outputs


def bits_without_nans(values: torch.Tensor) -> torch.Tensor:
    return values[~values.isnan()].view(torch.int16)


def test_bf16_rounding_fixture_rounds_as_torch(interpreter_bf16_rounding):
    torch.manual_seed(0)
    x = awkward_float32()
    want = x.to(torch.bfloat16)
    for got in bf16_stores(x):
        assert torch.equal(got.isnan(), x.isnan())
        assert torch.equal(bits_without_nans(got), bits_without_nans(want))


@pytest.mark.skipif(not INTERPRETED, reason="the stock interpreter's conversion; a GPU rounds")
def test_stock_interpreter_truncates_bf16_stores():
    """The control: without the fixture, the conversion keeps the top half of a normal float32's bits
    (and gets subnormals wrong)."""
    torch.manual_seed(0)
    x = awkward_float32()
    normal = x.isfinite() & (x.abs() >= torch.finfo(torch.float32).tiny)
    truncated = (x[normal].view(torch.int32) >> 16).to(torch.int16)
    for got in bf16_stores(x):
        assert torch.equal(got[normal].view(torch.int16), truncated)
        assert not torch.equal(got[normal], x[normal].to(torch.bfloat16))


class _DoubleWithWrongGradient(torch.autograd.Function):
    """2x forward, a backward 1% off."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        return 2.02 * grad


def test_run_and_compare_names_the_wrong_tensor():
    """A gradient off by 1% fails float32's tolerance; the message names it and the tolerance."""
    x = torch.randn(5, 7)
    run_and_compare(lambda x: 2 * x, lambda x: 2 * x, {"x": x})
    with pytest.raises(AssertionError, match=r"(?s)dx .*rtol=1e-05, atol=1e-05.*Greatest absolute difference"):
        run_and_compare(_DoubleWithWrongGradient.apply, lambda x: 2 * x, {"x": x})


def test_eager_rule_holds_half_dtypes_only():
    """Half-dtype results may miss the float64 values by at most twice the eager error; float32 ones
    are held to their tolerance alone."""
    want = torch.linspace(1, 2, 100, dtype=torch.float64)
    eager = want.to(torch.bfloat16)  # one rounding: at most 2**-8 relative
    assert_within_eager_error("y", (want - 2**-9).to(torch.bfloat16), eager, want)  # up to 1.5 x eager's
    with pytest.raises(AssertionError, match=r"y \(torch.bfloat16\): max error .* over 2.0 x eager's"):
        assert_within_eager_error("y", (want * (1 + 2**-5)).to(torch.bfloat16), eager, want)
    assert_within_eager_error("y", (want * 1.1).float(), want.float(), want)
