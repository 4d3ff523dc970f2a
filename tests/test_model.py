"""The eager GPT-2: published parameter counts, shapes, initial loss, and errors on bad input."""

import math

import pytest
import torch

from gptfast import GPT, GPTConfig

# Where the "triton" backend runs: the GPU, or the CPU under the interpreter (tests/conftest.py).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

CLASSIC = dict(vocab_size=50257, context_length=1024, emb_dim=768, n_heads=12, n_layers=12,
               drop_rate=0.1, qkv_bias=False)


def count(config: GPTConfig) -> int:
    with torch.device("meta"):
        return GPT(config).num_parameters()


def test_classic_dictionary_counts():
    config = GPTConfig.from_dict(CLASSIC)
    assert not config.tie_weights
    assert config.embd_dropout == config.attn_dropout == config.resid_dropout == 0.1
    n = count(config)
    assert n == 163_009_536
    assert round(n * 4 / 2**20, 2) == 621.83
    assert count(GPTConfig.from_dict({**CLASSIC, "tie_weights": True})) == 124_412_160


@pytest.mark.parametrize("name, expected", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                            ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_preset_counts(name, expected):
    assert count(GPTConfig.from_preset(name)) == expected


def test_tied_weights_are_one_tensor():
    model = GPT(GPTConfig.from_preset("tiny"))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "lm_head.weight" in model.state_dict()


def test_logits_shape_gpt2_vocabulary():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, context_length=16))
    logits, loss = model(torch.randint(0, 50257, (2, 4)))
    assert logits.shape == (2, 4, 50257) and loss is None


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padded_vocabulary_keeps_true_size(backend):
    """The padding rows of the vocabulary are never predicted: the loss is that of the true logits and
    the padding embeddings get no gradient, on both backends."""
    from gptfast import kernels

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=1000, n_layer=1, n_head=2, n_embd=32, context_length=16, vocab_multiple=64)
    model = GPT(config).to(DEVICE)
    assert model.transformer.wte.weight.shape[0] == 1024
    idx, targets = torch.randint(0, 1000, (2, 3, 5), device=DEVICE)
    with kernels.use_backend(backend):
        logits, loss = model(idx, targets, return_logits=True)
    assert logits.shape == (3, 5, 1000)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits.reshape(-1, 1000), targets.reshape(-1)))
    loss.backward()
    grad = model.transformer.wte.weight.grad
    assert grad[:1000].any() and not grad[1000:].any()


def test_initial_loss_near_uniform_and_backward():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=512, n_layer=2, n_head=4, n_embd=64, context_length=32)
    model = GPT(config)
    idx, targets = torch.randint(0, 512, (2, 4, 32))
    logits, loss = model(idx, targets)
    assert abs(loss.item() - math.log(512)) < 0.1
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.transformer.wpe.weight.grad.abs().sum() > 0


def test_last_only_logits():
    """Generation's forward: the last position's logits, equal to those of the full forward."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=100, n_layer=1, n_head=2, n_embd=32, context_length=16, vocab_multiple=64))
    idx = torch.randint(0, 100, (3, 9))
    full, _ = model(idx)
    last, _ = model(idx, last_only=True)
    assert last.shape == (3, 1, 100)
    torch.testing.assert_close(last, full[:, -1:])
    with pytest.raises(ValueError, match="last_only .* cannot compute a loss"):
        model(idx, idx, last_only=True)


def test_ignore_index():
    model = GPT(GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=32, context_length=8))
    idx = torch.randint(0, 64, (2, 8))
    targets = idx.clone()
    targets[:, :4] = -1
    logits, loss = model(idx, targets, return_logits=True)
    expected = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 64), targets[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_initialisation_statistics():
    torch.manual_seed(0)
    config = GPTConfig.from_preset("mini")
    model = GPT(config)
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 1e-3
    residual = 0.02 / math.sqrt(2 * config.n_layer)
    assert abs(model.transformer.h[0].attn.c_proj.weight.std().item() - residual) < 1e-3
    assert abs(model.transformer.h[0].mlp.c_proj.weight.std().item() - residual) < 1e-3
    assert model.transformer.h[0].attn.c_attn.bias.abs().max() == 0


def test_causality():
    """Changing a later token never changes earlier logits."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=100, n_layer=2, n_head=2, n_embd=32, context_length=16)).eval()
    idx = torch.randint(0, 100, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 100
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_gpt2_module_names():
    names = set(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, context_length=8)).state_dict())
    for name in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
                 "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
                 "transformer.h.0.attn.c_proj.weight", "transformer.h.0.mlp.c_fc.bias",
                 "transformer.h.0.mlp.c_proj.weight", "transformer.ln_f.bias", "lm_head.weight"]:
        assert name in names


@pytest.fixture
def small():
    return GPT(GPTConfig(vocab_size=100, n_layer=1, n_head=2, n_embd=32, context_length=8))


@pytest.mark.parametrize("idx, error, words", [
    (torch.zeros(8, dtype=torch.long), ValueError, "2-D"),
    (torch.zeros(1, 2, 8, dtype=torch.long), ValueError, "2-D"),
    ([[1, 2, 3]], ValueError, "2-D"),
    (torch.zeros(1, 8), TypeError, "integer"),
    (torch.zeros(1, 9, dtype=torch.long), ValueError, "context length"),
    (torch.full((1, 4), 100), ValueError, "token id 100"),
    (torch.full((1, 4), -3), ValueError, "token id -3"),
])
def test_bad_input(small, idx, error, words):
    with pytest.raises(error, match=words):
        small(idx)


def test_bad_targets(small):
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="targets shape"):
        small(idx, torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="target id 100"):
        small(idx, torch.full((1, 4), 100))


def test_a_training_step_makes_no_host_sync():
    """Forward, loss, backward, clipping and the optimizer step of two micro-batches on tensors without data
    (device "meta"): any read of a value on the host (.item(), .tolist(), bool(tensor), a copy to the CPU)
    raises there, as the ids' host check does, so the step as training runs it on a GPU makes none."""
    from gptfast.optim import make_optimizer, train_step

    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=100, n_layer=1, n_head=2, n_embd=32, context_length=8))
    optimizer = make_optimizer(model, lr=1e-3)
    idx = torch.zeros(2, 8, dtype=torch.long, device="meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        model._check_ids(idx, idx)  # what a CPU forward checks on the host: caught here
    loss, norm = train_step(model, optimizer, [(idx, idx), (idx, idx)], lr=1e-3, grad_clip=1.0)
    assert loss.device.type == norm.device.type == "meta"


def test_ids_off_the_cpu_are_checked_by_an_asynchronous_assert(small):
    """Off the CPU the ids' check is a device-side assert, with no host sync: here on CPU tensors, where it
    fails at once, its message naming the vocabulary."""
    small._assert_ids_async(torch.full((1, 4), 99), torch.full((1, 4), -1))  # the largest id, an ignored target
    zeros = torch.zeros(1, 4, dtype=torch.long)
    for idx, targets in ((torch.full((1, 4), 100), None), (zeros, torch.full((1, 4), -2))):
        with pytest.raises(RuntimeError, match=r"outside the vocabulary \[0, 100\)"):
            small._assert_ids_async(idx, targets)


def test_bad_config():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.from_preset("gpt5")
    with pytest.raises(ValueError, match="unknown keys"):
        GPTConfig.from_dict({"emb_dim": 64, "n_heads": 4, "n_layers": 1, "colour": 3})
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(drop_rate=1.5)


def test_autocast_layer_norms_write_the_autocast_dtype():
    """Under autocast the LayerNorms hand the next matmul its dtype directly (no float32 copy), and the
    loss stays within bf16 rounding of the float32 loss."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=128, n_layer=2, n_head=2, n_embd=64, context_length=16))
    idx, targets = torch.randint(0, 128, (2, 2, 16))
    seen = []
    model.transformer.h[0].ln_1.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    _, loss32 = model(idx, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss16 = model(idx, targets)
    assert seen == [torch.float32, torch.bfloat16]
    torch.testing.assert_close(loss16.float(), loss32, rtol=2e-2, atol=2e-2)


def test_autocast_training_step_triton_matches_torch():
    """float16 autocast (bf16 dot products are wrong under the Triton interpreter): the same loss and
    gradients on both backends, within float16 rounding."""
    from gptfast import kernels

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=96, n_layer=2, n_head=2, n_embd=64, context_length=24)).to(DEVICE)
    idx, targets = torch.randint(0, 96, (2, 2, 24), device=DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        model.zero_grad()
        with kernels.use_backend(backend), torch.autocast(DEVICE.type, dtype=torch.float16):
            _, loss = model(idx, targets)
        loss.backward()
        results[backend] = (loss.float(), [p.grad.clone() for p in model.parameters()])
    (loss_t, grads_t), (loss_k, grads_k) = results["torch"], results["triton"]
    torch.testing.assert_close(loss_k, loss_t, rtol=5e-3, atol=5e-3)
    for got, want in zip(grads_k, grads_t):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


def test_bfloat16_autocast_training_step_on_triton(interpreter_bf16_dot, monkeypatch):
    """The GPU training configuration: a bf16 autocast step through all four kernels (bf16
    LayerNorm outputs, bias + GELU, flash attention, the loss on padded bf16 logits) stays as close
    to the float32 step as bf16 allows: within 4% of each gradient's largest entry (eager bf16 is
    within 1%; flash attention rounds its probabilities to bf16 before the products)."""
    from gptfast import kernels
    from gptfast.kernels import backend

    if DEVICE.type == "cpu":  # the fixture mends the interpreter's bf16 dot: lift the refusal of bf16 on CPU
        check = backend._CHECKS[kernels.flash_attention]
        monkeypatch.setitem(backend._CHECKS, kernels.flash_attention, lambda *args, **kwargs: (
            None if (reason := check(*args, **kwargs)) and reason.startswith("bfloat16 on CPU") else reason))
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=96, n_layer=2, n_head=2, n_embd=64, context_length=24, vocab_multiple=64)
    model = GPT(config).to(DEVICE)
    idx, targets = torch.randint(0, 96, (2, 2, 24), device=DEVICE)
    results = {}
    for backend_name, dtype in (("torch", None), ("triton", torch.bfloat16)):
        model.zero_grad()
        with kernels.use_backend(backend_name), torch.autocast(DEVICE.type, torch.bfloat16, enabled=dtype is not None):
            _, loss = model(idx, targets)
        loss.backward()
        results[backend_name] = (loss, [p.grad.clone() for p in model.parameters()])
    (loss32, grads32), (loss16, grads16) = results["torch"], results["triton"]
    assert loss16.dtype == torch.float32 and abs(loss16.item() - loss32.item()) < 1e-2
    for (name, _), got, want in zip(model.named_parameters(), grads16, grads32):
        assert (got - want).abs().max() <= 0.04 * want.abs().max(), name


@pytest.mark.parametrize("field, value, expected", [
    ("layer_norm_eps", 0, "a positive finite number"),
    ("layer_norm_eps", -1, "a positive finite number"),
    ("layer_norm_eps", math.nan, "a positive finite number"),
    ("layer_norm_eps", math.inf, "a positive finite number"),
    ("layer_norm_eps", "1e-5", "int or float"),
    ("n_layer", True, "int"),
    ("n_layer", 2.0, "int"),
    ("attn_dropout", math.nan, r"a dropout rate in \[0, 1\)"),
    ("bias", 1, "bool"),
])
def test_every_config_field_is_validated_in_one_line_naming_it(field, value, expected):
    with pytest.raises(ValueError, match=rf"^GPTConfig: field '{field}' is .*, expected {expected}$"):
        GPTConfig(**{field: value})


def test_a_model_too_large_for_memory_is_refused_from_its_sizes_before_any_module_is_built():
    from gptfast.memory import parameter_count

    for config in (GPTConfig.from_preset("tiny"), GPTConfig(vocab_size=50, vocab_multiple=64, n_embd=24, n_head=3,
                                                           n_layer=2, bias=False, qkv_bias=False)):
        assert parameter_count(config) == count(config)
    with pytest.raises(ValueError, match=r"GPT\(config\): .* 1000000 layers .* more than this machine's"):
        GPT(GPTConfig(n_layer=1_000_000))  # building even its meta model took hours
    with torch.device("meta"):  # a meta model holds no memory: any size is built
        assert GPT(GPTConfig(n_layer=2, n_embd=100_000, n_head=1)).transformer.wte.weight.is_meta


def test_gpt_of_a_dictionary_says_to_pass_a_config():
    with pytest.raises(TypeError, match=r"^GPT takes a GPTConfig, or GPTConfig\(\*\*d\) for a dictionary d, got dict$"):
        GPT({"n_layer": 1})


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.uint16])
def test_other_integer_token_ids_give_the_int64_results(small, dtype):
    idx = torch.randint(0, 100, (2, 8))
    assert torch.equal(small(idx, idx)[1], small(idx.to(dtype), idx.to(dtype))[1])
    assert torch.equal(small(idx)[0], small(idx.to(dtype))[0])
    with pytest.raises(TypeError, match="targets must hold integer token ids, got dtype torch.float32"):
        small(idx, idx.float())
