"""The Triton LayerNorm (under the interpreter on CPU) against a float64 reference.

The reference runs in float64 on the very values the kernel reads, so the kernel's error is its float32
arithmetic plus one rounding of each output to its dtype: kernel_testing's default tolerances. Under the
interpreter, bfloat16 outputs are rounded to nearest as on a GPU (``interpreter_bf16_rounding``).
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import DTYPES, assert_close, forward_backward, run_and_compare, tolerance

from gptfast import kernels
from gptfast.kernels.layer_norm import MAX_ROW_LENGTH, layer_norm_reference

layer_norm = importlib.import_module("gptfast.kernels.layer_norm")  # the module, not the public op

pytestmark = pytest.mark.usefixtures("on_kernel_device", "interpreter_bf16_rounding")  # the GPU when there is one


def compare_layer_norm(x, weight, bias, eps=1e-5, out_dtype=None, grad_output=None, against_eager=False):
    """Forward and backward on "triton" against the float64 reference: y (x's dtype unless out_dtype)
    and each gradient within its dtype's tolerance, and (against_eager) of the eager error. Returns y."""
    def op(*leaves):
        return kernels.layer_norm(*leaves, eps, out_dtype)

    y, _ = run_and_compare(op, lambda *leaves: layer_norm_reference(*leaves, eps), dict(x=x, weight=weight, bias=bias),
                           grad_output, out_dtype=out_dtype, eager=op if against_eager else None)
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 768, 1000, 1280, 1600, 4096, 8192])
def test_matches_reference(n, dtype):
    torch.manual_seed(n)
    x = torch.randn(2, 3, n).to(dtype)  # leading (batch, seq) dimensions
    compare_layer_norm(x, torch.randn(n).to(dtype), torch.randn(n).to(dtype), against_eager=True)


# Rows whose last chunk runs past the row's end, in every number of chunks the launcher cuts rows
# into (forward / backward): 3: one chunk of 4; 300: 2 x 256; 700: 3 x 256; 1000: 4 x 256 / 2 x 512;
# 1300: 6 x 256 / 3 x 512; 1600: 7 x 256 / 2 x 1024; 2500: 5 x 512 / 3 x 1024; 5000: 5 x 1024 /
# 3 x 2048; 8191: 8 x 1024 / 2 x 4096 (test_matches_reference has rows that fill their chunks).
ODD_WIDTHS = [3, 300, 700, 1000, 1300, 1600, 2500, 5000, 8191]


@pytest.mark.parametrize("n", ODD_WIDTHS)
@pytest.mark.parametrize("dtype, has_weight, has_bias", [(torch.float32, True, True), (torch.float32, False, False),
                                                         (torch.bfloat16, True, False)])
def test_odd_widths_match_reference(n, dtype, has_weight, has_bias):
    torch.manual_seed(n)
    x = 3.0 + torch.randn(3, n)  # an offset: the columns past the row's end must not enter the mean
    compare_layer_norm(x.to(dtype), torch.randn(n).to(dtype) if has_weight else None,
                       torch.randn(n).to(dtype) if has_bias else None)


def test_block_configs_cut_rows_into_whole_chunks():
    """Every row length gets chunks of which only the last runs past the row's end (what the kernels'
    _centered assumes), less than a chunk of idle columns, a 128-bit load of 16-bit values per thread
    and chunk once rows pass 256 columns, and at most _MOST_CHUNKS chunks per thread; ODD_WIDTHS
    reach every number of chunks with the last one partly past the row's end."""
    for backward in (False, True):
        layouts = set()
        for n in range(1, MAX_ROW_LENGTH + 1):
            config = layer_norm.block_config(n, backward)
            block_m, block_n, num_warps, chunk = layer_norm._tile(config, n)
            assert (block_m, block_n, num_warps) == (config.block_m, config.block_n, config.num_warps)  # as compiled
            assert block_n % chunk == 0 and block_n - chunk < n <= block_n, (n, backward)
            if n > 256:
                assert block_m * chunk // (32 * num_warps) == 8, (n, backward)
                assert block_n // chunk <= layer_norm._MOST_CHUNKS[backward], (n, backward)
            if n < block_n:
                layouts.add(block_n // chunk)
        odd = {block_n // chunk for n in ODD_WIDTHS
               for _, block_n, _, chunk in [layer_norm._tile(layer_norm.block_config(n, backward), n)] if n < block_n}
        assert layouts <= odd, backward


@pytest.mark.parametrize("rows", [0, 1, 37])
@pytest.mark.parametrize("has_weight, has_bias", [(True, True), (True, False), (False, True), (False, False)])
def test_row_counts_and_optional_parameters(rows, has_weight, has_bias):
    torch.manual_seed(rows)
    n = 200
    compare_layer_norm(torch.randn(rows, n), torch.randn(n) if has_weight else None,
                       torch.randn(n) if has_bias else None)


def test_non_contiguous_inputs():
    torch.manual_seed(0)
    n = 96
    transposed = torch.randn(n, 40).t()  # column stride != 1: copied to rows
    padded_rows = torch.randn(40, n + 32)[:, :n]  # row stride > n: read in place
    batch_major = torch.randn(5, 8, n).transpose(0, 1)  # leading dimensions that do not flatten to a view
    for x in (transposed, padded_rows, batch_major):
        compare_layer_norm(x, torch.randn(n), torch.randn(n))
    compare_layer_norm(torch.randn(7, n), torch.randn(2 * n)[::2], torch.randn(n, 3)[:, 1])  # strided parameters


def test_gradient_with_stride_zero_rows():
    """``y.sum()`` sends back an expanded (stride 0) gradient; it must be read as such."""
    compare_layer_norm(torch.randn(6, 50), torch.randn(50), None, grad_output=torch.ones(1, 1).expand(6, 50))


def test_parameters_in_float32_with_half_input():
    """Mixed precision: bfloat16 activations, float32 parameters; y in bfloat16, grads in float32."""
    torch.manual_seed(0)
    x = torch.randn(9, 768).bfloat16()
    compare_layer_norm(x, torch.randn(768), torch.randn(768))


def test_large_common_offset():
    """Rows of 1e4 +- 1: float32 keeps ~3 decimal digits of the spread, E[x^2] - E[x]^2 keeps none."""
    torch.manual_seed(0)
    x = 1e4 + torch.randn(8, 4096)
    w, b = torch.randn(4096), torch.randn(4096)
    with kernels.use_backend("triton"):
        y = kernels.layer_norm(x, w, b)
    ref = layer_norm_reference(x.double(), w.double(), b.double())
    assert_close("y", y, ref)
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
    inputs = dict(x=torch.randn(100, 768), weight=torch.randn(768), bias=torch.randn(768))  # 25 row tiles
    dy = torch.randn(100, 768)
    first, again = (forward_backward(kernels.layer_norm, inputs, dy)[1] for _ in range(2))
    assert all(torch.equal(first[name], again[name]) for name in inputs)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy, under the interpreter
def test_nan_and_inf_propagate_like_eager():
    x = torch.randn(4, 64)
    x[0, 5] = float("nan")
    x[1, 0] = float("inf")
    x[2, 63] = float("-inf")
    w, b = torch.randn(64), torch.randn(64)
    with kernels.use_backend("triton"):
        y = kernels.layer_norm(x, w, b)
    torch.testing.assert_close(y, F.layer_norm(x, (64,), w, b), equal_nan=True, **tolerance(torch.float32))
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
    compare_layer_norm(torch.randn(rows, n).to(dtype), torch.randn(n).to(dtype) if has_weight else None,
                       torch.randn(n).to(dtype) if has_bias else None)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_out_dtype_writes_half_from_float32(out_dtype):
    """A float32 residual stream normalised straight into the autocast dtype: y is out_dtype and
    within its rounding of the float64 reference; dx stays float32, as exact as without out_dtype."""
    torch.manual_seed(0)
    x, weight, bias = torch.randn(3, 7, 768), torch.randn(768), torch.randn(768)
    y = compare_layer_norm(x, weight, bias, out_dtype=out_dtype)
    with kernels.use_backend("torch"):
        eager = kernels.layer_norm(x, weight, bias, 1e-5, out_dtype)
    assert eager.dtype == out_dtype
    torch.testing.assert_close(y, eager, **tolerance(out_dtype))


def opcheck_cases():
    """(custom operator, arguments) for tests/test_opcheck.py: the forward with and without weight and bias,
    in another out_dtype, and the backward."""
    x, w, b = torch.randn(5, 37), torch.randn(37), torch.randn(37)
    y, rstd, _ = layer_norm._forward(x, None, w, b, 1e-5, torch.float32)
    dy = torch.randn_like(y)
    return [(layer_norm._forward, (x.requires_grad_(), None, w.requires_grad_(), b.requires_grad_(), 1e-5,
                                   torch.float32)),
            (layer_norm._forward, (x.detach(), None, None, None, 1e-5, torch.float16)),
            (layer_norm._backward, (dy, x.detach(), w.detach(), True, rstd, None)),
            (layer_norm._backward, (dy, x.detach(), None, False, rstd, None))]
