"""The Triton cross-entropy (under the interpreter on CPU) against a float64 reference and
``F.cross_entropy``, eager and under ``torch.compile(fullgraph=True)``.

Tolerances (kernel_testing's "cross_entropy" entries): the loss is float32 arithmetic on the given
logits, so it is compared with the float64 reference on the same (rounded) logits at float32 precision
whatever their dtype. The gradient is float32 arithmetic plus one rounding to the logits' dtype (to
nearest for bfloat16, under the interpreter as on a GPU), with a lower absolute floor than the default.
"""

import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import DTYPES, run_and_compare, tolerance

from gptfast import kernels
from gptfast.kernels.cross_entropy import cross_entropy_reference

pytestmark = pytest.mark.usefixtures("on_kernel_device", "interpreter_bf16_rounding")  # the GPU when there is one


def compare_cross_entropy(logits, targets, ignore_index=-1, num_classes=None, against_eager=False, **options):
    """Per-position losses and the gradient for random per-position weights on "triton", against the
    float64 reference on the first num_classes columns (the rest must get an exactly zero gradient),
    and (against_eager) against the eager error. ``options``: label_smoothing and z_loss."""
    n, classes = num_classes or logits.shape[-1], logits.shape[-1]

    def op(logits):
        return kernels.cross_entropy(logits, targets, ignore_index, reduction="none", num_classes=num_classes,
                                     **options)

    def reference(logits):
        rows = logits.reshape(-1, classes)[:, :n]
        return cross_entropy_reference(rows, targets.reshape(-1), ignore_index, **options).view(targets.shape)

    _, grads = run_and_compare(op, reference, dict(logits=logits), out_dtype=torch.float32,
                               output_tolerance="cross_entropy loss", gradient_tolerance="cross_entropy gradient",
                               eager=op if against_eager else None)
    assert not grads["logits"][..., n:].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("classes", [1, 2, 7, 100, 1000, 4096, 4097, 9000])
def test_matches_reference(classes, dtype):
    torch.manual_seed(classes)
    logits = (4 * torch.randn(2, 3, classes)).to(dtype)  # (batch, seq, classes)
    targets = torch.randint(0, classes, (2, 3))
    targets[1, 0] = -1
    compare_cross_entropy(logits, targets, against_eager=True)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_match_f_cross_entropy(reduction, backend):
    torch.manual_seed(1)
    logits = torch.randn(11, 37)
    targets = torch.randint(0, 37, (11,))
    targets[::4] = 3  # a custom ignore_index
    run_and_compare(lambda logits: kernels.cross_entropy(logits, targets, ignore_index=3, reduction=reduction),
                    lambda logits: F.cross_entropy(logits, targets, ignore_index=3, reduction=reduction),
                    dict(logits=logits), backend=backend, output_tolerance="cross_entropy loss",
                    gradient_tolerance="cross_entropy gradient")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_every_position_ignored(backend):
    """As F.cross_entropy: the mean of nothing is NaN, the sum 0, and the gradient is zero (also
    for logits whose exponentials overflow float32)."""
    logits = (100 * torch.randn(4, 10)).requires_grad_()
    targets = torch.full((4,), -1)
    with kernels.use_backend(backend):
        assert torch.isnan(kernels.cross_entropy(logits, targets))
        total = kernels.cross_entropy(logits, targets, reduction="sum")
    assert total.item() == 0
    total.backward()
    assert not logits.grad.any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_padding_columns_take_no_part(dtype):
    """num_classes: 1000 classes in rows padded to 1024 (as the LM head's); the padding columns
    hold large values that would dominate the softmax if they were counted."""
    torch.manual_seed(0)
    logits = torch.randn(6, 1024)
    logits[:, 1000:] = 50.0
    targets = torch.randint(0, 1000, (6,))
    compare_cross_entropy(logits.to(dtype), targets, num_classes=1000)
    with kernels.use_backend("torch"):
        eager = kernels.cross_entropy(logits, targets, num_classes=1000)
    torch.testing.assert_close(eager, F.cross_entropy(logits[:, :1000], targets))


def test_non_contiguous_logits():
    torch.manual_seed(0)
    targets = torch.randint(0, 96, (40,))
    compare_cross_entropy(torch.randn(40, 128)[:, :96], targets)  # rows with a stride of 128 (no copy)
    compare_cross_entropy(torch.randn(96, 40).t(), targets)  # column-major: copied to rows
    compare_cross_entropy(torch.randn(8, 5, 96).transpose(0, 1), targets.view(5, 8))


def test_int32_targets_and_zero_rows():
    torch.manual_seed(0)
    compare_cross_entropy(torch.randn(9, 50), torch.randint(0, 50, (9,), dtype=torch.int32))
    compare_cross_entropy(torch.randn(0, 50), torch.zeros(0, dtype=torch.long))


def test_large_common_offset():
    """Logits of 1e4 + N(0, 1): differences are taken before exponentials and the backward gets the
    row max and log-sum apart (their float32 sum would round the log-sum to 2**-10), so loss and
    gradient keep float32 accuracy, as F.cross_entropy does."""
    torch.manual_seed(0)
    compare_cross_entropy(1e4 + torch.randn(8, 3000), torch.randint(0, 3000, (8,)))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
def test_nan_and_inf_propagate_like_eager():
    logits = torch.randn(7, 8)
    logits[0, 3] = float("nan")  # NaN anywhere in a row: NaN loss
    logits[1, 2] = float("inf")  # +inf: NaN (inf - inf)
    logits[2, 5] = float("-inf")  # -inf elsewhere than the target: finite
    logits[3, 1] = float("-inf")  # -inf at the target: inf
    logits[5] = -2e30  # huge but finite everywhere: log(8)
    logits[6, :4] = float("-inf")  # the first chunk's lanes see only -inf, the rest do not
    targets = torch.tensor([0, 0, 0, 1, 4, 2, 6])
    logits.requires_grad_()
    with kernels.use_backend("triton"):
        got = kernels.cross_entropy(logits, targets, reduction="none")
    got.sum().backward()
    eager_logits = logits.detach().requires_grad_()
    want = F.cross_entropy(eager_logits, targets, reduction="none")
    want.sum().backward()
    torch.testing.assert_close(got, want, equal_nan=True)
    torch.testing.assert_close(logits.grad, eager_logits.grad, equal_nan=True)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_arguments(backend):
    logits = torch.randn(4, 10)
    with kernels.use_backend(backend):
        with pytest.raises(ValueError, match=r"targets have shape \(5,\), expected \(4,\)"):
            kernels.cross_entropy(logits, torch.zeros(5, dtype=torch.long))
        with pytest.raises(TypeError, match="integer class ids, got dtype torch.float32"):
            kernels.cross_entropy(logits, torch.zeros(4))
        with pytest.raises(ValueError, match=r"target 10 is outside the classes \[0, 10\)"):
            kernels.cross_entropy(logits, torch.tensor([1, 2, 10, -1]))
        with pytest.raises(ValueError, match=r"target -2 is outside .* not ignore_index \(-1\)"):
            kernels.cross_entropy(logits, torch.tensor([1, -2, 0, -1]))
        with pytest.raises(ValueError, match=r"target 8 is outside the classes \[0, 8\)"):
            kernels.cross_entropy(logits, torch.tensor([8, 0, 0, 0]), num_classes=8)
        with pytest.raises(ValueError, match="num_classes 11 must be between 1 and"):
            kernels.cross_entropy(logits, torch.zeros(4, dtype=torch.long), num_classes=11)
        with pytest.raises(ValueError, match="reduction must be one of"):
            kernels.cross_entropy(logits, torch.zeros(4, dtype=torch.long), reduction="avg")


def test_unchecked_bad_target_gives_nan_not_a_wild_read():
    """With check_targets=False (as under torch.compile) the kernel never reads outside the row."""
    logits = torch.randn(3, 10)
    with kernels.use_backend("triton"):
        loss = kernels.cross_entropy(logits, torch.tensor([1, 10**9, 2]), reduction="none", check_targets=False)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


def test_unsupported_dtype_is_refused_on_triton_and_eager_on_auto():
    logits = torch.randn(3, 10, dtype=torch.float64)
    targets = torch.tensor([1, 2, 3])
    with kernels.use_backend("triton"), pytest.raises(kernels.BackendError, match="float64"):
        kernels.cross_entropy(logits, targets)
    with kernels.use_backend("triton"), pytest.raises(kernels.BackendError, match="int16"):
        kernels.cross_entropy(logits.float(), targets.short())
    assert not kernels.explain("cross_entropy", logits, targets).use_triton
    torch.testing.assert_close(kernels.cross_entropy(logits, targets), F.cross_entropy(logits, targets).float())


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(0, 30), classes=st.integers(1, 700), padding=st.integers(0, 40),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_random_shapes(rows, classes, padding, dtype, seed):
    torch.manual_seed(seed)
    targets = torch.randint(-1, classes, (rows,))
    compare_cross_entropy((3 * torch.randn(rows, classes + padding)).to(dtype), targets, num_classes=classes)


class Head(nn.Module):
    """A linear LM head with a padded vocabulary and the fused loss, as the model's."""

    def __init__(self, n: int, classes: int, padded: int):
        super().__init__()
        self.proj = nn.Linear(n, padded, bias=False)
        self.classes = classes

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return kernels.cross_entropy(self.proj(x), targets, num_classes=self.classes)


def test_torch_compile_fullgraph():
    """The custom operators compile with fullgraph=True and give the eager results, on the "triton"
    backend (the kernels, interpreted) and on "torch" (the eager fallback)."""
    torch.manual_seed(0)
    head, x, targets = Head(32, 100, 128), torch.randn(3, 7, 32), torch.randint(-1, 100, (3, 7))
    want = F.cross_entropy(head.proj(x)[..., :100].reshape(-1, 100), targets.reshape(-1), ignore_index=-1)
    want.backward()
    want_grad, head.proj.weight.grad = head.proj.weight.grad, None
    compiled = torch.compile(head, fullgraph=True)
    for backend in ("triton", "torch"):
        with kernels.use_backend(backend):
            loss = compiled(x, targets)
        loss.backward()
        torch.testing.assert_close(loss, want)
        torch.testing.assert_close(head.proj.weight.grad, want_grad)
        head.proj.weight.grad = None
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("classes, padding", [(7, 0), (1000, 24), (4097, 63)])
@pytest.mark.parametrize("label_smoothing, z_loss", [(0.1, 0.0), (0.0, 1e-3), (0.3, 1e-2), (1.0, 0.0)])
def test_label_smoothing_and_z_loss_match_reference(classes, padding, label_smoothing, z_loss, dtype):
    """Both options against float64, padding columns included (their gradient stays exactly zero:
    the uniform part of label smoothing covers the classes only)."""
    torch.manual_seed(classes + padding)
    logits = (3 * torch.randn(4, classes + padding)).to(dtype)
    targets = torch.randint(0, classes, (4,))
    targets[2] = -1
    compare_cross_entropy(logits, targets, num_classes=classes, label_smoothing=label_smoothing, z_loss=z_loss)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_label_smoothing_is_f_cross_entropys(reduction, backend):
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 5, 33), torch.randint(0, 33, (6, 5))
    targets[0] = -1
    with kernels.use_backend(backend):
        got = kernels.cross_entropy(logits, targets, reduction=reduction, label_smoothing=0.25)
    want = F.cross_entropy(logits.reshape(-1, 33), targets.reshape(-1), ignore_index=-1, label_smoothing=0.25,
                           reduction=reduction)
    torch.testing.assert_close(got, want.view(got.shape), **tolerance(torch.float32, "cross_entropy loss"))


def test_options_keep_offset_rows_accurate():
    """Rows of 1e4 + N(0, 1): label smoothing's mean logit is summed as differences from the first
    logit, so the loss keeps float32 accuracy."""
    torch.manual_seed(0)
    compare_cross_entropy(1e4 + torch.randn(8, 3000), torch.randint(0, 3000, (8,)), label_smoothing=0.1)


@pytest.mark.parametrize("options, message", [(dict(label_smoothing=-0.1), r"label_smoothing must be in \[0, 1\]"),
                                              (dict(label_smoothing=1.5), r"label_smoothing must be in \[0, 1\]"),
                                              (dict(z_loss=-1.0), "z_loss must be a finite number >= 0"),
                                              (dict(z_loss=float("inf")), "z_loss must be a finite number >= 0")])
def test_bad_options_name_the_problem(options, message):
    with pytest.raises(ValueError, match=f"cross_entropy: {message}"):
        kernels.cross_entropy(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), **options)


def opcheck_cases():
    """(custom operator, arguments) for tests/test_opcheck.py."""
    cross_entropy = importlib.import_module("gptfast.kernels.cross_entropy")  # the module, not the public op
    logits, targets = torch.randn(6, 70), torch.tensor([0, 5, -1, 68, 3, 1])
    loss, stats = cross_entropy._forward(logits, targets, -1, 69, 0.0, 0.0)
    return [(cross_entropy._forward, (logits.requires_grad_(), targets, -1, 69, 0.0, 0.0)),
            (cross_entropy._forward, (logits.detach(), targets, -1, 69, 0.1, 1e-4)),
            (cross_entropy._backward, (torch.rand_like(loss), logits.detach(), targets, stats, -1, 69, 0.1, 1e-4))]
