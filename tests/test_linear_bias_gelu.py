"""The persistent matmul with bias + GELU in its epilogue (``linear_bias_gelu``), the backward's matmul
with GELU's gradient in its epilogue (``matmul_gelu_grad``) and the MLP that uses both (``mlp_gelu``),
under the interpreter on CPU, against float64 references at sizes no block divides.

Two read paths: TMA tensor descriptors (sm_90; the interpreter runs them) and pointer loads (sm_80, or
a base TMA cannot address), chosen here by targeting an sm_90 or an sm_80 GPU. Row lengths that are
not multiples of 16 bytes take the eager path. Tolerances: kernel_testing's ``linear_bias_gelu`` entry.
"""

import contextlib
import importlib

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import assert_close, run_and_compare

from gptfast import kernels
from gptfast.kernels import common
from gptfast.kernels.bias_gelu import bias_gelu_reference
from gptfast.model import MLP, GPTConfig

lbg = importlib.import_module("gptfast.kernels.linear_bias_gelu")  # the module, not the public op

pytestmark = [pytest.mark.usefixtures("on_kernel_device", "interpreter_bf16_rounding", "interpreter_bf16_dot"),
              pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")]

DTYPES = [torch.float32, torch.bfloat16]
# (rows, k, n), none a multiple of the 128 x 128 x 64 (float32: x 32) blocks; k and n of 16-byte rows.
SHAPES = {"tma": (70, 72, 200), "pointers": (37, 40, 88)}
ARCHS = {"tma": 90, "pointers": 80}


def on_path(path: str) -> contextlib.AbstractContextManager:
    """Launches configured for the GPU whose read path is ``path`` (four SMs: several tiles per program)."""
    return common.targeting(common.GPU(ARCHS[path], 4, 232448))


def linear_inputs(rows, k, n, dtype, seed=0):
    torch.manual_seed(seed)
    return dict(x=torch.randn(rows, k).to(dtype), w=(k**-0.5 * torch.randn(n, k)).to(dtype),
                b=torch.randn(n).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", SHAPES)
def test_linear_bias_gelu_matches_reference(path, dtype):
    inputs = linear_inputs(*SHAPES[path], dtype)
    with on_path(path):
        assert lbg.uses_tma(inputs["x"], inputs["w"]) == (path == "tma")
        run_and_compare(kernels.linear_bias_gelu, lbg.linear_bias_gelu_reference, inputs,
                        eager=kernels.linear_bias_gelu, output_tolerance="linear_bias_gelu",
                        gradient_tolerance="linear_bias_gelu")


def mlp_reference(x, w_fc, b_fc, w_proj, b_proj):
    return F.linear(bias_gelu_reference(x @ w_fc.T, b_fc), w_proj, b_proj)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", SHAPES)
def test_mlp_gelu_matches_reference(path, dtype):
    """The backward's first matmul is matmul_gelu_grad: dout (rows, k) @ w_proj (k, n), aligned or not."""
    rows, k, n = SHAPES[path]
    inputs = linear_inputs(rows, k, n, dtype, seed=1)
    inputs = dict(x=inputs["x"], w_fc=inputs["w"], b_fc=inputs["b"],
                  w_proj=(n**-0.5 * torch.randn(k, n)).to(dtype), b_proj=torch.randn(k).to(dtype))
    with on_path(path):
        run_and_compare(lbg.mlp_gelu, mlp_reference, inputs, eager=lbg.mlp_gelu,
                        output_tolerance="linear_bias_gelu", gradient_tolerance="linear_bias_gelu")


@pytest.mark.parametrize("path", SHAPES)
def test_matmul_gelu_grad_matches_reference(path):
    rows, k, n = SHAPES[path]
    torch.manual_seed(2)
    dy, w2, pre = torch.randn(rows, k), torch.randn(k, n), 3 * torch.randn(rows, n)  # GELU's bend and tails
    with on_path(path):
        assert lbg.uses_tma(dy, w2) == (path == "tma")
        got = lbg.matmul_gelu_grad(dy, w2, pre)
    at = pre.double().requires_grad_()
    bias_gelu_reference(at, None).backward(dy.double() @ w2.double())
    assert_close("dpre", got, at.grad, "linear_bias_gelu")


def test_autocast_bf16_with_float32_weights():
    """Under autocast the matmuls run in its dtype (as F.linear's would); the float32 bias is added in
    float32 and every gradient keeps its parameter's dtype."""
    inputs = linear_inputs(9, 24, 40, torch.float32)
    leaves = {name: t.requires_grad_() for name, t in inputs.items()}
    device = inputs["x"].device.type
    with kernels.use_backend("triton"), torch.autocast(device, dtype=torch.bfloat16):
        y = kernels.linear_bias_gelu(*leaves.values())
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(t.grad.dtype == torch.float32 for t in leaves.values())
    want = lbg.linear_bias_gelu_reference(*(t.detach().bfloat16().double() for t in leaves.values()))
    assert_close("output", y, want, "linear_bias_gelu")


def test_eager_fallback_and_leading_dimensions():
    """The "torch" backend is F.linear then bias_gelu; the kernel keeps x's leading dimensions."""
    inputs = linear_inputs(2 * 5, 16, 24, torch.float32)
    x = inputs["x"].view(2, 5, 16)
    with kernels.use_backend("torch"):
        eager = kernels.linear_bias_gelu(x, inputs["w"], inputs["b"])
    with kernels.use_backend("triton"):
        fused = kernels.linear_bias_gelu(x, inputs["w"], inputs["b"])
    assert fused.shape == eager.shape == (2, 5, 24)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"linear_bias_gelu: weight has shape \(8, 3\), expected \(N, 4\)"):
        kernels.linear_bias_gelu(torch.randn(2, 4), torch.randn(8, 3), None)
    with pytest.raises(ValueError, match=r"mlp_gelu: bias has shape \(5,\), expected \(4,\)"):
        lbg.mlp_gelu(torch.randn(2, 4), torch.randn(8, 4), None, torch.randn(4, 8), torch.randn(5))
    with kernels.use_backend("triton"), pytest.raises(kernels.BackendError, match="float64"):
        kernels.linear_bias_gelu(torch.randn(2, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64), None)
    with kernels.use_backend("triton"), pytest.raises(kernels.BackendError, match="out features 7 x 2 bytes"):
        kernels.linear_bias_gelu(torch.randn(2, 8).bfloat16(), torch.randn(7, 8).bfloat16(), None)


def test_the_model_uses_it_only_where_measured_faster(monkeypatch):
    """No GPU run has measured it yet: the table is empty, so GPT-2's MLP keeps cuBLAS + bias_gelu. Where
    the table says faster, the model's MLP runs mlp_gelu (here chosen as a benchmark does, on the
    interpreted kernels), and choosing False keeps it off."""
    assert not lbg.MEASURED_FASTER
    mlp = MLP(GPTConfig(n_layer=1, n_head=2, n_embd=32, context_length=8, vocab_size=16))
    x = torch.randn(2, 3, 32)
    want = mlp.c_proj(F.gelu(mlp.c_fc(x), approximate="tanh"))
    calls = []
    apply = lbg._MlpGelu.apply
    monkeypatch.setattr(lbg._MlpGelu, "apply", staticmethod(lambda *args: calls.append(len(args)) or apply(*args)))
    assert not lbg.mlp_gelu_faster(x, 32)
    mlp(x)
    with kernels.use_backend("triton"), lbg.choose_mlp_gelu(True):
        fused = mlp(x)
    assert calls == [5]
    with lbg.choose_mlp_gelu(False):
        mlp(x)
    assert calls == [5]
    torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-5)


def opcheck_cases():
    """(custom operator, arguments) for tests/test_opcheck.py."""
    x, w, b = torch.randn(6, 16), torch.randn(24, 16), torch.randn(24)
    return [(lbg._forward, (x, w, b)), (lbg._forward, (x, w, None)),
            (lbg._gelu_grad, (torch.randn(6, 16), torch.randn(16, 24), torch.randn(6, 24)))]
