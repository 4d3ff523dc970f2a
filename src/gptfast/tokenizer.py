"""Tokenizers: GPT-2's byte-pair encoding (through tiktoken) and a character-level vocabulary.

Both have ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``, ``eot_token_id``
and ``to_dict()``; :func:`tokenizer_from_dict` restores one from that dictionary, which is how a
tokenizer travels with prepared data (``meta.json``) and with checkpoints.

GPT-2 BPE needs OpenAI's ranks file. tiktoken downloads it on first use; on a machine without a
network, point ``GPTFAST_TIKTOKEN_FILE`` (or the ``tiktoken_file`` argument) at a local
``gpt2.tiktoken``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

TIKTOKEN_FILE_ENV = "GPTFAST_TIKTOKEN_FILE"

# GPT-2's pre-tokenisation: contractions, letter runs, digit runs, other symbols, whitespace.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257


class Tokenizer(Protocol):
    vocab_size: int
    eot_token_id: int | None

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def to_dict(self) -> dict: ...


class GPT2Tokenizer:
    """GPT-2's byte-pair encoding: 50,257 tokens, ``<|endoftext|>`` = 50256."""

    def __init__(self, tiktoken_file: str | os.PathLike | None = None):
        try:
            import tiktoken
        except ImportError:
            raise ImportError("GPT-2 BPE needs tiktoken: pip install tiktoken") from None

        path = tiktoken_file or os.environ.get(TIKTOKEN_FILE_ENV)
        if path:
            path = Path(path).expanduser()
            if not path.is_file():
                source = "tiktoken_file argument" if tiktoken_file else f"${TIKTOKEN_FILE_ENV}"
                raise FileNotFoundError(f"GPT-2 ranks file {str(path)!r} (from the {source}) does not exist")
            from tiktoken.load import load_tiktoken_bpe

            self._encoding = tiktoken.Encoding(
                name="gpt2", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=load_tiktoken_bpe(str(path)),
                special_tokens={GPT2_EOT: GPT2_VOCAB_SIZE - 1}, explicit_n_vocab=GPT2_VOCAB_SIZE)
        else:
            try:
                self._encoding = tiktoken.get_encoding("gpt2")
            except Exception as error:  # tiktoken raises requests/urllib/OS errors when offline
                first_line = str(error).splitlines()[0][:160] if str(error) else ""
                raise ConnectionError(
                    "could not load GPT-2's BPE ranks: tiktoken could not download them (no network? "
                    f"{type(error).__name__}: {first_line}); offline, set {TIKTOKEN_FILE_ENV} or pass "
                    "tiktoken_file= (--tiktoken-file) to a local gpt2.tiktoken ranks file") from None
        self.vocab_size = self._encoding.n_vocab
        self.eot_token_id = self._encoding.eot_token

    def encode(self, text: str) -> list[int]:
        # Text that happens to contain "<|endoftext|>" is encoded as ordinary characters.
        return self._encoding.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._encoding.decode(list(ids))

    def to_dict(self) -> dict:
        # The ranks file's location belongs to the machine, not to the data: it is not saved.
        return {"kind": "gpt2"}


class CharTokenizer:
    """One token per distinct character of the training text, numbered in code-point order."""

    def __init__(self, chars: Iterable[str]):
        self.chars = "".join(sorted(set(chars)))
        if not self.chars:
            raise ValueError("a character-level tokenizer needs at least one character (the text is empty)")
        self._index = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)
        self.eot_token_id = None

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[c] for c in text]
        except KeyError as error:
            c = error.args[0]
            raise ValueError(f"character {c!r} (U+{ord(c):04X}) at position {text.index(c)} is not in "
                             f"this character-level vocabulary of {self.vocab_size} characters "
                             "(built from the training text)") from None

    def decode(self, ids: Iterable[int]) -> str:
        ids = list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the character vocabulary [0, {self.vocab_size})")
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict:
        return {"kind": "char", "chars": self.chars}


TOKENIZERS = ("char", "gpt2")


def load_tokenizer(name: str, *, text: str | None = None,
                   tiktoken_file: str | os.PathLike | None = None) -> Tokenizer:
    """A tokenizer by name: "gpt2" (BPE), or "char" built from ``text``."""
    if name == "gpt2":
        return GPT2Tokenizer(tiktoken_file)
    if name == "char":
        if text is None:
            raise ValueError('the "char" tokenizer is built from the training text: pass text=')
        return CharTokenizer(text)
    raise ValueError(f"unknown tokenizer {name!r}: choose one of {', '.join(TOKENIZERS)}")


def vocab_size_of(d: dict, source: str = "the saved tokenizer") -> int:
    """The vocabulary size of a tokenizer saved with ``to_dict()``, without loading it (no ranks file
    needed); a malformed dictionary is an error naming ``source``."""
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind == "gpt2":
        return GPT2_VOCAB_SIZE
    if kind == "char":
        chars = d.get("chars")
        if not isinstance(chars, str) or not chars:
            raise ValueError(f"{source}: a char tokenizer needs 'chars', a non-empty string, got {chars!r}")
        at = next((i for i in range(1, len(chars)) if chars[i] <= chars[i - 1]), None)
        if at is not None:  # CharTokenizer numbers distinct characters in code-point order: ids would shift
            c = chars[at]
            raise ValueError(f"{source}: 'chars' {'repeats' if c in chars[:at] else 'is out of order at'} {c!r} "
                             f"(U+{ord(c):04X}, index {at}): a char vocabulary is distinct characters in code-point "
                             "order")
        return len(chars)
    raise ValueError(f"{source}: unknown tokenizer kind {kind!r}: expected one of {', '.join(TOKENIZERS)}")


def tokenizer_from_dict(d: dict, *, tiktoken_file: str | os.PathLike | None = None,
                        source: str = "the saved tokenizer") -> Tokenizer:
    """Restore a tokenizer saved with ``to_dict()`` (in ``meta.json`` or a checkpoint)."""
    vocab_size_of(d, source)  # checks the dictionary
    if d["kind"] == "gpt2":
        return GPT2Tokenizer(tiktoken_file)
    return CharTokenizer(d["chars"])
