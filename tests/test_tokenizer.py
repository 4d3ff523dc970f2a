"""Tokenizers: GPT-2's published ids, round trips, saving, and the errors on bad input."""

import os

import pytest

from gptfast.tokenizer import TIKTOKEN_FILE_ENV, CharTokenizer, GPT2Tokenizer, load_tokenizer, tokenizer_from_dict

needs_ranks = pytest.mark.skipif(not os.environ.get(TIKTOKEN_FILE_ENV),
                                 reason=f"no local GPT-2 ranks file (${TIKTOKEN_FILE_ENV})")

ROUND_TRIP_TEXTS = ["", "Hello, I am", "  leading and trailing spaces  \n\n\ttabs\r\nCRLF",
                    "it's they're we'll I'd", "naïve café — 東京 🙂 emoji", "<|endoftext|> as text",
                    "numbers 3.14159 and 1,000,000"]


@pytest.fixture(scope="module")
def gpt2():
    if not os.environ.get(TIKTOKEN_FILE_ENV):
        pytest.skip(f"no local GPT-2 ranks file (${TIKTOKEN_FILE_ENV})")
    return GPT2Tokenizer()


def test_gpt2_published_ids(gpt2):
    assert gpt2.encode("Hello, I am") == [15496, 11, 314, 716]
    assert gpt2.encode("Every effort moves you") == [6109, 3626, 6100, 345]
    assert gpt2.vocab_size == 50257 and gpt2.eot_token_id == 50256
    assert gpt2.decode([15496, 11, 314, 716]) == "Hello, I am"


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_gpt2_round_trip(gpt2, text):
    ids = gpt2.encode(text)
    assert all(0 <= i < 50256 for i in ids)  # the special token never comes from ordinary text
    assert gpt2.decode(ids) == text


@needs_ranks
def test_gpt2_from_argument_and_saved_dict(monkeypatch):
    path = os.environ[TIKTOKEN_FILE_ENV]
    monkeypatch.delenv(TIKTOKEN_FILE_ENV)
    tok = load_tokenizer("gpt2", tiktoken_file=path)
    assert tok.encode("Hello, I am") == [15496, 11, 314, 716]
    assert tok.to_dict() == {"kind": "gpt2"}
    assert tokenizer_from_dict(tok.to_dict(), tiktoken_file=path).encode(" world") == [995]


def test_gpt2_missing_ranks_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tiktoken"):
        GPT2Tokenizer(tmp_path / "nope.tiktoken")


def test_gpt2_offline_error_names_the_setting(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.delenv(TIKTOKEN_FILE_ENV, raising=False)
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(ConnectionError, match=f"no network.*{TIKTOKEN_FILE_ENV}.*tiktoken_file"):
        GPT2Tokenizer()


def test_cli_prepare_gpt2_offline_is_one_line(monkeypatch, tmp_path, capsys):
    import tiktoken

    from gptfast.cli import main

    monkeypatch.delenv(TIKTOKEN_FILE_ENV, raising=False)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: (_ for _ in ()).throw(OSError("unreachable")))
    (tmp_path / "a.txt").write_text("hello\n")
    assert main(["prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "d"), "--tokenizer", "gpt2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptfast prepare: error: could not load GPT-2's BPE ranks") and err.count("\n") == 1
    assert "--tiktoken-file" in err


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS[1:])
def test_char_round_trip(text):
    tok = CharTokenizer(text)
    ids = tok.encode(text)
    assert len(ids) == len(text) and max(ids) < tok.vocab_size == len(set(text))
    assert tok.decode(ids) == text
    assert tok.eot_token_id is None


def test_char_vocabulary_is_sorted_and_saved():
    tok = load_tokenizer("char", text="banana!")
    assert tok.chars == "!abn" and tok.encode("nab") == [3, 1, 2]
    restored = tokenizer_from_dict(tok.to_dict())
    assert restored.chars == tok.chars and restored.encode("banana!") == tok.encode("banana!")


def test_char_unknown_character():
    tok = CharTokenizer("abc")
    with pytest.raises(ValueError, match=r"'z' \(U\+007A\) at position 2"):
        tok.encode("abz")
    with pytest.raises(ValueError, match="token id 3 is outside"):
        tok.decode([0, 3])


def test_bad_names():
    with pytest.raises(ValueError, match="empty"):
        CharTokenizer("")
    with pytest.raises(ValueError, match="pass text="):
        load_tokenizer("char")
    with pytest.raises(ValueError, match="unknown tokenizer 'bpe'"):
        load_tokenizer("bpe")
    with pytest.raises(ValueError, match="unknown tokenizer kind 'word'"):
        tokenizer_from_dict({"kind": "word"})
    with pytest.raises(ValueError, match="meta.json: a char tokenizer needs 'chars'"):
        tokenizer_from_dict({"kind": "char"}, source="meta.json")


@pytest.mark.parametrize("chars, words", [("abca", r"repeats 'a' \(U\+0061, index 3\)"),
                                          ("acb", r"is out of order at 'b' \(U\+0062, index 2\)")])
def test_a_saved_char_vocabulary_that_would_shift_ids_is_refused(chars, words):
    # CharTokenizer numbers the sorted distinct characters: "abca" would give 3 ids for a vocabulary of 4.
    with pytest.raises(ValueError, match=f"ckpt.pt: 'chars' {words}: a char vocabulary is distinct characters"):
        tokenizer_from_dict({"kind": "char", "chars": chars}, source="ckpt.pt")
