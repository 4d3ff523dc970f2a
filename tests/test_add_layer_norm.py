"""add_layer_norm: the residual add fused into LayerNorm, forward and backward, against float64."""

import importlib

import pytest
import torch
from kernel_testing import assert_close

from gptfast import kernels
from gptfast.model import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("on_kernel_device")
layer_norm = importlib.import_module("gptfast.kernels.layer_norm")


def _reference(x, branch, weight, bias, eps=1e-5):
    total = x + branch
    return total, layer_norm.layer_norm_reference(total, weight, bias, eps)


def _run(x, branch, weight, bias, out_dtype=None, backend="triton"):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, branch, weight, bias)]
    with kernels.use_backend(backend):
        total, y = kernels.add_layer_norm(*leaves, out_dtype=out_dtype)
    return total, y, leaves


@pytest.mark.parametrize("rows, n", [(1, 1), (7, 37), (33, 768), (4, 1000), (3, 1600), (3, 4100), (2, 8191)])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32, None),
                                    (torch.float32, torch.bfloat16, torch.bfloat16),
                                    (torch.float16, torch.float16, None), (torch.bfloat16, torch.bfloat16, None)])
def test_matches_float64(rows, n, dtypes, interpreter_bf16_rounding):
    x_dtype, branch_dtype, out_dtype = dtypes
    torch.manual_seed(rows * n)
    x, branch = torch.randn(rows, n).to(x_dtype), torch.randn(rows, n).to(branch_dtype)
    weight, bias = torch.randn(n), torch.randn(n)
    total, y, leaves = _run(x, branch, weight, bias, out_dtype)
    want_total, want_y = _reference(*(t.double().requires_grad_() for t in (x, branch, weight, bias)))
    assert total.dtype == torch.promote_types(x_dtype, branch_dtype)
    assert y.dtype == (out_dtype or total.dtype)
    # The sum is rounded once to its dtype before it is normalised: compare y with the reference of
    # that rounded sum, and the sum with the exact one.
    assert_close("x + branch", total, want_total.detach())
    want_y = layer_norm.layer_norm_reference(total.detach().double(), weight.double(), bias.double())
    assert_close("y", y, want_y)
    # Upstream gradients representable in the outputs' dtypes, so both sides receive the same ones.
    grad_y, grad_total = torch.randn(rows, n).to(y.dtype), torch.randn(rows, n).to(total.dtype)
    (y.double() * grad_y.double()).sum().add((total.double() * grad_total.double()).sum()).backward()
    refs = [t.detach().double().requires_grad_() for t in (total, weight, bias)]
    ref_y = layer_norm.layer_norm_reference(*refs)
    ((ref_y * grad_y.double()).sum() + (refs[0] * grad_total.double()).sum()).backward()
    for name, leaf, want in (("dx", leaves[0], refs[0].grad), ("dbranch", leaves[1], refs[0].grad),
                             ("dweight", leaves[2], refs[1].grad), ("dbias", leaves[3], refs[2].grad)):
        assert leaf.grad.dtype == leaf.dtype, name
        assert_close(name, leaf.grad, want)


def test_without_weight_or_bias_and_strided_inputs():
    x = torch.randn(6, 80)[:, ::2]  # a column stride of 2: copied into rows by the launcher
    branch = torch.randn(6, 40)
    for weight, bias in ((None, None), (torch.randn(40), None), (None, torch.randn(40))):
        total, y, _ = _run(x, branch, weight, bias)
        want_total, want_y = _reference(x.double(), branch.double(), *(None if t is None else t.double()
                                                                        for t in (weight, bias)))
        assert_close("x + branch", total, want_total)
        assert_close("y", y, want_y)


def test_equals_the_eager_path_and_is_deterministic():
    torch.manual_seed(0)
    x, branch, weight, bias = torch.randn(50, 96), torch.randn(50, 96), torch.randn(96), torch.randn(96)
    first = _run(x, branch, weight, bias)
    second = _run(x, branch, weight, bias)
    eager = _run(x, branch, weight, bias, backend="torch")
    for a, b in zip(first[:2], second[:2]):
        assert torch.equal(a, b)
    torch.testing.assert_close(first[1], eager[1], rtol=1e-5, atol=1e-5)
    (first[1].sum() + first[0].sum()).backward()
    (second[1].sum() + second[0].sum()).backward()
    for a, b in zip(first[2], second[2]):
        assert torch.equal(a.grad, b.grad)  # fixed-order partial sums: bit-identical gradients


def test_bad_inputs_name_the_problem():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"add_layer_norm: branch has shape \(4, 7\), expected x's shape \(4, 8\)"):
        kernels.add_layer_norm(x, torch.randn(4, 7), None, None)
    with pytest.raises(ValueError, match=r"add_layer_norm: weight has shape \(7,\)"):
        kernels.add_layer_norm(x, x, torch.randn(7), None)
    with kernels.use_backend("triton"), pytest.raises(kernels.BackendError, match="branch has dtype torch.float64"):
        kernels.add_layer_norm(x, x.double(), None, None)
    assert kernels.explain(kernels.add_layer_norm, x, x, None, None).op == "add_layer_norm"


def test_compiles_fullgraph():
    x, branch, weight = torch.randn(5, 64, requires_grad=True), torch.randn(5, 64), torch.randn(64)

    def step(x, branch):
        total, y = kernels.add_layer_norm(x, branch, weight, None)
        return (total * y).sum()

    with kernels.use_backend("triton"):
        compiled = torch.compile(step, fullgraph=True)(x, branch)
        eager = step(x, branch)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_model_with_fused_residual_adds_equals_the_plain_blocks(backend, monkeypatch):
    """The model adds every residual inside the next LayerNorm; with add_layer_norm replaced by the
    plain add and layer_norm, loss and gradients agree."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=96, n_layer=3, n_head=2, n_embd=32, context_length=16, fused_lm_head=False)
    model = GPT(config)
    idx, targets = torch.randint(0, 96, (2, 2, 16))

    def loss_and_grads():
        model.zero_grad()
        with kernels.use_backend(backend):
            _, loss = model(idx, targets)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    fused = loss_and_grads()

    def unfused(x, branch, weight, bias, eps=1e-5, out_dtype=None):
        total = x + branch
        return total, kernels.layer_norm(total, weight, bias, eps, out_dtype)

    monkeypatch.setattr(kernels, "add_layer_norm", unfused)
    plain = loss_and_grads()
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-6)
    for got, want in zip(fused[1], plain[1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def opcheck_cases():
    """(custom operator, arguments) for tests/test_opcheck.py: the forward of x + branch in mixed dtypes,
    and the backward that adds the sum's own gradient."""
    x, r, w = torch.randn(5, 37), torch.randn(5, 37, dtype=torch.bfloat16), torch.randn(37)
    _, rstd_sum, total = layer_norm._forward(x, r, w, None, 1e-5, torch.bfloat16)
    return [(layer_norm._forward, (x.requires_grad_(), r.requires_grad_(), w, None, 1e-5, torch.bfloat16)),
            (layer_norm._backward, (torch.randn(5, 37, dtype=torch.bfloat16), total, w, False, rstd_sum,
                                    torch.randn_like(total)))]
