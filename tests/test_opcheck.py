"""torch.library.opcheck over every custom operator the kernels register: schema, autograd
registration, and the fake implementation (derived from the launcher) against the real one, with
static and dynamic shapes."""

import importlib

import pytest
import torch

pytestmark = pytest.mark.usefixtures("on_kernel_device")

layer_norm = importlib.import_module("gptfast.kernels.layer_norm")
bias_gelu = importlib.import_module("gptfast.kernels.bias_gelu")
cross_entropy = importlib.import_module("gptfast.kernels.cross_entropy")
flash_attention = importlib.import_module("gptfast.kernels.flash_attention")
linear_cross_entropy = importlib.import_module("gptfast.kernels.linear_cross_entropy")


def _layer_norm_cases():
    x, r, w, b = torch.randn(5, 37), torch.randn(5, 37, dtype=torch.bfloat16), torch.randn(37), torch.randn(37)
    y, rstd, _ = layer_norm._forward(x, None, w, b, 1e-5, torch.float32)
    _, rstd_sum, total = layer_norm._forward(x, r, w, b, 1e-5, torch.bfloat16)
    dy = torch.randn_like(y)
    return [(layer_norm._forward, (x.requires_grad_(), None, w.requires_grad_(), b.requires_grad_(), 1e-5,
                                   torch.float32)),
            (layer_norm._forward, (x.detach(), None, None, None, 1e-5, torch.float16)),
            (layer_norm._forward, (x.detach().requires_grad_(), r.requires_grad_(), w.detach(), None, 1e-5,
                                   torch.bfloat16)),
            (layer_norm._backward, (dy, x.detach(), w.detach(), True, rstd, None)),
            (layer_norm._backward, (dy, x.detach(), None, False, rstd, None)),
            (layer_norm._backward, (dy, total, w.detach(), False, rstd_sum, torch.randn_like(total)))]


def _bias_gelu_cases():
    x, b = torch.randn(3, 4, 40), torch.randn(40)
    dy = torch.randn_like(x)
    return [(bias_gelu._forward, (x.requires_grad_(), b.requires_grad_(), "tanh")),
            (bias_gelu._forward, (x.detach(), None, "none")),
            (bias_gelu._backward, (dy, x.detach(), b.detach(), "tanh"))]


def _cross_entropy_cases():
    logits, targets = torch.randn(6, 70), torch.tensor([0, 5, -1, 68, 3, 1])
    loss, stats = cross_entropy._forward(logits, targets, -1, 69, 0.0, 0.0)
    return [(cross_entropy._forward, (logits.requires_grad_(), targets, -1, 69, 0.0, 0.0)),
            (cross_entropy._forward, (logits.detach(), targets, -1, 69, 0.1, 1e-4)),
            (cross_entropy._backward, (torch.rand_like(loss), logits.detach(), targets, stats, -1, 69, 0.1, 1e-4))]


def _linear_cross_entropy_cases():
    hidden, weight, targets = torch.randn(100, 8), torch.randn(40, 8), torch.randint(-1, 33, (100,))
    return [(linear_cross_entropy._fused, (hidden.requires_grad_(), weight.requires_grad_(), targets, -1, 33,
                                           0.0, 0.0, True, 64, torch.float32, use_triton, True))
            for use_triton in (True, False)] + [
            (linear_cross_entropy._fused, (hidden.detach(), weight.detach(), targets, -1, 40, 0.1, 1e-3, False,
                                           64, torch.float32, use_triton, need_grad))
            for use_triton in (True, False) for need_grad in (True, False)]


def _flash_attention_cases():
    q, k, v = (torch.randn(2, 3, 20, 16) for _ in range(3))
    key_start = torch.tensor([0, 5])
    out, lse = flash_attention._forward(q, k, v, True, 0.0, 0.25, None, key_start)
    grad = torch.randn_like(out)
    return [(flash_attention._forward, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), True, 0.0,
                                        0.25, None, key_start)),
            (flash_attention._forward, (q.detach(), k.detach(), v.detach(), False, 0.0, 0.25, None, None)),
            (flash_attention._forward, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), True, 0.0,
                                        0.25, None, None, None, False)),
            *[(flash_attention._backward, (grad, q.detach(), k.detach(), v.detach(), out, lse, True, 0.0, 0.25,
                                           None, key_start, deterministic)) for deterministic in (True, False)]]


CASES = {"layer_norm": _layer_norm_cases, "bias_gelu": _bias_gelu_cases, "cross_entropy": _cross_entropy_cases,
         "linear_cross_entropy": _linear_cross_entropy_cases, "flash_attention": _flash_attention_cases}


@pytest.mark.parametrize("op", CASES)
def test_opcheck(op):
    torch.manual_seed(0)
    for custom_op, args in CASES[op]():
        torch.library.opcheck(custom_op, args)


def test_every_custom_op_is_checked():
    """A new operator in the gptfast namespace must get a case here."""
    registered = {name for name in torch.ops.gptfast}
    checked = {custom_op._name for cases in CASES.values() for custom_op, _ in cases()}
    assert registered == checked
