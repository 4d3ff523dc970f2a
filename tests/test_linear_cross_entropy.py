"""linear_cross_entropy: the LM head and its loss in chunks, against float64, and in the model."""

import contextlib
import importlib
import subprocess
import sys
import textwrap

import pytest
import torch

from gptfast import kernels
from gptfast.kernels import common
from gptfast.model import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("on_kernel_device")
cross_entropy = importlib.import_module("gptfast.kernels.cross_entropy")
fused = importlib.import_module("gptfast.kernels.linear_cross_entropy")


def _reference(hidden, weight, targets, reduction, num_classes, label_smoothing, z_loss):
    logits = hidden @ weight.T
    losses = cross_entropy.cross_entropy_reference(logits[:, :num_classes], targets, -1, label_smoothing, z_loss)
    return losses.sum() / (targets != -1).sum() if reduction == "mean" else losses.sum()


CASES = [  # rows, d, vocabulary, classes, label smoothing, z-loss, reduction, chunk bytes (rows per chunk)
    (300, 24, 131, 120, 0.0, 0.0, "mean", 64 * 131 * 4),  # 5 chunks, the last partial; vocabulary padding
    (77, 16, 70, 70, 0.1, 1e-3, "sum", 1),  # the smallest chunk: 64 rows
    (50, 8, 40, 33, 0.2, 0.0, "mean", 2**30),  # one chunk
    (65, 12, 200, 199, 0.0, 1e-2, "sum", 64 * 200 * 4),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("rows, d, vocab, classes, smoothing, z, reduction, chunk", CASES)
def test_matches_float64(backend, rows, d, vocab, classes, smoothing, z, reduction, chunk):
    torch.manual_seed(rows + vocab)
    hidden, weight = torch.randn(rows, d), torch.randn(vocab, d) * 0.3
    targets = torch.randint(0, classes, (rows,))
    targets[::7] = -1
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with kernels.use_backend(backend):
        loss = kernels.linear_cross_entropy(h, w, targets, reduction=reduction, num_classes=classes,
                                            label_smoothing=smoothing, z_loss=z, chunk_bytes=chunk)
    (3 * loss).backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want = _reference(h64, w64, targets, reduction, classes, smoothing, z)
    (3 * want).backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)
    assert not w.grad[classes:].any()  # padding rows of the head get no gradient


ONE_PASS_CASES = [  # rows, columns, classes, label smoothing, z-loss, dtype, block (None: one_pass_config's)
    (37, 131, 120, 0.0, 0.0, torch.bfloat16, None),  # held whole, padding columns; 1 warp
    (37, 131, 120, 0.1, 1e-3, torch.float32, None),
    (23, 200, 197, 0.1, 1e-3, torch.float32, 224),  # held in three parts: 128 + 64 + 32 columns
    (23, 150, 150, 0.0, 0.0, torch.bfloat16, 160),  # held in two parts, no padding
    (3, 50304, 50257, 0.0, 0.0, torch.bfloat16, None),  # GPT-2's head: 32,768 + 16,384 + 4,096 by 16 warps
    (3, 33001, 32999, 0.2, 1e-2, torch.float32, None),  # just wider than one block: 32,768 + 4,096
    (29, 300, 297, 0.2, 1e-2, torch.float32, 64),  # streamed: 4 whole chunks, a partial one, then padding
    (29, 97, 97, 0.0, 0.0, torch.bfloat16, 32),  # streamed, no padding
]


@pytest.mark.parametrize("rows, cols, classes, smoothing, z, dtype, block", ONE_PASS_CASES)
def test_one_pass_kernel_matches_float64(rows, cols, classes, smoothing, z, dtype, block):
    """The one-pass kernel, held in registers (in one to three parts) and streamed: the losses and, in
    place over the logits, the gradient of their sum, zero on ignored rows and padding columns."""
    torch.manual_seed(rows + cols)
    logits = (3 * torch.randn(rows, cols)).to(dtype)
    targets = torch.randint(0, classes, (rows,))
    targets[::5], targets[1] = -1, classes - 1
    config = cross_entropy.one_pass_config(cols) if block is None else cross_entropy.ChunkConfig(block, 1)
    assert (config.block_v >= cols) == (block is None or block > cols)  # every width here up to 53,248 is held
    work = logits.clone()
    losses = cross_entropy.write_loss_and_gradient(work, work, targets, -1, classes, smoothing, z, config)
    x64 = logits[:, :classes].double().requires_grad_()
    want = cross_entropy.cross_entropy_reference(x64, targets, -1, smoothing, z)
    want.sum().backward()
    torch.testing.assert_close(losses.double(), want.detach(), rtol=1e-5, atol=1e-5)
    tolerance = dict(rtol=1e-2, atol=4e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(work[:, :classes].double(), x64.grad, **tolerance)
    assert not work[:, classes:].any() and not work[targets == -1].any()


def test_held_rows_up_to_the_limit_in_at_most_three_parts():
    assert cross_entropy.one_pass_config(50304) == cross_entropy.ChunkConfig(53248, 16)
    assert cross_entropy.held_parts(53248) == (32768, 16384, 4096)
    assert cross_entropy.held_parts(1024) == (1024, 0, 0)
    assert cross_entropy.one_pass_config(cross_entropy.ONE_PASS_RESIDENT_COLUMNS + 1).block_v == 8192  # streamed
    with pytest.raises(ValueError, match="at most three powers of two"):
        cross_entropy.held_parts(15 * 4096)


def _kernels_launched(hidden, weight, targets) -> list[str]:
    with common.capture_launches() as launches:
        kernels.linear_cross_entropy(hidden, weight, targets)
    return [launch.kernel.fn.__name__ if hasattr(launch.kernel, "fn") else launch.kernel.__name__
            for launch in launches]


def test_two_passes_switch():
    """By default gradients come from the one-pass kernel; within two_passes() from the losses kernel
    then the gradient kernel, with the same results; without gradients the losses kernel alone."""
    torch.manual_seed(0)
    hidden, weight, targets = torch.randn(70, 8), torch.randn(50, 8), torch.randint(0, 50, (70,))
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    with kernels.use_backend("triton"):
        assert _kernels_launched(h, w, targets) == ["_cross_entropy_one_pass"]
        with cross_entropy.two_passes():
            assert cross_entropy.one_pass_config(50) is None
            assert _kernels_launched(h, w, targets) == ["_cross_entropy_fwd", "_cross_entropy_bwd"]
        assert _kernels_launched(h.detach(), w.detach(), targets) == ["_cross_entropy_fwd"]
        results = []
        for passes in (contextlib.nullcontext(), cross_entropy.two_passes()):
            h.grad = w.grad = None
            with passes:
                loss = kernels.linear_cross_entropy(h, w, targets, label_smoothing=0.1, z_loss=1e-3)
            loss.backward()
            results.append((loss, h.grad, w.grad))
    for one, two in zip(*results):
        torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-6)


def test_every_target_ignored_and_no_gradient_needed():
    hidden, weight = torch.randn(70, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
    targets = torch.full((70,), -1)
    with kernels.use_backend("triton"):
        loss = kernels.linear_cross_entropy(hidden, weight, targets)
        summed = kernels.linear_cross_entropy(hidden, weight, targets, reduction="sum")
    assert torch.isnan(loss) and summed == 0  # as F.cross_entropy: the mean over no positions
    summed.backward()
    assert not hidden.grad.any() and not weight.grad.any()
    with torch.no_grad(), kernels.use_backend("triton"):
        evaluated = kernels.linear_cross_entropy(hidden, weight, torch.randint(0, 30, (70,)))
    assert evaluated.grad_fn is None and torch.isfinite(evaluated)


def test_bad_inputs_name_the_problem():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"hidden \(4, 7\) and weight \(10, 8\) do not match"):
        kernels.linear_cross_entropy(torch.randn(4, 7), w, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        kernels.linear_cross_entropy(h, w, torch.zeros(4, dtype=torch.long), reduction="none")
    with pytest.raises(ValueError, match=r"linear_cross_entropy: targets have shape \(3,\), expected \(4,\)"):
        kernels.linear_cross_entropy(h, w, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="target 10 is outside the classes"):
        kernels.linear_cross_entropy(h, w, torch.full((4,), 10))


@pytest.mark.parametrize("tie_weights", [True, False])
def test_model_fused_head_equals_the_unfused_head(tie_weights):
    """Loss and every gradient, tied embedding included, with and without the fused head."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=90, n_layer=2, n_head=2, n_embd=32, context_length=16, vocab_multiple=64,
                       tie_weights=tie_weights)
    model = GPT(config)
    idx, targets = torch.randint(0, 90, (2, 3, 16))
    targets[0, :5] = -1
    results = []
    for fused_head in (True, False):
        model.config.fused_lm_head = fused_head
        model.zero_grad()
        with kernels.use_backend("triton"):
            logits, loss = model(idx, targets)
        assert (logits is None) == fused_head
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for got, want in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_model_under_bf16_autocast_and_compile():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=90, n_layer=1, n_head=2, n_embd=32, context_length=16, vocab_multiple=64))
    idx, targets = torch.randint(0, 90, (2, 2, 16))
    with torch.autocast(idx.device.type, torch.bfloat16):
        _, fused_loss = model(idx, targets)
        unfused_logits, unfused_loss = model(idx, targets, return_logits=True)
    assert unfused_logits is not None
    torch.testing.assert_close(fused_loss, unfused_loss, rtol=1e-2, atol=1e-2)

    compiled = torch.compile(lambda idx, targets: model(idx, targets)[1], fullgraph=True)(idx, targets)
    compiled.backward()
    compiled_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    eager = model(idx, targets)[1]
    eager.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_grad, model.lm_head.weight.grad, rtol=1e-4, atol=1e-6)


_PEAK = textwrap.dedent("""
    import resource, sys, torch
    from gptfast.model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32768, n_layer=1, n_head=2, n_embd=64, context_length=256,
                          fused_lm_head=sys.argv[1] == "fused"))
    idx, targets = torch.randint(0, 32768, (2, 16, 256))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _, loss = model(idx, targets)
    loss.backward()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
""")


def test_fused_head_saves_at_least_the_logits_and_their_gradient():
    """Peak resident memory of one training step in a fresh process (eager path, CPU): the fused head
    saves at least the float32 logits and their gradient (2 x 4096 x 32768 x 4 bytes = 1 GiB)."""
    env = {"GPTFAST_BACKEND": "torch", "PATH": ""}
    growth = {kind: int(subprocess.run([sys.executable, "-c", _PEAK, kind], capture_output=True, text=True,
                                       check=True, env=env).stdout) for kind in ("fused", "unfused")}
    logits_and_gradient = 2 * 16 * 256 * 32768 * 4
    assert growth["unfused"] - growth["fused"] >= logits_and_gradient, growth


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_float16_mean_gradients_do_not_underflow(backend):
    """The mean's 1 / rows is applied in float32 in the backward, with the loss's gradient (a loss
    scale, as GradScaler's): float16 chunk gradients of (p - onehot) / 2048 would be subnormal."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(2048, 16).half(), (0.1 * torch.randn(300, 16)).half()
    targets = torch.randint(0, 300, (2048,))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with kernels.use_backend(backend):
        loss = kernels.linear_cross_entropy(h, w, targets, chunk_bytes=64 * 300 * 2)
    (1024 * loss).backward()  # a loss scale
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    (1024 * _reference(h64, w64, targets, "mean", 300, 0.0, 0.0)).backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-2, atol=1e-3)


def opcheck_cases():
    """(custom operator, arguments) for tests/test_opcheck.py: each path, with and without gradients."""
    hidden, weight, targets = torch.randn(100, 8), torch.randn(40, 8), torch.randint(-1, 33, (100,))
    return [(fused._fused, (hidden.requires_grad_(), weight.requires_grad_(), targets, -1, 33, 0.0, 0.0, True, 64,
                            torch.float32, use_triton, True))
            for use_triton in (True, False)] + [
            (fused._fused, (hidden.detach(), weight.detach(), targets, -1, 40, 0.1, 1e-3, False, 64, torch.float32,
                            use_triton, need_grad))
            for use_triton in (True, False) for need_grad in (True, False)]
