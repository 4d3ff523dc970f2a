"""The Triton flash attention (under the interpreter on CPU) against a float64 reference.

Forward and the three gradients are compared on fresh random inputs given as strided views (the
model's fused qkv projection split and transposed, a key/value cache's prefix, a transposed output
gradient), causal and not, over head dims 16..128 and sequence lengths that cross the interpreter's
16- and 32-row blocks, within kernel_testing's "flash_attention" tolerances (TF32 on a GPU; half
dtypes round the probabilities and dS before their matrix products). Under the interpreter bfloat16
conversions round to nearest, as on a GPU (``interpreter_bf16_rounding``).
"""

import contextlib
import importlib
import math

import pytest
import torch
from dropout_mask import dropout_keep_mask
from kernel_testing import forward_backward, run_and_compare, tolerance
from torch.utils._python_dispatch import TorchDispatchMode

import gptfast
from gptfast import kernels
from gptfast.kernels import common

fa = importlib.import_module("gptfast.kernels.flash_attention")  # the module; kernels.flash_attention is the function
fa_kernels = importlib.import_module("gptfast.kernels.flash_attention.kernels")
fa_launch = importlib.import_module("gptfast.kernels.flash_attention.launch")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.usefixtures("interpreter_bf16_rounding")


def make_inputs(batch, heads, q_len, k_len, head_dim, dtype):
    """q, k, v as the model makes them: views of one (B, T, 3, H, D) projection, transposed to
    (B, H, T, D). With fewer queries than keys, k and v are the prefix of a longer cache."""
    if q_len == k_len:
        qkv = torch.randn(batch, q_len, 3, heads, head_dim, device=DEVICE).to(dtype)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=2))
    else:
        q = torch.randn(batch, q_len, heads, head_dim, device=DEVICE).to(dtype).transpose(1, 2)
        cache = torch.randn(2, batch, heads, k_len + 7, head_dim, device=DEVICE).to(dtype)
        k, v = cache[0, :, :, :k_len], cache[1, :, :, :k_len]
    return q, k, v


def attention(**kwargs):
    """The public function with ``kwargs`` bound."""
    return lambda q, k, v: kernels.flash_attention(q, k, v, **kwargs)


def compare_attention(q, k, v, grad_out, backend="triton", op=None, keep_mask=None, against_eager=False, **kwargs):
    """Output and (dq, dk, dv) of ``op`` (by default the public function with ``kwargs``, on ``backend``)
    against the float64 reference with ``kwargs`` (and ``keep_mask``), within tolerance, and
    (against_eager) within the rule against the public function on "torch"; returns them."""
    def reference(q, k, v):
        return fa.attention_reference(q, k, v, keep_mask=keep_mask, **kwargs)

    out, grads = run_and_compare(op or attention(**kwargs), reference, dict(q=q, k=k, v=v), grad_out,
                                 backend=backend, output_tolerance="flash_attention output",
                                 gradient_tolerance="flash_attention gradient",
                                 eager=attention(**kwargs) if against_eager else None)
    return out, list(grads.values())


# (batch, heads, q_len, k_len, head_dim, causal, dtype): every head dim, lengths 1..200 around the
# block sizes, fewer queries than keys (bottom-right causal; offsets Tk - Tq of 17 and 14 put the
# diagonal one row either side of a block edge), and non-causal with more queries than keys.
SHAPES = [
    (1, 2, 1, 1, 64, True, torch.float32),
    (1, 1, 2, 2, 16, False, torch.float16),
    (2, 1, 17, 17, 32, True, torch.float16),
    (1, 2, 63, 63, 80, False, torch.float32),
    (1, 1, 64, 64, 96, True, torch.float16),
    (1, 1, 65, 65, 128, True, torch.float32),
    (1, 1, 200, 200, 64, True, torch.float16),
    (1, 1, 200, 200, 16, False, torch.float32),
    (1, 2, 1, 65, 64, True, torch.float16),
    (1, 1, 40, 57, 32, True, torch.float32),
    (1, 1, 50, 64, 48, True, torch.float16),
    (2, 1, 5, 63, 80, False, torch.float16),
    (1, 1, 65, 17, 128, False, torch.float32),
]


@pytest.mark.parametrize("batch,heads,q_len,k_len,head_dim,causal,dtype", SHAPES)
def test_matches_float64_reference(batch, heads, q_len, k_len, head_dim, causal, dtype):
    torch.manual_seed(q_len * 1000 + k_len + head_dim)
    q, k, v = make_inputs(batch, heads, q_len, k_len, head_dim, dtype)
    grad_out = torch.randn(batch, q_len, heads, head_dim, device=DEVICE).to(dtype).transpose(1, 2)
    compare_attention(q, k, v, grad_out, causal=causal, against_eager=True)


def test_explicit_scale():
    torch.manual_seed(1)
    q, k, v = make_inputs(1, 1, 40, 40, 32, torch.float32)
    grad_out = torch.randn(1, 1, 40, 32, device=DEVICE)
    compare_attention(q, k, v, grad_out, scale=0.3)


@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_negative_and_zero_scale(scale):
    """The forward kernel folds the scale into its exp2 argument and takes the row maximum of the
    unscaled scores, which needs a positive scale: the launcher rewrites the others exactly."""
    torch.manual_seed(2)
    q, k, v = make_inputs(1, 2, 33, 45, 32, torch.float32)
    grad_out = torch.randn(1, 2, 33, 32, device=DEVICE)
    compare_attention(q, k, v, grad_out, scale=scale)


def test_broadcast_output_gradient():
    """out.sum().backward() hands the kernels a dO with zero strides."""
    torch.manual_seed(8)
    q, k, v = make_inputs(1, 2, 30, 30, 32, torch.float32)
    grad_out = torch.ones(1, 1, 1, 1, device=DEVICE).expand(1, 2, 30, 32)
    compare_attention(q, k, v, grad_out)


@pytest.mark.skipif(not CUDA, reason="on a GPU; the CPU test below takes the kernels through the custom operator")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_bfloat16_matches_float64_reference(head_dim):
    torch.manual_seed(head_dim)
    q, k, v = make_inputs(2, 3, 333, 333, head_dim, torch.bfloat16)
    grad_out = torch.randn(2, 3, 333, head_dim, device=DEVICE, dtype=torch.bfloat16)
    compare_attention(q, k, v, grad_out)


@pytest.mark.skipif(CUDA, reason="the test above runs the kernels in bfloat16 on the GPU")
@pytest.mark.parametrize("q_len,k_len,head_dim,causal", [(70, 70, 64, True), (33, 50, 80, True), (40, 40, 32, False)])
def test_bfloat16_kernels_under_the_interpreter(interpreter_bf16_dot, q_len, k_len, head_dim, causal):
    """The bfloat16 kernels on a CPU, through the custom operator (the public function refuses
    bfloat16 on a CPU, since the stock interpreter's bf16 dot is wrong; the fixture mends it)."""
    torch.manual_seed(q_len + head_dim)
    q, k, v = make_inputs(2, 2, q_len, k_len, head_dim, torch.bfloat16)
    grad_out = torch.randn(2, 2, q_len, head_dim).to(torch.bfloat16)

    def custom_op(q, k, v):
        return torch.ops.gptfast.flash_attention_forward(q, k, v, causal, 0.0, 1 / math.sqrt(head_dim), None, None)[0]

    compare_attention(q, k, v, grad_out, op=custom_op, causal=causal, against_eager=True)


def test_large_scores():
    """Scores of several hundred (sharp softmax rows) neither overflow nor lose the small terms."""
    torch.manual_seed(6)
    q, k, v = make_inputs(1, 2, 70, 70, 64, torch.float16)
    q.mul_(8)
    k.mul_(8)
    grad_out = torch.randn(1, 2, 70, 64, device=DEVICE).half()
    compare_attention(q, k, v, grad_out)


def test_log_sum_exp_is_saved_per_row():
    """The forward op saves one float32 log-sum-exp per query row: the only extra memory."""
    torch.manual_seed(2)
    q, k, v = make_inputs(2, 2, 33, 70, 48, torch.float32)
    scale = 1 / math.sqrt(48)
    out, lse = torch.ops.gptfast.flash_attention_forward(q, k, v, True, 0.0, scale, None, None)
    assert out.is_contiguous() and lse.shape == (2, 2, 33) and lse.dtype == torch.float32
    scores = (q.double() @ k.double().transpose(-2, -1)) * scale
    scores = scores.masked_fill(~fa.causal_mask(33, 70, q.device), float("-inf"))
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1), **tolerance(torch.float32, "flash_attention output"))


@pytest.mark.skipif(not CUDA, reason="measures GPU memory")
def test_extra_memory_is_linear_in_sequence():
    """Forward + backward at seq 8192 allocate a few q-sized tensors (output, gradients) and two
    floats per row, nowhere near the 512 MiB a float16 score matrix would take."""
    q, k, v = (torch.randn(1, 4, 8192, 64, device=DEVICE, dtype=torch.float16) for _ in range(3))
    grad_out = torch.randn_like(q)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    forward_backward(kernels.flash_attention, dict(q=q, k=k, v=v), grad_out)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    workspace = fa_launch.dq_workspace_bytes(q, 8192, True, fa.configs_for(q).backward_kv_dq)
    workspace = workspace if workspace <= fa_launch.DQ_WORKSPACE_LIMIT else 0  # the partial dQ, if it fits
    assert extra <= 8 * q.numel() * q.element_size() + workspace, f"{extra / 2**20:.1f} MiB"


@pytest.mark.parametrize("limit", [None, 0])
def test_gradients_are_deterministic(limit, monkeypatch):
    """No atomics: the same inputs and dropout seed give bitwise the same output and gradients, dQ's
    partials summed in key-block order (limit 0: by the dQ kernel, beyond the workspace's limit)."""
    if limit is not None:
        monkeypatch.setattr(fa_launch, "DQ_WORKSPACE_LIMIT", limit)
    torch.manual_seed(3)
    inputs = dict(zip("qkv", make_inputs(1, 2, 50, 50, 32, torch.float16)))
    grad_out = torch.randn(1, 2, 50, 32, device=DEVICE).half()
    runs = []
    for _ in range(2):
        torch.manual_seed(4)  # the dropout seed
        out, grads = forward_backward(attention(dropout_p=0.2), inputs, grad_out)
        runs.append([out, *grads.values()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# ---- the backward's paths: the dQ workspace (the default), beyond its limit the dQ kernel or atomics ----

# deterministic=..., DQ_WORKSPACE_LIMIT=0: the paths taken where the partial-dQ workspace would not fit.
FALLBACKS = {"dq kernel": True, "atomics": False}


@pytest.fixture(params=FALLBACKS)
def fallback(request, monkeypatch):
    """The ``deterministic`` flag of a backward path other than the workspace's, with no workspace allowed."""
    monkeypatch.setattr(fa_launch, "DQ_WORKSPACE_LIMIT", 0)
    return FALLBACKS[request.param]


@pytest.mark.parametrize("batch,heads,q_len,k_len,head_dim,causal,dtype,key_start,dropout_p", [
    (1, 2, 1, 1, 64, True, torch.float32, None, 0.0),
    (2, 1, 17, 17, 32, True, torch.float16, None, 0.0),
    (1, 2, 63, 63, 80, False, torch.float32, None, 0.0),
    (1, 1, 65, 65, 128, True, torch.float16, None, 0.0),
    (1, 1, 40, 57, 32, True, torch.float32, [3], 0.0),
    (2, 1, 70, 70, 48, True, torch.float16, [32, 69], 0.0),
    (1, 1, 65, 17, 16, False, torch.float32, None, 0.0),
    (2, 1, 33, 50, 64, True, torch.float32, [30, 5], 0.3),
    (3, 1, 40, 32, 32, False, torch.float32, [0, 5, 32], 0.0),  # the last row: no key, no key block visits
])
def test_fallback_backward_matches_float64_reference(batch, heads, q_len, k_len, head_dim, causal, dtype, key_start,
                                                     dropout_p, fallback):
    """The paths beyond the workspace's limit get the float64-reference tests of the default one: odd
    shapes, padded head dims, fewer or more queries than keys, left padding (rows that see nothing get
    zero gradients) and dropout with the kernels' own mask."""
    torch.manual_seed(q_len * 1000 + k_len + head_dim)
    q, k, v = make_inputs(batch, heads, q_len, k_len, head_dim, dtype)
    grad_out = torch.randn(batch, q_len, heads, head_dim, device=DEVICE).to(dtype).transpose(1, 2)
    key_start = None if key_start is None else torch.tensor(key_start, device=DEVICE)
    keep = None
    if dropout_p:
        torch.manual_seed(11)
        keep = dropout_keep_mask(fa_launch.dropout_seed(), batch, heads, q_len, k_len, dropout_p, DEVICE)
        torch.manual_seed(11)  # the kernels draw the same seed
    options = dict(causal=causal, key_start=key_start, dropout_p=dropout_p)
    _, grads = compare_attention(q, k, v, grad_out, op=attention(deterministic=fallback, **options), keep_mask=keep,
                                 against_eager=not dropout_p, **options)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("q_len,k_len,head_dim,causal,key_start", [(37, 50, 48, True, [3]), (40, 33, 32, False, None)])
def test_sm90_form_of_dq_matches_float64_reference(q_len, k_len, head_dim, causal, key_start, monkeypatch):
    """dQ's share as K^T dS^T (sm_90's wgmma form; the interpreter otherwise runs dS K): the same gradients."""
    monkeypatch.setattr(fa_launch, "_has_wgmma", lambda q: True)
    torch.manual_seed(q_len + k_len)
    q, k, v = make_inputs(1, 2, q_len, k_len, head_dim, torch.float32)
    grad_out = torch.randn(1, 2, q_len, head_dim, device=DEVICE)
    key_start = None if key_start is None else torch.tensor(key_start, device=DEVICE)
    compare_attention(q, k, v, grad_out, causal=causal, key_start=key_start)


@pytest.mark.parametrize("limit", [None, 0])
def test_dq_is_finite_when_every_score_is_very_negative(limit, monkeypatch):
    """Keys past k_len (a partial last key block) score 0 where the real ones score about -36: their
    float16 dS overflows unless masked, and inf x a zero key would put NaN into the partial dQ (the
    workspace; limit 0: the atomics)."""
    if limit is not None:
        monkeypatch.setattr(fa_launch, "DQ_WORKSPACE_LIMIT", limit)
    torch.manual_seed(12)
    q = -3.0 - 0.1 * torch.rand(1, 1, 40, 16, device=DEVICE)
    k = 3.0 + 0.1 * torch.rand(1, 1, 37, 16, device=DEVICE)
    v, grad_out = torch.randn(1, 1, 37, 16, device=DEVICE), torch.randn(1, 1, 40, 16, device=DEVICE)
    q, k, v, grad_out = (t.half() for t in (q, k, v, grad_out))
    _, grads = compare_attention(q, k, v, grad_out, op=attention(causal=False, deterministic=False), causal=False)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("deterministic,limit,kernels,dq_argument", [
    (True, None, ["delta", "kv", "dq_reduce"], "DQ_PART"),
    (False, None, ["delta", "kv", "dq_reduce"], "DQ_PART"),
    (True, 0, ["delta", "kv", "q"], None),
    (False, 0, ["delta", "kv"], "DQ_SUM"),
    (True, "without", ["delta", "kv", "q"], None),
    (False, "without", ["delta", "kv"], "DQ_SUM"),
])
def test_backward_kernels(deterministic, limit, kernels, dq_argument, monkeypatch):
    """Where the workspace fits, either flag: the dK/dV kernel writes a float32 partial dQ per key block
    (key block, batch x head, head_dim, its query rows in whole query blocks) and the sum kernel adds them
    up; beyond it (or within ``without_dq_workspace``, as benchmarks force it), the dQ kernel
    (deterministic) or atomics into a
    float32 dQ, no third kernel."""
    if isinstance(limit, int):
        monkeypatch.setattr(fa_launch, "DQ_WORKSPACE_LIMIT", limit)
    q, k, v = (torch.randn(1, 2, 40, 32) for _ in range(3))
    out, lse = fa_launch._forward(q, k, v, True, 0.0, 0.2, None, None)
    forced = fa_launch.without_dq_workspace() if limit == "without" else contextlib.nullcontext()
    with common.capture_launches() as launches, forced:
        fa_launch._backward(torch.randn_like(out), q, k, v, out, lse, True, 0.0, 0.2, None, None, deterministic)
    assert [launch.kernel.fn.__name__ for launch in launches] == [f"_attention_bwd_{name}_kernel" for name in kernels]
    names = fa_kernels._attention_bwd_kv_kernel.arg_names
    given = {name: launches[1].args[names.index(name)] for name in ("DQ_PART", "DQ_SUM")}
    assert [name for name, t in given.items() if t is not None] == ([dq_argument] if dq_argument else [])
    block_m, block_n = fa.INTERPRETER_CONFIGS.backward_kv_dq.block_m, fa.INTERPRETER_CONFIGS.backward_kv_dq.block_n
    rows = sum(-(-40 // block_m) * block_m - start_n // block_m * block_m  # the causal rows, whole query blocks
               for start_n in range(0, 40, block_n))
    shapes = {"DQ_PART": (2 * rows * 32,), "DQ_SUM": q.shape}
    if dq_argument:
        assert given[dq_argument].dtype == torch.float32 and given[dq_argument].shape == shapes[dq_argument]


@pytest.mark.parametrize("key_start", [None, [3]])
def test_atomic_dq_is_zeroed_and_converted_in_the_kernels(key_start, monkeypatch):
    """Beyond the workspace, deterministic=False: the delta kernel zeroes the float32 dQ the dK/dV kernel
    adds to (and dQ itself where key_start may leave query blocks no key block reaches), the dK/dV
    kernel's last key block per query block converts it: no torch fill or copy over a dQ-sized tensor, a
    zeroed int32 count per query block only."""
    monkeypatch.setattr(fa_launch, "DQ_WORKSPACE_LIMIT", 0)
    q, k, v, out = (torch.randn(2, 3, 40, 32, dtype=torch.float16) for _ in range(4))
    key_start = None if key_start is None else torch.tensor(key_start * 2)

    class RecordOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            ops.append((str(func), result.shape if isinstance(result, torch.Tensor) else None))
            return result

    ops, lse = [], torch.zeros(2, 3, 40)
    with common.capture_launches() as launches, RecordOps():
        dq, _, _ = fa_launch.launch_backward(out, q, k, v, out, lse, True, 0.0, 0.2, None, key_start, False,
                                             fa.INTERPRETER_CONFIGS)
    block_m = fa.INTERPRETER_CONFIGS.backward_kv_dq_masked.block_m
    assert [op for op, shape in ops if shape == q.shape and not op.startswith("aten.empty")] == []
    assert [shape for op, shape in ops if "zero" in op or "fill" in op] == [(6, -(-40 // block_m))]  # the counts
    delta_names, kv_names = (kernel.arg_names for kernel in (fa_kernels._attention_bwd_delta_kernel,
                                                             fa_kernels._attention_bwd_kv_kernel))
    dq_sum = launches[0].args[delta_names.index("DQ_SUM")]
    assert dq_sum.dtype == torch.float32 and dq_sum.shape == q.shape
    assert (launches[0].args[delta_names.index("DQ")] is dq) == (key_start is not None)
    assert launches[1].args[kv_names.index("DQ_SUM")] is dq_sum and launches[1].args[kv_names.index("DQ")] is dq
    assert launches[1].args[kv_names.index("DQ_COUNT")].dtype == torch.int32


def test_causal_backward_with_more_queries_than_keys_is_refused():
    """The partial-dQ workspace's layout assumes every query sees a key, as the public op does."""
    q, k = torch.randn(1, 1, 8, 16), torch.randn(1, 1, 4, 16)
    lse = torch.zeros(1, 1, 8)
    with pytest.raises(ValueError, match="q_len 8, k_len 4"):
        fa_launch.launch_backward(q, q, k, k, q, lse, True, 0.0, 0.25, None, None, True, fa.INTERPRETER_CONFIGS)


def test_model_with_atomic_dq_matches_the_deterministic_model():
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 45), device=DEVICE)
    want = loss_and_grads(model, idx, "triton")
    model.config.deterministic_attention = False
    assert all(block.attn.config.deterministic_attention is False for block in model.transformer.h)
    assert_same_step(loss_and_grads(model, idx, "triton"), want)


# ---- left padding: key_start ----

# (batch, heads, q_len, k_len, head_dim, causal, dtype, key_start): padding that ends inside a key
# block and on its edge, none, all of it (key_start >= k_len: every query sees nothing), enough that
# the first causal queries see nothing, fewer queries than keys, and non-causal.
PADDED_SHAPES = [
    (3, 2, 40, 40, 32, True, torch.float32, [0, 5, 40]),
    (2, 1, 45, 45, 16, True, torch.float16, [16, 33]),
    (2, 1, 7, 50, 48, True, torch.float32, [17, 49]),
    (2, 2, 1, 37, 64, True, torch.float16, [36, 3]),
    (2, 1, 33, 20, 16, False, torch.float32, [3, 25]),
    (2, 1, 70, 70, 80, True, torch.float16, [32, 69]),
]


@pytest.mark.parametrize("batch,heads,q_len,k_len,head_dim,causal,dtype,key_start", PADDED_SHAPES)
def test_key_start_matches_float64_reference(batch, heads, q_len, k_len, head_dim, causal, dtype, key_start):
    """Padding keys are hidden from every query; queries that see no key give zeros and zero
    gradients (no NaN), on the kernel and on the eager path."""
    torch.manual_seed(q_len * 1000 + k_len + sum(key_start))
    q, k, v = make_inputs(batch, heads, q_len, k_len, head_dim, dtype)
    grad_out = torch.randn(batch, heads, q_len, head_dim, device=DEVICE).to(dtype)
    key_start = torch.tensor(key_start, device=DEVICE)
    out, grads = compare_attention(q, k, v, grad_out, causal=causal, key_start=key_start)
    blind = ~fa.visible_mask(q_len, k_len, causal, key_start, q.device).any(-1)  # (batch, 1, q_len)
    assert torch.equal(out.masked_fill(~blind[..., None], 0.0), torch.zeros_like(out))
    assert all(torch.isfinite(t).all() for t in (out, *grads))
    if dtype == torch.float32:
        compare_attention(q, k, v, grad_out, backend="torch", causal=causal, key_start=key_start)


def test_key_start_int32_and_negative():
    """int32 counts work like int64 ones; a negative count hides nothing."""
    torch.manual_seed(9)
    q, k, v = make_inputs(2, 1, 20, 20, 16, torch.float32)
    with kernels.use_backend("triton"):
        plain = kernels.flash_attention(q, k, v)
        padded = kernels.flash_attention(q, k, v, key_start=torch.tensor([-3, 4], dtype=torch.int32, device=DEVICE))
    assert torch.equal(padded[0], plain[0])
    want = fa.attention_reference(q.double(), k.double(), v.double(), key_start=torch.tensor([0, 4]))
    torch.testing.assert_close(padded.double(), want, **tolerance(torch.float32, "flash_attention output"))


@pytest.mark.parametrize("key_start,error", [
    (torch.tensor([1.0, 2.0]), "int32 or int64 tensor"),
    ([1, 2], "int32 or int64 tensor"),
    (torch.tensor([1, 2, 3]), r"shape \(2,\)"),
])
def test_bad_key_start_raises_clear_errors(key_start, error):
    q = torch.randn(2, 1, 4, 16)
    for name in ("triton", "torch"):
        with kernels.use_backend(name), pytest.raises(ValueError, match=error):
            kernels.flash_attention(q, q, q, key_start=key_start)


# ---- dropout ----


@pytest.mark.parametrize("batch,heads,q_len,k_len,head_dim,causal,dtype,key_start", [
    (1, 2, 65, 65, 32, True, torch.float32, None),
    (2, 1, 17, 40, 80, True, torch.float16, [30, 5]),
    (1, 1, 33, 50, 64, False, torch.float32, None),
])
def test_dropout_matches_reference_with_the_kernels_mask(batch, heads, q_len, k_len, head_dim, causal, dtype,
                                                         key_start):
    """The kernels' output and gradients equal the reference computed with their exact keep-mask,
    which depends on the seed drawn from torch's generator and not on the block sizes."""
    p = 0.3
    key_start = None if key_start is None else torch.tensor(key_start, device=DEVICE)
    q, k, v = make_inputs(batch, heads, q_len, k_len, head_dim, dtype)
    grad_out = torch.randn(batch, heads, q_len, head_dim, device=DEVICE).to(dtype)
    torch.manual_seed(11)
    keep = dropout_keep_mask(fa_launch.dropout_seed(), batch, heads, q_len, k_len, p, DEVICE)
    assert 0 < keep.float().mean() < 1
    torch.manual_seed(11)  # the kernels draw the same seed
    compare_attention(q, k, v, grad_out, keep_mask=keep, causal=causal, dropout_p=p, key_start=key_start)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate(p):
    """About 1 - p of the probabilities are kept (5 standard deviations), different seeds differ."""
    keep = dropout_keep_mask(1234, 2, 2, 150, 170, p, DEVICE)
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    assert not torch.equal(keep, dropout_keep_mask(1235, 2, 2, 150, 170, p, DEVICE))
    # Heads and rows draw different numbers: the mask does not repeat across them.
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0, 0], keep[0, 0, 1])


def test_dropout_same_seed_same_result():
    q, k, v = make_inputs(1, 2, 40, 40, 16, torch.float32)
    with kernels.use_backend("triton"):
        torch.manual_seed(5)
        a = kernels.flash_attention(q, k, v, dropout_p=0.5)
        torch.manual_seed(5)
        b = kernels.flash_attention(q, k, v, dropout_p=0.5)
        c = kernels.flash_attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---- configurations per GPU ----


@pytest.mark.parametrize("major,minor,shared_kib,table", [
    (8, 0, 163, 80), (8, 0, None, 80),  # A100
    (8, 6, 99, 86), (8, 9, 99, 86), (8, 9, None, 86),  # RTX 30xx/40xx, A10, L4
    (9, 0, 227, 90), (9, 0, None, 90), (12, 0, 99, 86),  # H100; a consumer Blackwell part
])
def test_table_is_chosen_by_shared_memory(major, minor, shared_kib, table):
    shared = None if shared_kib is None else shared_kib * 1024
    assert fa.table_for(major, minor, shared) == table


# ---- the backend switch and bad input ----


@pytest.mark.parametrize("shape,dtype,words", [
    ((1, 1, 8, 130), torch.float32, "head_dim 130"),
    ((1, 1, 8, 33), torch.float16, "head_dim 33"),
    ((1, 1, 8, 16), torch.float64, "dtype torch.float64"),
    ((1, 1, 8, 16), torch.bfloat16, "bfloat16 on CPU"),
    ((1, 1, 0, 16), torch.float32, "empty input"),
    ((65536, 1, 1, 16), torch.float32, "batch x heads = 65536"),
])
def test_unsupported_input_raises_on_triton_and_runs_eager_on_auto(shape, dtype, words):
    if CUDA and dtype == torch.bfloat16:
        pytest.skip("bfloat16 is supported on a GPU")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(shape, device=DEVICE).to(dtype)
    with kernels.use_backend("triton"), pytest.raises(kernels.BackendError, match=words):
        kernels.flash_attention(q, q, q)
    # PyTorch's math backend for the eager path: its fused CUDA kernels have had grid limits of their own.
    with kernels.use_backend("auto"), sdpa_kernel(SDPBackend.MATH):
        route = kernels.explain("flash_attention", q, q, q)
        assert not route.use_triton
        out = kernels.flash_attention(q, q, q)
        want = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("q_shape,k_shape,error", [
    ((1, 2, 8, 16), (1, 2, 8), "4-D"),
    ((1, 2, 8, 16), (1, 3, 8, 16), "shapes do not match"),
    ((1, 2, 8, 16), (1, 2, 8, 32), "shapes do not match"),
    ((1, 2, 9, 16), (1, 2, 8, 16), "at least as many keys as queries"),
])
def test_bad_shapes_raise_clear_errors(q_shape, k_shape, error):
    q, k = torch.randn(q_shape), torch.randn(k_shape)
    for name in ("triton", "torch"):
        with kernels.use_backend(name), pytest.raises(ValueError, match=error):
            kernels.flash_attention(q, k, k)


def test_bad_dtype_and_dropout_raise_clear_errors():
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="dtypes differ"):
        kernels.flash_attention(q, q.half(), q)
    with pytest.raises(ValueError, match="dropout_p"):
        kernels.flash_attention(q, q, q, dropout_p=1.0)


# ---- the model: one training step, and torch.compile ----


def tiny_model(attn_dropout=0.0):
    torch.manual_seed(0)
    config = gptfast.GPTConfig(vocab_size=97, context_length=64, n_embd=64, n_head=2, n_layer=2,
                               attn_dropout=attn_dropout)
    return gptfast.GPT(config).to(DEVICE)


# float32 model on a GPU: the attention kernel multiplies in TF32.
MODEL_TOLERANCE = dict(rtol=1e-2, atol=1e-3) if CUDA else dict(rtol=1e-4, atol=1e-5)


def loss_and_grads(model, idx, backend, runner=None):
    """Loss and parameter gradients of ``runner`` (the model, or a compiled wrapper of it)."""
    model.zero_grad()
    with kernels.use_backend(backend):
        _, loss = (model if runner is None else runner)(idx, targets=idx)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_step(got, want):
    (loss, grads), (want_loss, want_grads) = got, want
    torch.testing.assert_close(loss, want_loss, **MODEL_TOLERANCE)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], **MODEL_TOLERANCE, msg=lambda m, name=name: f"{name}: {m}")


def test_model_training_step_triton_matches_torch():
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 45), device=DEVICE)
    assert_same_step(loss_and_grads(model, idx, "triton"), loss_and_grads(model, idx, "torch"))


def test_model_trains_with_attention_dropout_on_triton():
    """Attention dropout stays on the kernel: the same seed gives the same loss, another seed not."""
    model = tiny_model(attn_dropout=0.2).train()
    idx = torch.randint(0, 97, (1, 40), device=DEVICE)
    with kernels.use_backend("triton"):
        assert kernels.explain("flash_attention", *(torch.zeros(1, 2, 40, 32, device=DEVICE),) * 3,
                               True, 0.2).use_triton
    torch.manual_seed(7)
    first, grads = loss_and_grads(model, idx, "triton")
    torch.manual_seed(7)
    again, _ = loss_and_grads(model, idx, "triton")
    other, _ = loss_and_grads(model, idx, "triton")
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_torch_compile_fullgraph_model():
    """The model compiles with fullgraph=True and gives the eager results, on "torch" (the eager
    fallbacks) and on "triton" (the custom operators, interpreted)."""
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 33), device=DEVICE)
    want = loss_and_grads(model, idx, "torch")
    compiled = torch.compile(model, fullgraph=True)
    try:
        for backend in ("torch", "triton"):
            assert_same_step(loss_and_grads(model, idx, backend, runner=compiled), want)
    finally:
        torch._dynamo.reset()


def test_left_padded_batch_on_triton_matches_each_prompt_alone():
    """The model hides left padding with key_start on the kernel: a padded row's logits and greedy
    tokens (through the key/value cache) equal those of its prompt run alone."""
    model = tiny_model().eval()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (3, 11)]
    padded = torch.tensor([[0] * 8 + prompts[0], prompts[1]], device=DEVICE)
    with kernels.use_backend("triton"), torch.no_grad():
        logits, _ = model(padded, left_pad=torch.tensor([8, 0], device=DEVICE))
        alone, _ = model(torch.tensor([prompts[0]], device=DEVICE))
        torch.testing.assert_close(logits[0, 8:], alone[0], **MODEL_TOLERANCE)
        batched = gptfast.generate(model, prompts, 4, temperature=0)
        assert batched == [gptfast.generate(model, [p], 4, temperature=0)[0] for p in prompts]


# The GPU block tables under the interpreter: the tests above use small interpreter tiles, so this
# runs the shapes that GPUs launch (128-row query blocks, 64-key blocks, unequal dK/dV and dQ
# tiles) through the causal skipping, tail masking and left-padding logic before any GPU sees them.
@pytest.mark.skipif(CUDA, reason="on a GPU every test above already runs the GPU tables")
@pytest.mark.parametrize("table", fa.ARCHES)
@pytest.mark.parametrize("dtype, head_dim", [(torch.float16, 64), (torch.float16, 80), (torch.float32, 128)])
def test_gpu_tables_under_interpreter(monkeypatch, table, dtype, head_dim):
    monkeypatch.setattr(fa_launch, "configs_for",
                        lambda q: fa.tuned_configs(table, fa.head_dim_pad(q.shape[-1]), q.element_size()))
    torch.manual_seed(table + head_dim)
    cases = [(1, 1, 200, 200, True), (1, 1, 130, 259, True), (1, 1, 70, 150, False)]
    for batch, heads, q_len, k_len, causal in cases:
        q, k, v = make_inputs(batch, heads, q_len, k_len, head_dim, dtype)
        grad_out = torch.randn(batch, heads, q_len, head_dim).to(dtype)
        compare_attention(q, k, v, grad_out, causal=causal)
    # Left padding that ends inside the first 128-row block and past a 64-key block edge.
    q, k, v = make_inputs(2, 1, 150, 150, head_dim, dtype)
    grad_out = torch.randn(2, 1, 150, head_dim).to(dtype)
    key_start = torch.tensor([0, 70])
    compare_attention(q, k, v, grad_out, key_start=key_start)


def test_key_end_hides_a_static_caches_unfilled_slots():
    """key_end: the causal diagonal ends at each row's key_end, later keys are hidden; the same as
    attending over each row's filled prefix alone, and as the float64 reference."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 16), torch.randn(3, 2, 20, 16), torch.randn(3, 2, 20, 16)
    end = torch.tensor([5, 20, 2])
    out = kernels.flash_attention(q, k, v, key_end=end)
    for b, n in enumerate(end.tolist()):
        prefix = kernels.flash_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n])
        torch.testing.assert_close(out[b:b + 1], prefix)
    want = fa.attention_reference(q.double(), k.double(), v.double(), key_end=end)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"key_end must have shape \(3,\)"):
        kernels.flash_attention(q, k, v, key_end=end[:2])


# ---- decoding: the split-key kernels ----

# (batch, heads, q_len, k_len, head_dim, causal, key_start, key_end): odd cache lengths cut into
# several chunks (the interpreter counts 4 SMs), key_start and key_end inside and on key blocks,
# a row that sees nothing (key_start >= key_end), one and several queries, non-causal, float16.
DECODE_SHAPES = [
    (1, 1, 1, 1, 64, True, None, None, torch.float32),
    (1, 1, 1, 97, 64, True, None, None, torch.float16),
    (1, 2, 3, 131, 48, True, [5], None, torch.float32),
    (2, 1, 1, 100, 32, True, None, [77, 100], torch.float16),
    (3, 1, 5, 70, 16, True, [3, 0, 40], [70, 9, 33], torch.float32),
    (2, 1, 16, 45, 128, False, [31, 2], [33, 45], torch.float32),
]


@pytest.mark.parametrize("batch,heads,q_len,k_len,head_dim,causal,key_start,key_end,dtype", DECODE_SHAPES)
def test_decode_matches_float64_reference(batch, heads, q_len, k_len, head_dim, causal, key_start, key_end, dtype):
    torch.manual_seed(q_len * 1000 + k_len)
    q, k, v = make_inputs(batch, heads, q_len, k_len, head_dim, dtype)
    bounds = {name: torch.tensor(value, device=DEVICE) for name, value in
              (("key_start", key_start), ("key_end", key_end)) if value is not None}
    assert fa_launch.decodes(q, 0.0) and common.cdiv(k_len, fa_launch.decode_chunk(q, k_len)) > (k_len > 40)
    with kernels.use_backend("triton"), torch.no_grad():
        out = kernels.flash_attention(q, k, v, causal=causal, **bounds)
    want = fa.attention_reference(q.double(), k.double(), v.double(), causal=causal, **bounds)
    torch.testing.assert_close(out.double(), want, **tolerance(dtype, "flash_attention output"))


def test_decode_is_deterministic_and_its_lse_is_exact():
    torch.manual_seed(5)
    q, k, v = make_inputs(1, 2, 2, 150, 64, torch.float16)
    runs = [fa_launch._forward(q, k, v, True, 0.0, 0.125, None, None) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    scores = (q.double() @ k.double().transpose(-2, -1)) * 0.125
    scores = scores.masked_fill(~fa.causal_mask(2, 150), float("-inf"))
    torch.testing.assert_close(runs[0][1].double(), scores.logsumexp(-1), rtol=1e-5, atol=1e-5)


def test_decode_fills_every_sm_of_a_hopper():
    """GPT-2 at batch 1 (12 heads, 1024 cached keys): at least as many decode programs as SMs."""
    from gptfast.kernels import common

    q = torch.empty(1, 12, 1, 64, device="meta", dtype=torch.bfloat16)
    k = torch.empty(1, 12, 1024, 64, device="meta", dtype=torch.bfloat16)
    with common.targeting(common.GPU(90, 132, 227 * 1024)), common.capture_launches() as launches:
        fa_launch._forward(q, k, k, True, 0.0, 0.125, None, None)
    assert [launch.kernel for launch in launches] == [fa_kernels._attention_decode_kernel,
                                                      fa_kernels._attention_decode_reduce_kernel]
    assert math.prod(launches[0].grid) >= 132


def test_key_end_with_gradients_or_many_queries_is_refused_by_the_kernels():
    q, k = torch.randn(1, 1, 17, 16, requires_grad=True), torch.randn(1, 1, 20, 16)
    end = torch.tensor([18])
    with kernels.use_backend("triton"):
        with pytest.raises(kernels.BackendError, match="key_end with 17 queries"):
            kernels.flash_attention(q, k, k, key_end=end)
        with pytest.raises(kernels.BackendError, match="key_end with gradients"):
            kernels.flash_attention(q[:, :, :1], k, k, key_end=end)


def opcheck_cases():
    """(custom operator, arguments) for tests/test_opcheck.py: the forward with and without key_start,
    causal or not, and both backwards."""
    q, k, v = (torch.randn(2, 3, 20, 16) for _ in range(3))
    key_start = torch.tensor([0, 5])
    out, lse = fa_launch._forward(q, k, v, True, 0.0, 0.25, None, key_start)
    grad = torch.randn_like(out)
    return [(fa_launch._forward, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), True, 0.0, 0.25, None,
                                  key_start)),
            (fa_launch._forward, (q.detach(), k.detach(), v.detach(), False, 0.0, 0.25, None, None)),
            (fa_launch._forward, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), True, 0.0, 0.25, None,
                                  None, None, False)),
            *[(fa_launch._backward, (grad, q.detach(), k.detach(), v.detach(), out, lse, True, 0.0, 0.25, None,
                                     key_start, deterministic)) for deterministic in (True, False)]]
