"""The Triton bias + GELU (under the interpreter on CPU) against a float64 reference, and both
kernels together in a small module, eager and under ``torch.compile(fullgraph=True)``.

Tolerances: as for LayerNorm, float32 arithmetic plus one rounding of each output to its dtype
(kernel_testing's default), bfloat16 rounded to nearest under the interpreter as on a GPU.
"""

import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import DTYPES, forward_backward, run_and_compare, tolerance

from gptfast import kernels
from gptfast.kernels.bias_gelu import bias_gelu_reference

# Under the interpreter numpy warns where exp overflows to inf in GELU's tails; the results are right.
pytestmark = [pytest.mark.usefixtures("on_kernel_device", "interpreter_bf16_rounding"),  # the GPU when there is one
              pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")]


def compare_bias_gelu(x, bias, approximate="tanh", against_eager=False):
    """Forward and backward on "triton" against the float64 reference: y (x's dtype, whatever the
    bias's) and each gradient within its dtype's tolerance, and (against_eager) of the eager error."""
    def op(x, bias):
        return kernels.bias_gelu(x, bias, approximate)

    run_and_compare(op, lambda x, bias: bias_gelu_reference(x, bias, approximate), dict(x=x, bias=bias),
                    eager=op if against_eager else None)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 768, 1000, 3072, 4096, 5120, 6400])
def test_matches_reference(n, dtype, approximate):
    torch.manual_seed(n)
    x = (3 * torch.randn(2, 3, n)).to(dtype)  # leading (batch, seq) dimensions; GELU's bend and tails
    compare_bias_gelu(x, torch.randn(n).to(dtype), approximate, against_eager=True)


@pytest.mark.parametrize("rows", [0, 1, 37])
@pytest.mark.parametrize("has_bias", [True, False])
def test_row_counts_and_optional_bias(rows, has_bias):
    torch.manual_seed(rows)
    compare_bias_gelu(torch.randn(rows, 300), torch.randn(300) if has_bias else None)


def test_non_contiguous_inputs():
    torch.manual_seed(0)
    n = 96
    for x in (torch.randn(n, 40).t(), torch.randn(40, n + 32)[:, :n], torch.randn(5, 8, n).transpose(0, 1)):
        compare_bias_gelu(x, torch.randn(n))
    compare_bias_gelu(torch.randn(7, n), torch.randn(2 * n)[::2])  # a strided bias


def test_half_input_with_float32_bias_promotes_like_eager():
    torch.manual_seed(0)
    compare_bias_gelu(torch.randn(9, 768).bfloat16(), torch.randn(768))


def test_bias_gradient_is_deterministic():
    torch.manual_seed(0)
    inputs = dict(x=torch.randn(200, 512), bias=torch.randn(512))  # 13 row tiles for 8 row programs
    dy = torch.randn(200, 512)
    first, again = (forward_backward(kernels.bias_gelu, inputs, dy)[1] for _ in range(2))
    assert all(torch.equal(first[name], again[name]) for name in inputs)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_nan_and_inf_propagate(approximate):
    """NaN and huge values match eager; the infinities are checked against fixed values, because
    eager's own result there depends on the CPU's vector instructions (its erf GELU of +inf is inf
    on some machines and NaN on others)."""
    finite = torch.tensor([float("nan"), 1e30, -1e30, 0.0, -3.0, 3.0])
    x = torch.cat([finite, torch.tensor([float("inf"), float("-inf")])]).repeat(3, 1).requires_grad_()
    with kernels.use_backend("triton"):
        y = kernels.bias_gelu(x, None, approximate)
    y.backward(torch.ones_like(y))
    xe = finite.repeat(3, 1).requires_grad_()
    ye = F.gelu(xe, approximate=approximate)
    ye.backward(torch.ones_like(ye))
    torch.testing.assert_close(y[:, :6], ye, equal_nan=True, **tolerance(torch.float32))
    torch.testing.assert_close(x.grad[:, :6], xe.grad, equal_nan=True, **tolerance(torch.float32))
    # GELU(+inf) = inf * Phi(inf) = inf; -inf * Phi(-inf) is -inf * 0: NaN, as is either gradient.
    assert (y[:, 6] == float("inf")).all() and y[:, 7].isnan().all() and x.grad[:, 6:].isnan().all()


def test_unsupported_dtype_is_refused():
    x = torch.randn(2, 8, dtype=torch.float64)
    with kernels.use_backend("triton"), pytest.raises(kernels.BackendError, match="float64"):
        kernels.bias_gelu(x, None)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"bias has shape \(7,\), expected \(8,\)"):
        kernels.bias_gelu(torch.randn(2, 8), torch.randn(7))
    with pytest.raises(ValueError, match="approximate must be one of"):
        kernels.bias_gelu(torch.randn(2, 8), None, approximate="erf")


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(0, 40), n=st.integers(1, 600), dtype=st.sampled_from(DTYPES),
       approximate=st.sampled_from(["tanh", "none"]), has_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_random_shapes(rows, n, dtype, approximate, has_bias, seed):
    torch.manual_seed(seed)
    compare_bias_gelu(torch.randn(rows, n).to(dtype), torch.randn(n).to(dtype) if has_bias else None, approximate)


class NormGelu(nn.Module):
    """LayerNorm -> Linear (bias left to the fused op) -> bias + GELU: the model's two kernels."""

    def __init__(self, n: int, hidden: int):
        super().__init__()
        self.ln_weight = nn.Parameter(1 + 0.1 * torch.randn(n))
        self.ln_bias = nn.Parameter(0.1 * torch.randn(n))
        self.fc = nn.Linear(n, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = kernels.layer_norm(x, self.ln_weight, self.ln_bias)
        return kernels.bias_gelu(F.linear(h, self.fc.weight), self.fc.bias)


def loss_and_grads(module: nn.Module, x: torch.Tensor, backend: str):
    module.zero_grad()
    with kernels.use_backend(backend):
        loss = module(x).square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in module.parameters()]


def test_module_triton_matches_torch():
    torch.manual_seed(0)
    module, x = NormGelu(48, 192), torch.randn(2, 7, 48)
    loss, grads = loss_and_grads(module, x, "triton")
    want_loss, want_grads = loss_and_grads(module, x, "torch")
    torch.testing.assert_close(loss, want_loss)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want)


def test_torch_compile_fullgraph():
    """The custom operators compile with fullgraph=True and give the eager results, on the "triton"
    backend (the kernels, interpreted) and on "torch" (the eager fallbacks)."""
    torch.manual_seed(0)
    module, x = NormGelu(48, 192), torch.randn(2, 7, 48)
    want_loss, want_grads = loss_and_grads(module, x, "torch")
    compiled = torch.compile(module, fullgraph=True)
    for backend in ("triton", "torch"):
        loss, grads = loss_and_grads(compiled, x, backend)
        torch.testing.assert_close(loss, want_loss)
        for got, want in zip(grads, want_grads):
            torch.testing.assert_close(got, want)
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float32_bias_keeps_half_activations_half(backend):
    """bf16 activations with a float32 bias (autocast training) give bf16, as a linear layer's bias
    add does under autocast, on both paths; the bias gradient stays float32."""
    x = torch.randn(5, 96).to(torch.bfloat16).requires_grad_()
    bias = torch.randn(96, requires_grad=True)
    with kernels.use_backend(backend):
        y = kernels.bias_gelu(x, bias)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and bias.grad.dtype == torch.float32
    ref = bias_gelu_reference(x.detach().double(), bias.detach().double())
    torch.testing.assert_close(y.double(), ref, **tolerance(torch.bfloat16))


def opcheck_cases():
    """(custom operator, arguments) for tests/test_opcheck.py."""
    bias_gelu = importlib.import_module("gptfast.kernels.bias_gelu")  # the module, not the public op
    x, b = torch.randn(3, 4, 40), torch.randn(40)
    dy = torch.randn_like(x)
    return [(bias_gelu._forward, (x.requires_grad_(), b.requires_grad_(), "tanh")),
            (bias_gelu._forward, (x.detach(), None, "none")),
            (bias_gelu._backward, (dy, x.detach(), b.detach(), "tanh"))]
