"""The Triton LayerNorm (under the interpreter on CPU) against a float64 reference.

Tolerances: the reference runs in float64 on the very values the kernel reads, so the kernel's error
is its float32 arithmetic plus one rounding of each output to its dtype: a relative error of about
2**-24 (float32), 2**-11 (float16) or 2**-8 (bfloat16), with an absolute floor for values near zero.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gptfast import kernels
from gptfast.kernels.layer_norm import MAX_ROW_LENGTH, layer_norm_reference

pytestmark = pytest.mark.usefixtures("on_kernel_device")  # the GPU when there is one

TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
DTYPES = list(TOLERANCES)


def run_and_compare(x, weight, bias, eps=1e-5, dtype=None):
    """Forward and backward on "triton" against the float64 reference, within the dtype's tolerance."""
    tol = TOLERANCES[dtype or x.dtype]
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    with kernels.use_backend("triton"):
        y = kernels.layer_norm(*leaves, eps)
    assert y.dtype == x.dtype and y.shape == x.shape
    dy = torch.randn_like(y)
    y.backward(dy)
    ref_leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    ref = layer_norm_reference(*ref_leaves, eps)
    ref.backward(dy.double())
    torch.testing.assert_close(y.double(), ref.detach(), **tol)
    for got, want in zip(leaves, ref_leaves):
        if got is not None:
            assert got.grad.dtype == got.dtype
            torch.testing.assert_close(got.grad.double(), want.grad, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 768, 1000, 1280, 1600, 4096, 8192])
def test_matches_reference(n, dtype):
    torch.manual_seed(n)
    x = torch.randn(2, 3, n).to(dtype)  # leading (batch, seq) dimensions
    run_and_compare(x, torch.randn(n).to(dtype), torch.randn(n).to(dtype))


@pytest.mark.parametrize("rows", [0, 1, 37])
@pytest.mark.parametrize("has_weight, has_bias", [(True, True), (True, False), (False, True), (False, False)])
def test_row_counts_and_optional_parameters(rows, has_weight, has_bias):
    torch.manual_seed(rows)
    n = 200
    run_and_compare(torch.randn(rows, n), torch.randn(n) if has_weight else None,
                    torch.randn(n) if has_bias else None)


def test_non_contiguous_inputs():
    torch.manual_seed(0)
    n = 96
    transposed = torch.randn(n, 40).t()  # column stride != 1: copied to rows
    padded_rows = torch.randn(40, n + 32)[:, :n]  # row stride > n: read in place
    batch_major = torch.randn(5, 8, n).transpose(0, 1)  # leading dimensions that do not flatten to a view
    for x in (transposed, padded_rows, batch_major):
        run_and_compare(x, torch.randn(n), torch.randn(n))
    run_and_compare(torch.randn(7, n), torch.randn(2 * n)[::2], torch.randn(n, 3)[:, 1])  # strided parameters


def test_gradient_with_stride_zero_rows():
    """``y.sum()`` sends back an expanded (stride 0) gradient; it must be read as such."""
    x, w = torch.randn(6, 50, requires_grad=True), torch.randn(50, requires_grad=True)
    with kernels.use_backend("triton"):
        kernels.layer_norm(x, w, None).sum().backward()
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    layer_norm_reference(xd, wd, None).sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, **TOLERANCES[torch.float32])
    torch.testing.assert_close(w.grad.double(), wd.grad, **TOLERANCES[torch.float32])


def test_parameters_in_float32_with_half_input():
    """Mixed precision: bfloat16 activations, float32 parameters; y in bfloat16, grads in float32."""
    torch.manual_seed(0)
    x = torch.randn(9, 768).bfloat16()
    run_and_compare(x, torch.randn(768), torch.randn(768), dtype=torch.bfloat16)


def test_large_common_offset():
    """Rows of 1e4 +- 1: float32 keeps ~3 decimal digits of the spread, E[x^2] - E[x]^2 keeps none."""
    torch.manual_seed(0)
    x = 1e4 + torch.randn(8, 4096)
    w, b = torch.randn(4096), torch.randn(4096)
    with kernels.use_backend("triton"):
        y = kernels.layer_norm(x, w, b)
    ref = layer_norm_reference(x.double(), w.double(), b.double())
    torch.testing.assert_close(y.double(), ref, **TOLERANCES[torch.float32])
    mean = x.mean(-1, keepdim=True)
    naive_var = (x * x).mean(-1, keepdim=True) - mean * mean
    naive = (x - mean) / torch.sqrt(naive_var + 1e-5) * w + b
    assert not torch.allclose(naive.double(), ref, rtol=0.1, atol=0.1)  # negative variances, NaN rows


def test_large_common_offset_backward():
    """The backward recomputes the centred rows from x, so rows of 1e4 + N(0, 1) get gradients within
    float32 rounding of float64 (1e-6 of their largest entry). F.layer_norm (on the CPU, the same
    baseline on every machine) subtracts a float32 mean, a multiple of 2**-10 there, and misses by
    more than 1e-4: the check can fail."""
    torch.manual_seed(1)
    cpu = torch.device("cpu")
    inputs = (1e4 + torch.randn(8, 1024, device=cpu), torch.randn(1024, device=cpu), torch.randn(1024, device=cpu))
    dy = torch.randn(8, 1024, device=cpu)

    def grads(fn, dtype, device=cpu):
        leaves = [t.to(device, dtype).requires_grad_() for t in inputs]
        fn(*leaves).backward(dy.to(device, dtype))
        return [t.grad.double().cpu() for t in leaves]

    ref = grads(layer_norm_reference, torch.float64)
    with kernels.use_backend("triton"):
        ours = grads(kernels.layer_norm, torch.float32, torch.get_default_device())
    eager = grads(lambda x, w, b: F.layer_norm(x, (1024,), w, b), torch.float32)
    for name, got, base, want in zip(("dx", "dweight", "dbias"), ours, eager, ref):
        scale = want.abs().max()
        assert (got - want).abs().max() <= 1e-6 * scale, name
        if name != "dbias":  # a plain sum of dy: no mean involved
            assert (base - want).abs().max() > 1e-4 * scale, name


def test_backward_is_deterministic():
    torch.manual_seed(0)
    x = torch.randn(100, 768, requires_grad=True)  # 25 row tiles: several per backward program
    w = torch.randn(768, requires_grad=True)
    b = torch.randn(768, requires_grad=True)
    dy = torch.randn(100, 768)
    grads = []
    with kernels.use_backend("triton"):
        for _ in range(2):
            x.grad = w.grad = b.grad = None
            kernels.layer_norm(x, w, b).backward(dy)
            grads.append((x.grad.clone(), w.grad.clone(), b.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy, under the interpreter
def test_nan_and_inf_propagate_like_eager():
    x = torch.randn(4, 64)
    x[0, 5] = float("nan")
    x[1, 0] = float("inf")
    x[2, 63] = float("-inf")
    w, b = torch.randn(64), torch.randn(64)
    with kernels.use_backend("triton"):
        y = kernels.layer_norm(x, w, b)
    torch.testing.assert_close(y, F.layer_norm(x, (64,), w, b), equal_nan=True, **TOLERANCES[torch.float32])
    assert torch.isfinite(y[3]).all() and y[:3].isnan().all()


def test_row_too_long_is_refused_on_triton_and_eager_elsewhere():
    n = MAX_ROW_LENGTH + 1
    x = torch.randn(2, n)
    with kernels.use_backend("triton"), pytest.raises(kernels.BackendError, match=f"row length {n}"):
        kernels.layer_norm(x, None, None)
    with kernels.use_backend("triton"):
        assert not kernels.explain("layer_norm", x, None, None).use_triton
    torch.testing.assert_close(kernels.layer_norm(x, None, None), F.layer_norm(x, (n,)))  # "auto"


def test_unsupported_dtype_is_refused():
    x = torch.randn(2, 8, dtype=torch.float64)
    with kernels.use_backend("triton"), pytest.raises(kernels.BackendError, match="float64"):
        kernels.layer_norm(x, None, None)


def test_parameter_shape_mismatch():
    with pytest.raises(ValueError, match=r"weight has shape \(7,\), expected \(8,\)"):
        kernels.layer_norm(torch.randn(2, 8), torch.randn(7), None)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(0, 40), n=st.integers(1, 300), dtype=st.sampled_from(DTYPES),
       has_weight=st.booleans(), has_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_random_shapes(rows, n, dtype, has_weight, has_bias, seed):
    torch.manual_seed(seed)
    run_and_compare(torch.randn(rows, n).to(dtype), torch.randn(n).to(dtype) if has_weight else None,
                    torch.randn(n).to(dtype) if has_bias else None)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_out_dtype_writes_half_from_float32(out_dtype):
    """A float32 residual stream normalised straight into the autocast dtype: y is out_dtype and
    within its rounding of the float64 reference; dx stays float32, as exact as without out_dtype."""
    torch.manual_seed(0)
    x = torch.randn(3, 7, 768, requires_grad=True)
    weight, bias = torch.randn(768, requires_grad=True), torch.randn(768, requires_grad=True)
    with kernels.use_backend("triton"):
        y = kernels.layer_norm(x, weight, bias, 1e-5, out_dtype)
    assert y.dtype == out_dtype
    dy = torch.randn(y.shape).to(out_dtype)
    y.backward(dy)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    ref = layer_norm_reference(*leaves64)
    ref.backward(dy.double())
    torch.testing.assert_close(y.double(), ref.detach(), **TOLERANCES[out_dtype])
    assert x.grad.dtype == torch.float32
    for got, want in zip((x.grad, weight.grad, bias.grad), (t.grad for t in leaves64)):
        torch.testing.assert_close(got.double(), want, **TOLERANCES[torch.float32])
    with kernels.use_backend("torch"):
        eager = kernels.layer_norm(x, weight, bias, 1e-5, out_dtype)
    assert eager.dtype == out_dtype
    torch.testing.assert_close(y, eager, **TOLERANCES[out_dtype])
