"""Data preparation round trips, batches, and a clear error for every kind of bad input."""

import json
import os

import numpy as np
import pytest
import torch

import gptfast.data as data
from gptfast.data import BatchStream, TokenData, default_corpus, prepare
from gptfast.tokenizer import TIKTOKEN_FILE_ENV

TEXT_A = "First file.\nIt has naïve café lines — and 東京.\n" * 20
TEXT_B = "Second file 🙂\r\nwith CRLF line ends\r\n" * 20


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(TEXT_A, encoding="utf-8")
    (folder / "sub" / "b.txt").write_bytes(TEXT_B.encode("utf-8"))
    (folder / ".hidden").write_bytes(b"\xff\xfe not read")
    return folder


def read_back(out) -> tuple[TokenData, np.ndarray]:
    d = TokenData(out)
    return d, np.concatenate([d.train, d.val])


@pytest.mark.parametrize("block_bytes", [data.BLOCK_BYTES, 7])  # 7: blocks split multi-byte characters
def test_char_round_trip(corpus, tmp_path, monkeypatch, block_bytes):
    monkeypatch.setattr(data, "BLOCK_BYTES", block_bytes)
    meta = prepare([corpus], tmp_path / "out", tokenizer="char", val_fraction=0.25)
    d, ids = read_back(tmp_path / "out")
    assert meta["dtype"] == "uint16" and d.train.dtype == np.uint16
    assert isinstance(d.train, np.memmap)
    assert d.tokenizer().decode(ids.tolist()) == TEXT_A + TEXT_B  # sorted paths, hidden file skipped
    assert len(ids) == meta["num_tokens"] == len(TEXT_A + TEXT_B)
    assert len(d.val) == meta["num_val_tokens"] == round(len(ids) * 0.25)
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["tokenizer"]["kind"] == "char"


@pytest.mark.skipif(not os.environ.get(TIKTOKEN_FILE_ENV), reason=f"no local GPT-2 ranks file (${TIKTOKEN_FILE_ENV})")
def test_gpt2_round_trip_separates_files(corpus, tmp_path):
    prepare([corpus / "a.txt", corpus / "sub" / "b.txt"], tmp_path / "out", tokenizer="gpt2")
    d, ids = read_back(tmp_path / "out")
    tok = d.tokenizer()
    assert d.meta["dtype"] == "uint16" and (ids == tok.eot_token_id).sum() == 1
    assert tok.decode(ids.tolist()) == TEXT_A + "<|endoftext|>" + TEXT_B


def test_wide_vocabulary_uses_uint32(tmp_path):
    text = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 70_000) if not 0xD800 <= c < 0xE000)
    (tmp_path / "wide.txt").write_text(text, encoding="utf-8")
    meta = prepare([tmp_path / "wide.txt"], tmp_path / "out")
    d, ids = read_back(tmp_path / "out")
    assert meta["dtype"] == "uint32" and ids.max() >= 1 << 16
    assert d.tokenizer().decode(ids.tolist()) == text


def test_default_corpus(tmp_path):
    text = default_corpus()
    assert len(text) > 100_000 and "def" in text
    meta = prepare(None, tmp_path / "out")
    assert meta["num_tokens"] == len(text) and meta["sources"] == ["<embedded corpus: pydoc>"]


def test_progress_bar_on_large_inputs(corpus, tmp_path, monkeypatch, capsys):
    prepare([corpus], tmp_path / "small")
    assert "tokenizing" not in capsys.readouterr().err
    monkeypatch.setattr(data, "PROGRESS_MIN_BYTES", 100)  # as if the corpus were large
    prepare([corpus], tmp_path / "large")
    err = capsys.readouterr().err
    assert "reading" in err and "tokenizing" in err and "100%" in err


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder.*missing.txt"):
        prepare([tmp_path / "missing.txt"], tmp_path / "out")


@pytest.mark.parametrize("content", [b"", None])  # an empty file; an empty folder
def test_empty_input(tmp_path, content):
    if content is None:
        (tmp_path / "empty").mkdir()
        source, match = tmp_path / "empty", "holds no files"
    else:
        source, match = tmp_path / "empty.txt", "no text to train on"
        source.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        prepare([source], tmp_path / "out")
    assert not (tmp_path / "out" / "meta.json").exists()


def test_no_sources(tmp_path):
    with pytest.raises(ValueError, match="no input"):
        prepare([], tmp_path / "out")


def test_files_in_folders_that_are_not_text_are_skipped(corpus, tmp_path, capsys):
    (corpus / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (corpus / "sub" / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (corpus / "zeros.bin").write_bytes(b"\x00" * 64)  # valid UTF-8, but binary
    for tokenizer in ("char", "gpt2") if os.environ.get(TIKTOKEN_FILE_ENV) else ("char",):
        meta = prepare([corpus], tmp_path / tokenizer, tokenizer=tokenizer)
        err = capsys.readouterr().err
        assert err.count("warning: skipping") == 3 and "skipped 3 file(s) that are not UTF-8 text" in err
        assert "image.png' is not UTF-8 text: undecodable bytes at byte offset 0" in err
        assert "zeros.bin' is not text: a NUL byte at byte offset 0" in err
        assert meta["sources"] == [str(corpus / "a.txt"), str(corpus / "sub" / "b.txt")]
        d, ids = read_back(tmp_path / tokenizer)
        sep = "<|endoftext|>" if tokenizer == "gpt2" else ""
        assert d.tokenizer().decode(ids.tolist()) == TEXT_A + sep + TEXT_B


def test_nothing_textual_is_an_error(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "a.dat").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "bin" / "b.dat").write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match="none of the 2 file.s. is UTF-8 text"):
        prepare([tmp_path / "bin"], tmp_path / "out")
    assert not (tmp_path / "out" / "meta.json").exists()


def test_include_and_exclude_choose_files(corpus, tmp_path):
    (corpus / "notes.md").write_text("markdown\n")
    meta = prepare([corpus], tmp_path / "a", include=["*.txt"])
    assert meta["sources"] == [str(corpus / "a.txt"), str(corpus / "sub" / "b.txt")]
    meta = prepare([corpus], tmp_path / "b", exclude=["sub/*", "*.md"])
    assert meta["sources"] == [str(corpus / "a.txt")]
    with pytest.raises(ValueError, match="holds no files matching the include/exclude globs"):
        prepare([corpus], tmp_path / "c", include=["*.rst"])


def test_cli_prepare_include_exclude(corpus, tmp_path, capsys):
    from gptfast.cli import main

    (corpus / "notes.md").write_text("markdown\n")
    assert main(["prepare", str(corpus), "--out", str(tmp_path / "d"), "--include", "*.md"]) == 0
    assert TokenData(tmp_path / "d").meta["sources"] == [str(corpus / "notes.md")]


def test_undecodable_bytes(tmp_path):
    (tmp_path / "latin1.txt").write_bytes(b"good line\n" + "caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt.*not UTF-8.*byte offset 13"):
        prepare([tmp_path / "latin1.txt"], tmp_path / "out")


def test_bad_val_fraction(tmp_path):
    with pytest.raises(ValueError, match="val_fraction"):
        prepare(None, tmp_path / "out", val_fraction=1.0)


def test_not_a_data_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="gptfast prepare"):
        TokenData(tmp_path)


def test_shorter_than_one_context():
    with pytest.raises(ValueError, match=r"train split holds 8 tokens.*\(9\).*smaller context"):
        BatchStream(np.arange(8, dtype=np.uint16), context_length=8)
    BatchStream(np.arange(9, dtype=np.uint16), context_length=8)  # exactly one window fits


def test_batches_shift_by_one():
    tokens = np.arange(1000, dtype=np.uint16)
    stream = BatchStream(tokens, context_length=16, seed=3)
    starts = stream.next_starts(5)
    x, y = stream.batch(starts)
    assert x.shape == y.shape == (5, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 0], starts) and torch.equal(y, x + 1)
    assert starts.max() <= 1000 - 17


def test_sequential_order_walks_and_wraps():
    stream = BatchStream(np.arange(50, dtype=np.uint16), context_length=16, order="sequential")
    assert stream.next_starts(4).tolist() == [0, 16, 32, 0]  # 48 + 17 > 50: wrap around
    x, y = stream.batch(torch.tensor([32]))
    assert x[0].tolist() == list(range(32, 48)) and y[0].tolist() == list(range(33, 49))


@pytest.mark.parametrize("order", BatchStream.ORDERS)
def test_stream_state_resumes(order):
    tokens = np.arange(5000, dtype=np.uint16)
    a = BatchStream(tokens, 32, order=order, seed=7)
    a.next_starts(20)
    state = a.state_dict()
    expected = a.next_starts(10)
    b = BatchStream(tokens, 32, order=order, seed=99)
    b.load_state_dict(state)
    assert torch.equal(b.next_starts(10), expected)


def test_unknown_order():
    with pytest.raises(ValueError, match="unknown batch order"):
        BatchStream(np.arange(100, dtype=np.uint16), 8, order="shuffled")
