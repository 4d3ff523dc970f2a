"""Hugging Face GPT-2 checkpoints: load into our GPT, save from it, cross-checked against transformers."""

import json
import os
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


def test_sharded_checkpoint_in_the_hugging_face_cache_whose_shards_link_into_blobs(tmp_path):
    """The cache's snapshots/<revision>/ holds symlinks into ../../blobs/: the folder's files, loaded;
    an index naming ../ or an absolute path is still refused."""
    from safetensors.torch import load_file, save_file

    hf = hf_checkpoint(tmp_path / "saved", 2, 2, 16, 30, 12, False)
    tensors = load_file(str(tmp_path / "saved" / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    blobs, snapshot = tmp_path / "cache" / "blobs", tmp_path / "cache" / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    files = {"config.json": (tmp_path / "saved" / "config.json").read_bytes(),
             "model.safetensors.index.json": json.dumps(
                 {"weight_map": {k: file for file, part in shards.items() for k in part}}).encode()}
    for file, part in shards.items():
        save_file({k: tensors[k] for k in part}, str(blobs / file))
        files[file] = (blobs / file).read_bytes()
    for i, (file, content) in enumerate(files.items()):
        (blobs / file).unlink(missing_ok=True)
        (blobs / f"blob{i}").write_bytes(content)
        (snapshot / file).symlink_to(f"../../blobs/blob{i}")
    idx = torch.randint(0, 30, (2, 12))
    with torch.no_grad():
        relative_close(from_pretrained(snapshot)(idx)[0], hf(idx).logits, rtol=1e-5)
    for target in ("../../blobs/blob1", str(blobs / "blob1")):
        (snapshot / "model.safetensors.index.json").unlink()
        (snapshot / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": target}}))
        with pytest.raises(ValueError, match=f"weight_map names '{target}', outside the checkpoint folder: refused"):
            from_pretrained(snapshot)


class _Exploit:
    ran = False

    def __reduce__(self):
        return (setattr, (_Exploit, "ran", True))


def test_no_pickled_code_runs(tmp_path):
    hf_checkpoint(tmp_path, 1, 1, 8, 20, 8, True)
    (tmp_path / "model.safetensors").unlink()
    torch.save({"transformer.wte.weight": _Exploit()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin' is not a PyTorch state dict: it holds pickled Python "
                                         r"objects \(setattr\).*refused") as error:
        from_pretrained(tmp_path)
    assert not _Exploit.ran and "weights_only" not in str(error.value)


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
    with pytest.raises(ImportError, match="needs huggingface_hub.*local checkpoint directory"):
        from_pretrained("gpt2-medium")


def test_hub_download_errors_are_explained(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    requested = []

    def offline(repo_id, **kwargs):
        requested.append(repo_id)
        raise ConnectionError("no network")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(ConnectionError, match="could not download 'gpt2'.*no network.*local checkpoint directory"):
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


def test_the_cli_says_offline_and_how_to_pass_a_local_folder(tmp_path, monkeypatch, capsys):
    from gptfast.cli import main
    from gptfast.data import prepare

    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub, "snapshot_download", lambda repo_id, **kw: (_ for _ in ()).throw(OSError("offline")))
    (tmp_path / "t.txt").write_text("abc\n" * 50)
    prepare([tmp_path / "t.txt"], tmp_path / "d")
    assert main(["eval", str(tmp_path / "d"), "--pretrained", "gpt2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gptfast eval: error: could not download 'gpt2'" in err
    assert "no network" in err and "pass a local checkpoint directory instead of the name" in err
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # a folder, but no safetensors package
    hf_checkpoint(tmp_path / "hf", 1, 1, 8, 20, 8, True)
    assert main(["eval", str(tmp_path / "d"), "--pretrained", str(tmp_path / "hf"), "--device", "cpu"]) == 2
    assert "needs safetensors (pip install safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.pop("n_embd"), "config.json: no 'n_embd' field"),
    (lambda c: c.pop("vocab_size"), "config.json: no 'vocab_size' field"),
    (lambda c: c.update(attn_pdrop="0.1"), "config.json: field 'attn_pdrop' is '0.1', expected int or float"),
    (lambda c: c.update(layer_norm_epsilon=-1e-5), "field 'layer_norm_epsilon' is -1e-05, expected a positive"),
    (lambda c: c.update(vocab_size=10**11), "more than this machine's"),
    (lambda c: c.update(layer_norm_epsilon=float("inf")), "field 'layer_norm_epsilon' is inf, expected a positive"),
    (lambda c: c.update(layer_norm_epsilon=0), "field 'layer_norm_epsilon' is 0.0, expected a positive"),
    (lambda c: c.update(n_layer=10**9), "1000000000 layers has .* more than this machine's"),  # hung
    (lambda c: [1, 2], "config.json: holds list, expected a JSON object"),
])
def test_a_bad_config_json_names_the_file_and_field(tmp_path, edit, words):
    hf_checkpoint(tmp_path, 1, 1, 8, 20, 8, True)
    config = json.loads((tmp_path / "config.json").read_text())
    edited = edit(config)
    (tmp_path / "config.json").write_text(json.dumps(edited if isinstance(edited, list) else config))
    with pytest.raises(ValueError, match=words):
        from_pretrained(tmp_path)


def test_damaged_safetensors_and_shard_indexes_that_leave_the_folder(tmp_path):
    hf_checkpoint(tmp_path, 1, 1, 8, 20, 8, True)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    for target in ("../x.safetensors", "/etc/passwd"):
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": target}}))
        with pytest.raises(ValueError, match=f"weight_map names '{target}', outside the checkpoint folder: refused"):
            from_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{")
    with pytest.raises(ValueError, match=r"model.safetensors.index.json: not valid JSON \(line 1"):
        from_pretrained(tmp_path)


def test_integer_tensors_are_refused_and_mixed_dtypes_converted(tmp_path, capsys):
    hf = hf_checkpoint(tmp_path, 2, 2, 16, 30, 12, True)
    name = "transformer.h.0.ln_1.weight"
    edit_checkpoint(tmp_path, lambda t: t.update({name: t[name].half()}))
    ours = from_pretrained(tmp_path)
    assert "mixes float16, float32 tensors: converted to float32" in capsys.readouterr().err
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    idx = torch.randint(0, 30, (2, 12))
    with torch.no_grad():
        relative_close(ours(idx)[0], hf(idx).logits, rtol=1e-2)
    edit_checkpoint(tmp_path, lambda t: t.update({"transformer.wpe.weight": t["transformer.wpe.weight"].long()}))
    with pytest.raises(ValueError, match="tensor 'transformer.wpe.weight' is torch.int64, not floating point"):
        from_pretrained(tmp_path)


# --- fine-tuning: gptfast train --init-from -------------------------------------------------------------

needs_ranks = pytest.mark.skipif(not os.environ.get("GPTFAST_TIKTOKEN_FILE"), reason="no local GPT-2 ranks file")


def finetune(data, out, **overrides):
    from gptfast.train import TrainConfig

    base = dict(data=[str(data)], out_dir=str(out), batch_size=2, max_steps=2, warmup_steps=1, eval_interval=2,
                eval_batches=1, log_interval=1, sample_tokens=0, progress=False, backend="torch", device="cpu")
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def gpt2_text(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finetune")
    (folder / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 60)
    return folder


@needs_ranks
def test_init_from_a_hugging_face_folder_fine_tunes_and_resumes(gpt2_text, tmp_path):
    from gptfast.checkpoint import load_checkpoint
    from gptfast.train import train

    hf = hf_checkpoint(tmp_path / "hf", 1, 2, 16, 50257, 32, True)
    # lr 0: the first step leaves the weights as they came (the text is prepared with GPT-2 BPE unasked).
    summary = train(finetune(gpt2_text / "text.txt", tmp_path / "out", init_from=str(tmp_path / "hf"), lr=0.0,
                             min_lr=0.0, max_steps=1, eval_interval=1, context_length=16))
    state = load_checkpoint(tmp_path / "out")
    assert state["tokenizer"] == {"kind": "gpt2"} and state["model_config"]["context_length"] == 16
    theirs = hf.state_dict()
    assert torch.equal(state["model"]["transformer.wte.weight"], theirs["transformer.wte.weight"])
    assert torch.equal(state["model"]["transformer.wpe.weight"], theirs["transformer.wpe.weight"][:16])
    assert torch.equal(state["model"]["transformer.h.0.mlp.c_fc.weight"], theirs["transformer.h.0.mlp.c_fc.weight"].t())
    val = torch.from_numpy(__import__("gptfast.data", fromlist=["TokenData"]).TokenData(
        tmp_path / "out" / "data").val[:17].astype("int64"))
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(hf(val[None, :16]).logits[0], val[1:])
    assert summary["val_loss"] == pytest.approx(want.item(), rel=1e-2)  # over 2 windows, here 1 of them
    resumed = train(finetune(gpt2_text / "text.txt", tmp_path / "out", resume=True, max_steps=3, lr=1e-3))
    assert resumed["step"] == 3


@needs_ranks
def test_init_from_needs_gpt2_tokens_and_a_gptfast_checkpoint_works(gpt2_text, tmp_path, capsys):
    from gptfast.cli import main
    from gptfast.train import train

    hf_checkpoint(tmp_path / "hf", 1, 2, 16, 50257, 32, True)
    capsys.readouterr()
    argv = ["train", str(gpt2_text / "text.txt"), "--init-from", str(tmp_path / "hf"), "--out-dir", str(tmp_path / "o"),
            "--batch-size", "2", "--max-steps", "1", "--sample-tokens", "0", "--no-progress", "--device", "cpu"]
    assert main(argv + ["--tokenizer", "char"]) == 2
    err = capsys.readouterr().err
    assert "is GPT-2, which reads GPT-2 BPE tokens, but the data is tokenized char" in err
    assert "--tokenizer gpt2" in err and err.count("\n") == 1
    assert main(argv + ["--preset", "mini"]) == 2
    assert "--preset mini and --init-from" in capsys.readouterr().err
    first = train(finetune(gpt2_text / "text.txt", tmp_path / "a", init_from=str(tmp_path / "hf"), context_length=16))
    again = train(finetune(gpt2_text / "text.txt", tmp_path / "b", init_from=str(tmp_path / "a"), lr=0.0, min_lr=0.0,
                           max_steps=1, eval_interval=1))
    assert again["step"] == 1 and again["val_loss"] < 12  # from the fine-tuned weights, not random ones
    assert first["val_loss"] == pytest.approx(again["val_loss"], abs=0.5)
