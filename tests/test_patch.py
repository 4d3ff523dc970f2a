"""gptfast.patch: the patched model's outputs and gradients match the original's, state dicts keep their names."""

import copy

import pytest
import torch
import torch.nn as nn

from gptfast import GPT, GPTConfig, kernels, patch
from gptfast.patch import FusedLayerNorm, LinearBiasGELU

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

transformers.logging.set_verbosity_error()

# Float64 runs the same math in a different order: agreement to rounding. Float32: the GELU forms differ
# in the last bits (transformers' NewGELU is written out, ours is F.gelu's), hence the looser bound.
TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def assert_same_outputs_and_gradients(original: nn.Module, patched: nn.Module, run, dtype) -> None:
    """``run(model)`` returns an output tensor; compare it and the gradients of its weighted sum."""
    outputs = []
    for model in (original, patched):
        model.zero_grad()
        out = run(model)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        outputs.append(out.detach())
    torch.testing.assert_close(outputs[1], outputs[0], **TOLERANCE[dtype])
    grads = dict(patched.named_parameters())
    for name, p in original.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, **TOLERANCE[dtype], msg=name)


def mlp(dtype) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 40), nn.GELU(approximate="tanh"), nn.Linear(40, 12), nn.LayerNorm(12),
                         nn.Linear(12, 24, bias=False), nn.GELU(), nn.Linear(24, 5), nn.GELU(),
                         nn.LayerNorm(5, elementwise_affine=False)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sequential(dtype):
    original = mlp(dtype)
    patched = patch(copy.deepcopy(original))
    kinds = [type(m).__name__ for m in patched]
    assert kinds == ["LinearBiasGELU", "Identity", "Linear", "FusedLayerNorm", "LinearBiasGELU", "Identity",
                     "LinearBiasGELU", "Identity", "FusedLayerNorm"]
    assert [m.approximate for m in patched if isinstance(m, LinearBiasGELU)] == ["tanh", "none", "none"]
    x = torch.randn(3, 7, 12, dtype=dtype)
    assert_same_outputs_and_gradients(original, patched, lambda m: m(x), dtype)


def test_state_dict_names_and_tensors_are_kept():
    original = mlp(torch.float32)
    names = list(original.state_dict())
    weight = original[0].weight
    assert patch(original) is original and original[0].weight is weight  # in place, same tensors
    assert list(original.state_dict()) == names
    fresh = mlp(torch.float32)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    original.load_state_dict(fresh.state_dict())  # strict: every original name loads
    x = torch.randn(2, 12)
    torch.testing.assert_close(original(x), fresh(x), rtol=1e-4, atol=1e-5)
    twice = [type(m) for m in patch(original)]
    assert twice == [type(m) for m in original] and twice.count(LinearBiasGELU) == 3


def tiny_gpt2(dtype, activation="gelu_new", tie=True) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=61, n_positions=24, activation_function=activation,
                        tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None, attn_implementation="sdpa")
    model = GPT2LMHeadModel(config).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 1.0 if ".wte" in name or ".wpe" in name else 0.2)
    return model


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of each kernels op (the patched model's modules call them)."""
    counts = {"layer_norm": 0, "bias_gelu": 0, "flash_attention": 0, "cross_entropy": 0}
    for name in counts:
        real = getattr(kernels, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(kernels, name, counted)
    return counts


@pytest.mark.parametrize("dtype, activation, tie", [(torch.float64, "gelu_new", True), (torch.float32, "gelu", False),
                                                    (torch.float32, "gelu_pytorch_tanh", True)])
def test_transformers_gpt2_outputs_and_gradients(dtype, activation, tie, calls):
    original = tiny_gpt2(dtype, activation, tie)
    patched = patch(copy.deepcopy(original))
    block = patched.transformer.h[0]
    assert isinstance(block.ln_1, FusedLayerNorm) and isinstance(block.mlp.c_fc, LinearBiasGELU)
    assert isinstance(block.mlp.act, nn.Identity) and patched.config._attn_implementation == "gptfast"
    assert list(patched.state_dict()) == list(original.state_dict())
    idx = torch.randint(0, 61, (2, 24))
    assert_same_outputs_and_gradients(original, patched, lambda m: m(idx).logits, dtype)
    # 2 blocks x (2 LayerNorms, 1 GELU, 1 attention) + the final LayerNorm, in one forward pass.
    assert calls == {"layer_norm": 5, "bias_gelu": 2, "flash_attention": 2, "cross_entropy": 0}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_transformers_gpt2_loss(dtype, calls):
    """The causal-LM loss (labels shifted inside, -100 ignored; or summed over num_items_in_batch)
    and its gradients match transformers' own."""
    original = tiny_gpt2(dtype)
    patched = patch(copy.deepcopy(original))
    idx = torch.randint(0, 61, (2, 24))
    labels = idx.clone()
    labels[0, :5] = -100
    assert_same_outputs_and_gradients(original, patched, lambda m: m(idx, labels=labels).loss, torch.float32)
    assert calls["cross_entropy"] == 1
    summed = lambda m: m(idx, labels=labels, num_items_in_batch=torch.tensor(40)).loss  # noqa: E731
    assert_same_outputs_and_gradients(original, patched, summed, torch.float32)


def test_transformers_gpt2_padding_and_cached_generation(calls):
    original = tiny_gpt2(torch.float64)
    patched = patch(copy.deepcopy(original))
    idx = torch.randint(0, 61, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :4] = 0  # left padding: transformers' masked path, not the flash kernel
    with torch.no_grad():
        torch.testing.assert_close(patched(idx, attention_mask=mask).logits[0, 4:],
                                   original(idx, attention_mask=mask).logits[0, 4:], **TOLERANCE[torch.float64])
    assert calls["flash_attention"] == 0
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0,
                    attention_mask=torch.ones(1, 5, dtype=torch.long))
    with torch.no_grad():
        expected = original.generate(idx[1:, :5], **settings)
        assert patched.generate(idx[1:, :5], **settings).tolist() == expected.tolist()
    assert calls["flash_attention"] == 2 * 8  # the prefill, then one query per new token, in both blocks


def test_transformers_gpt2_state_dict_round_trip(tmp_path):
    original = tiny_gpt2(torch.float32)
    patched = patch(tiny_gpt2(torch.float32))
    patched.save_pretrained(tmp_path)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 61, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(idx).logits, original(idx).logits, rtol=1e-5, atol=1e-5)


def test_gptfast_model_is_unchanged_and_bad_input():
    model = GPT(GPTConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, context_length=8))
    before = [type(m) for m in model.modules()]
    assert [type(m) for m in patch(model).modules()] == before  # it already runs the kernels
    with pytest.raises(TypeError, match="torch.nn.Module"):
        patch("not a model")


def test_patched_gpt2_on_the_triton_kernels():
    """Under the "triton" backend (the interpreter on CPU) the patched model matches the original."""
    original = tiny_gpt2(torch.float32)
    patched = patch(copy.deepcopy(original))
    idx = torch.randint(0, 61, (2, 16))
    probe = torch.zeros(2, 4, 16, 8)
    with kernels.use_backend("triton"):
        routes = [kernels.explain("flash_attention", probe, probe, probe),
                  kernels.explain("layer_norm", probe, probe[0, 0, 0], probe[0, 0, 0]),
                  kernels.explain("bias_gelu", probe, probe[0, 0, 0])]
        unsupported = [str(r) for r in routes if not r.use_triton]
        if unsupported:
            pytest.skip(f"Triton kernels not available: {unsupported}")
        assert_same_outputs_and_gradients(original, patched, lambda m: m(idx).logits, torch.float32)
        assert_same_outputs_and_gradients(original, patched, lambda m: m(idx, labels=idx).loss, torch.float32)
