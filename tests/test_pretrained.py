"""Hugging Face GPT-2 checkpoints: load into our GPT, save from it, cross-checked against transformers."""

import json
import os
import pickle
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from gptfast import GPT, GPTConfig  # noqa: E402
from gptfast.generation import generate  # noqa: E402
from gptfast.pretrained import from_pretrained  # noqa: E402

transformers.logging.set_verbosity_error()

SHAPES = [  # (n_layer, n_head, n_embd, vocab_size, n_positions, tie_word_embeddings)
    (1, 1, 8, 50, 16, True),
    (2, 4, 32, 101, 32, True),
    (3, 3, 48, 67, 24, False),
]


def hf_checkpoint(directory, n_layer, n_head, n_embd, vocab, n_positions, tie, seed=0) -> GPT2LMHeadModel:
    """A random transformers GPT-2 saved with save_pretrained; biases and LayerNorms randomised too."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab,
                        n_positions=n_positions, tie_word_embeddings=tie, bos_token_id=None,
                        eos_token_id=None)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 1.0 if ".wte" in name or ".wpe" in name else 0.2)
    model.save_pretrained(directory)
    return model.eval()


def relative_close(ours: torch.Tensor, theirs: torch.Tensor, rtol: float) -> None:
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol * theirs.abs().max().item())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"L{s[0]}H{s[1]}C{s[2]}V{s[3]}tie{s[5]}")
def test_transformers_checkpoint_gives_same_logits_and_greedy_tokens(tmp_path, shape):
    hf = hf_checkpoint(tmp_path, *shape)
    ours = GPT.from_pretrained(str(tmp_path))
    assert not ours.training and ours.config.tie_weights == shape[5]
    assert ours.num_parameters() == sum(p.numel() for p in hf.parameters())
    idx = torch.randint(0, shape[3], (3, shape[4]))
    with torch.no_grad():
        relative_close(ours(idx)[0], hf(idx).logits, rtol=1e-5)
    prompt = idx[0, :5]
    with torch.no_grad():
        expected = hf.generate(prompt[None], attention_mask=torch.ones(1, 5, dtype=torch.long),
                               max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert generate(ours, [prompt.tolist()], 8, temperature=0)[0] == expected[0, 5:].tolist()


def test_our_checkpoint_loads_in_transformers(tmp_path):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=90, context_length=20, n_embd=24, n_head=2, n_layer=2,
                         vocab_multiple=64)).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.3)
    ours.save_pretrained(str(tmp_path))
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert hf.config.vocab_size == 90  # the rows padded for vocab_multiple are not saved
    idx = torch.randint(0, 90, (2, 20))
    with torch.no_grad():
        relative_close(hf(idx).logits, ours(idx)[0], rtol=1e-5)
        reloaded = from_pretrained(tmp_path)
        torch.testing.assert_close(reloaded(idx)[0], ours(idx)[0], rtol=0, atol=0)


def test_untied_model_round_trips(tmp_path):
    torch.manual_seed(1)
    ours = GPT(GPTConfig(vocab_size=40, context_length=8, n_embd=16, n_head=2, n_layer=1, tie_weights=False))
    ours.save_pretrained(tmp_path)
    reloaded = from_pretrained(tmp_path)
    assert reloaded.lm_head.weight is not reloaded.transformer.wte.weight
    for name, tensor in ours.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_pickled_gpt2model_checkpoint_with_mask_buffers(tmp_path):
    """The original gpt2 layout: pytorch_model.bin, no "transformer." prefix, causal-mask buffers."""
    hf = hf_checkpoint(tmp_path, 2, 2, 16, 30, 12, True)
    (tmp_path / "model.safetensors").unlink()
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 12, 12))
    torch.save(state, tmp_path / "pytorch_model.bin")
    idx = torch.randint(0, 30, (2, 12))
    with torch.no_grad():
        relative_close(from_pretrained(tmp_path)(idx)[0], hf(idx).logits, rtol=1e-5)


def test_sharded_safetensors_checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = hf_checkpoint(tmp_path, 2, 2, 16, 30, 12, False)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({k: tensors[k] for k in part}, str(tmp_path / file))
    weight_map = {k: file for file, part in shards.items() for k in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    idx = torch.randint(0, 30, (2, 12))
    with torch.no_grad():
        relative_close(from_pretrained(tmp_path)(idx)[0], hf(idx).logits, rtol=1e-5)


class _Exploit:
    ran = False

    def __reduce__(self):
        return (setattr, (_Exploit, "ran", True))


def test_no_pickled_code_runs(tmp_path):
    hf_checkpoint(tmp_path, 1, 1, 8, 20, 8, True)
    (tmp_path / "model.safetensors").unlink()
    torch.save({"transformer.wte.weight": _Exploit()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError):
        from_pretrained(tmp_path)
    assert not _Exploit.ran


def edit_checkpoint(directory, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(directory / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"))


@pytest.mark.parametrize("edit, words", [
    (lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"), r"missing tensors: \['transformer.h.1.mlp.c_fc.bias'\]"),
    (lambda t: t.update({"transformer.h.0.extra": torch.zeros(2)}), r"unexpected tensors: \['transformer.h.0.extra'\]"),
    (lambda t: t.update({"transformer.wpe.weight": torch.zeros(9, 16)}),
     r"transformer.wpe.weight: \(9, 16\) in the checkpoint, \(12, 16\) expected"),
])
def test_bad_tensors_are_named(tmp_path, edit, words):
    hf_checkpoint(tmp_path, 2, 2, 16, 30, 12, True)
    edit_checkpoint(tmp_path, edit)
    with pytest.raises(ValueError, match=words):
        from_pretrained(tmp_path)


def test_unsupported_config_and_missing_files(tmp_path):
    hf_checkpoint(tmp_path, 1, 1, 8, 20, 8, True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "activation_function": "relu", "n_inner": 7}))
    with pytest.raises(ValueError, match=r"activation_function='relu'.*n_inner=7"):
        from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a checkpoint directory nor one of gpt2"):
        from_pretrained(tmp_path / "absent")
    with pytest.raises(ValueError, match="qkv_bias=False"):
        GPT(GPTConfig(vocab_size=20, n_embd=8, n_head=1, n_layer=1, qkv_bias=False)).save_pretrained(tmp_path / "x")


def test_hub_names_fail_clearly_offline(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(RuntimeError, match="needs huggingface_hub"):
        from_pretrained("gpt2-medium")


def test_hub_download_errors_are_explained(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    requested = []

    def offline(repo_id, **kwargs):
        requested.append(repo_id)
        raise ConnectionError("no network")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(RuntimeError, match="could not download 'gpt2'.*local checkpoint directory"):
        from_pretrained("gpt2")
    assert requested == ["openai-community/gpt2"]


@pytest.mark.skipif(not os.environ.get("GPTFAST_TIKTOKEN_FILE"), reason="no local GPT-2 ranks file")
def test_eval_of_a_pretrained_checkpoint_matches_transformers(tmp_path, capsys):
    """`gptfast eval --pretrained DIR` on GPT-2 BPE data: the loss transformers gives for the same windows."""
    from gptfast.cli import main
    from gptfast.data import TokenData, prepare

    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    prepare([str(tmp_path / "text.txt")], tmp_path / "data", tokenizer="gpt2", val_fraction=0.5)
    theirs = hf_checkpoint(tmp_path / "hf", 1, 2, 16, 50257, 16, True)
    assert main(["eval", str(tmp_path / "data"), "--pretrained", str(tmp_path / "hf"), "--device", "cpu",
                 "--max-windows", "3"]) == 0
    val = torch.from_numpy(TokenData(tmp_path / "data").val[: 3 * 16 + 1].astype("int64"))
    with torch.no_grad():  # every window's 16 targets, the last included (transformers' own loss drops it)
        logits = theirs(val[:-1].view(3, 16)).logits
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 50257), val[1:].reshape(-1))
    assert f"48 tokens in windows of 16: loss {want.item():.4f}" in capsys.readouterr().out
