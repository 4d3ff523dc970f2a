"""What the kernel tests share: one table of tolerances, and one check of an op against its float64
reference, forward and backward, on the same inputs.

Tolerances, as ``torch.testing.assert_close`` keywords, are looked up by the dtype of the tensor
compared. The default entry is float32 arithmetic plus one rounding of the result to its dtype, a
relative error of at most 2**-11 (float16) or 2**-8 (bfloat16), given twice that room, with an absolute
floor for values near zero; float32's is float32 arithmetic in another order than the reference's. For
bfloat16 it takes the kernel tests' ``interpreter_bf16_rounding`` (conftest.py): the stock interpreter
truncates where a GPU rounds to nearest, twice the error. An op whose error differs has a named entry
of its own, which says why.
"""

from collections.abc import Callable

import torch

from gptfast import kernels

TOLERANCES = {
    "default": {
        torch.float32: dict(rtol=1e-5, atol=1e-5),
        torch.float16: dict(rtol=1e-3, atol=1e-3),
        torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
    },
    # The loss is float32 arithmetic on the given logits whatever their dtype, so float32's precision.
    "cross_entropy loss": {torch.float32: dict(rtol=2e-6, atol=2e-6)},
    # The gradient gets a lower absolute floor: softmax - 1 at a target whose probability is near 1 keeps
    # only the absolute accuracy of the float32 softmax, about 1e-7 times dloss (as in eager PyTorch).
    "cross_entropy gradient": {
        torch.float32: dict(rtol=1e-5, atol=1e-6),
        torch.float16: dict(rtol=1e-3, atol=1e-6),
        torch.bfloat16: dict(rtol=8e-3, atol=1e-5),
    },
    # Attention multiplies float32 in TF32 on a GPU (exactly under the interpreter, still summing over
    # the keys in another order); float16 and bfloat16 round the probabilities, and backward dS, to the
    # input dtype before their matrix products, which costs the gradients more than the output.
    "flash_attention output": {
        torch.float32: dict(rtol=1e-2, atol=1e-2) if torch.cuda.is_available() else dict(rtol=1e-4, atol=1e-5),
        torch.float16: dict(rtol=2e-3, atol=2e-3),
        torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    },
    "flash_attention gradient": {
        torch.float32: dict(rtol=1e-2, atol=1e-2) if torch.cuda.is_available() else dict(rtol=1e-4, atol=1e-5),
        torch.float16: dict(rtol=1e-2, atol=1e-2),
        torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
    },
    # The matmuls sum over K in another order than float64's, in TF32 on a GPU (exact float32 under the
    # interpreter). In bfloat16 the weight gradients are sums over the rows of products of rounded
    # operands (the saved pre-activation, dpre), as in eager bfloat16: the tests also hold them to twice
    # eager's error (EAGER_FACTOR).
    "linear_bias_gelu": {
        torch.float32: dict(rtol=1e-2, atol=1e-2) if torch.cuda.is_available() else dict(rtol=1e-5, atol=1e-5),
        torch.bfloat16: dict(rtol=2e-2, atol=6e-2),
    },
}
DTYPES = list(TOLERANCES["default"])
# The half dtypes' rule: a kernel's error is at most twice that of the eager path in the same dtype,
# which rounds its results too. Not float32's: there eager's error is rounding in another order.
EAGER_FACTOR = {torch.float16: 2.0, torch.bfloat16: 2.0}

Inputs = dict[str, torch.Tensor | None]


def tolerance(dtype: torch.dtype, entry: str = "default") -> dict:
    return TOLERANCES[entry][dtype]


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, entry: str = "default") -> None:
    """``got`` within its dtype's tolerance of the float64 ``want``; a failure names the tensor, the
    greatest differences and the tolerance."""
    tol = tolerance(got.dtype, entry)
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    torch.testing.assert_close(got.double(), want.double(), **tol,
                               msg=lambda message: f"{name} ({got.dtype}, rtol={tol['rtol']}, atol={tol['atol']}): "
                               f"{message}")


def assert_within_eager_error(name: str, got: torch.Tensor, eager: torch.Tensor, want: torch.Tensor) -> None:
    """For a half dtype, ``got``'s greatest error from the float64 ``want`` is at most EAGER_FACTOR times
    that of ``eager``, the same computation by PyTorch in the same dtype. Nothing for float32."""
    factor = EAGER_FACTOR.get(got.dtype)
    if factor is None or not want.numel():
        return
    ours, theirs = ((t.double() - want).abs().max().item() for t in (got, eager))
    assert ours <= factor * theirs, f"{name} ({got.dtype}): max error {ours:.3g}, over {factor} x eager's {theirs:.3g}"


def forward_backward(op: Callable, inputs: Inputs, grad_output: torch.Tensor, backend: str = "triton"
                     ) -> tuple[torch.Tensor, Inputs]:
    """``op`` on ``backend`` over fresh leaves of the inputs (the same strides; None stays None), then
    backward with ``grad_output``: the output and each input's gradient."""
    leaves = {name: None if t is None else t.detach().requires_grad_() for name, t in inputs.items()}
    with kernels.use_backend(backend):
        out = op(*leaves.values())
    out.backward(grad_output)
    return out, {name: None if t is None else t.grad for name, t in leaves.items()}


def run_and_compare(op: Callable, reference: Callable, inputs: Inputs, grad_output: torch.Tensor | None = None, *,
                    out_dtype: torch.dtype | None = None, backend: str = "triton", output_tolerance: str = "default",
                    gradient_tolerance: str = "default", eager: Callable | None = None
                    ) -> tuple[torch.Tensor, Inputs]:
    """Runs ``op`` on ``backend`` and ``reference`` in float64 on copies of the same inputs, sends the
    same output gradient (random unless given) back through both, and asserts that the output, of
    ``out_dtype`` (by default the first input's), and every input's gradient, of that input's dtype,
    are within tolerance of the reference's: the named entries of TOLERANCES at each tensor's dtype.
    With ``eager`` (the same computation, run on the "torch" backend), each half-dtype tensor's greatest
    error is also at most EAGER_FACTOR times the eager one's. Returns the op's output and gradients."""
    out_dtype = out_dtype or next(t for t in inputs.values() if t is not None).dtype
    references = {name: None if t is None else t.detach().double().requires_grad_() for name, t in inputs.items()}
    want = reference(*references.values())
    if grad_output is None:
        grad_output = torch.randn(want.shape, device=want.device).to(out_dtype)
    out, grads = forward_backward(op, inputs, grad_output, backend)
    want.backward(grad_output.double())
    assert out.dtype == out_dtype, f"output dtype {out.dtype}, expected {out_dtype}"
    assert_close("output", out, want.detach(), output_tolerance)
    for name, grad in grads.items():
        if inputs[name] is not None:
            dtype = inputs[name].dtype
            assert grad is not None and grad.dtype == dtype, f"d{name}: {grad and grad.dtype}, expected {dtype}"
            assert_close(f"d{name}", grad, references[name].grad, gradient_tolerance)
    if eager is not None:
        eager_out, eager_grads = forward_backward(eager, inputs, grad_output, "torch")
        assert_within_eager_error("output", out, eager_out, want.detach())
        for name, grad in grads.items():
            if grad is not None:
                assert_within_eager_error(f"d{name}", grad, eager_grads[name], references[name].grad)
    return out, grads
