"""Training data: text -> token ids on disk, and (input, target) batches read back by memory map.

``prepare`` writes a data folder holding

* ``tokens.bin``: every token id, uint16 when the vocabulary fits (uint32 otherwise), the
  validation split being the last ``val_fraction`` of the ids;
* ``meta.json``: the dtype, the split and the tokenizer (a character vocabulary is saved here).

Files are read and encoded in blocks that end at a line break, so a corpus larger than memory works;
GPT-2 BPE separates files with ``<|endoftext|>``. :class:`TokenData` maps the ids back without
loading them, and :class:`BatchStream` cuts them into (input, target shifted by one) batches.
"""

from __future__ import annotations

import codecs
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .tokenizer import CharTokenizer, Tokenizer, load_tokenizer, tokenizer_from_dict

DEFAULT_CORPUS = "pydoc"  # Python's own documentation topics, shipped with every Python
TOKENS_FILE = "tokens.bin"
META_FILE = "meta.json"
BLOCK_BYTES = 1 << 20  # files are decoded and encoded one ~1 MiB block at a time
PROGRESS_MIN_BYTES = 16 << 20  # show a progress bar from this input size on


def default_corpus() -> str:
    """The embedded corpus: Python's ``pydoc_data.topics`` (about 460 KB of English), no download."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics)) + "\n"


def text_files(sources: Sequence[str | os.PathLike]) -> list[Path]:
    """The files named by ``sources``, each folder expanded to its non-hidden files, recursively."""
    if not sources:
        raise ValueError("no input: name at least one text file or folder")
    files: list[Path] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise ValueError(f"folder {str(path)!r} holds no files")
            files.extend(found)
        else:
            raise FileNotFoundError(f"no such file or folder: {str(path)!r}")
    return files


def _read_blocks(path: Path) -> Iterator[str]:
    """The UTF-8 text of ``path`` in blocks that end at a line break (the last block may not)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, carry = 0, ""
    with open(path, "rb") as f:
        while True:
            raw = f.read(BLOCK_BYTES)
            try:
                text = carry + decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as error:
                raise ValueError(f"{str(path)!r} is not UTF-8 text: undecodable bytes near byte offset "
                                 f"{offset + max(error.start, 0)} ({error.reason})") from None
            offset += len(raw)
            if not raw:
                if text:
                    yield text
                return
            cut = text.rfind("\n") + 1
            if cut:
                yield text[:cut]
            carry = text[cut:]


def _progress(total_bytes: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True,
                disable=total_bytes < PROGRESS_MIN_BYTES)


def _documents(sources: Sequence[str | os.PathLike] | None) -> tuple[list[str], list[Path] | None]:
    if sources is None:
        return [f"<embedded corpus: {DEFAULT_CORPUS}>"], None
    files = text_files(sources)
    return [str(p) for p in files], files


def _iter_blocks(files: list[Path] | None, desc: str) -> Iterator[tuple[int, str]]:
    """(document index, text block) over all documents, with a progress bar on large inputs."""
    if files is None:
        yield 0, default_corpus()
        return
    with _progress(sum(p.stat().st_size for p in files), desc) as bar:
        for i, path in enumerate(files):
            for block in _read_blocks(path):
                yield i, block
                bar.update(len(block.encode("utf-8")))


def prepare(sources: Sequence[str | os.PathLike] | None, out_dir: str | os.PathLike, *,
            tokenizer: str = "char", val_fraction: float = 0.1,
            tiktoken_file: str | os.PathLike | None = None) -> dict:
    """Tokenize text files or folders (None: the embedded corpus) into ``out_dir``; returns the metadata.

    ``tokenizer`` is "char" (a vocabulary built from this text) or "gpt2" (BPE).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    names, files = _documents(sources)
    if tokenizer == "char":  # a first pass collects the alphabet
        chars: set[str] = set()
        for _, block in _iter_blocks(files, "reading"):
            chars.update(block)
        if not chars:
            raise ValueError(f"no text to train on: {', '.join(names)} is empty")
        tok: Tokenizer = CharTokenizer(chars)
    else:
        tok = load_tokenizer(tokenizer, tiktoken_file=tiktoken_file)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (TOKENS_FILE + ".tmp")
    num_tokens, last_doc = 0, 0
    with open(tmp, "wb") as f:
        for doc, block in _iter_blocks(files, "tokenizing"):
            ids = tok.encode(block)
            if doc != last_doc and num_tokens and tok.eot_token_id is not None:
                ids.insert(0, tok.eot_token_id)  # separate documents
            last_doc = doc
            np.asarray(ids, dtype=dtype).tofile(f)
            num_tokens += len(ids)
    if num_tokens == 0:
        tmp.unlink()
        raise ValueError(f"no text to train on: {', '.join(names)} is empty")
    os.replace(tmp, out / TOKENS_FILE)
    num_val = max(1, round(num_tokens * val_fraction))
    meta = {"format": 1, "tokenizer": tok.to_dict(), "dtype": np.dtype(dtype).name,
            "num_tokens": num_tokens, "num_val_tokens": num_val, "sources": names}
    _write_json_atomic(out / META_FILE, meta)
    return meta


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def is_prepared(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()


class TokenData:
    """A prepared data folder, memory-mapped: ``train`` and ``val`` are views on ``tokens.bin``."""

    def __init__(self, data_dir: str | os.PathLike):
        self.dir = Path(data_dir)
        if not is_prepared(self.dir):
            raise FileNotFoundError(f"{str(self.dir)!r} is not a prepared data folder (no {META_FILE}); "
                                    "create one with `gptfast prepare`")
        self.meta = json.loads((self.dir / META_FILE).read_text(encoding="utf-8"))
        tokens = np.memmap(self.dir / TOKENS_FILE, dtype=self.meta["dtype"], mode="r")
        if len(tokens) != self.meta["num_tokens"]:
            raise ValueError(f"{self.dir / TOKENS_FILE} holds {len(tokens)} tokens but {META_FILE} says "
                             f"{self.meta['num_tokens']}: prepare the data again")
        split = len(tokens) - self.meta["num_val_tokens"]
        self.train, self.val = tokens[:split], tokens[split:]

    def tokenizer(self, tiktoken_file: str | os.PathLike | None = None) -> Tokenizer:
        return tokenizer_from_dict(self.meta["tokenizer"], tiktoken_file=tiktoken_file)


class BatchStream:
    """(input, target) batches of shape (batch, context) from one split of token ids.

    ``order="random"`` draws window starts from a seeded generator; ``"sequential"`` walks through
    the split in consecutive windows and wraps around. ``state_dict`` captures where the stream is,
    so a resumed run reads exactly the batches an uninterrupted one would.
    """

    ORDERS = ("random", "sequential")

    def __init__(self, tokens: np.ndarray, context_length: int, *, order: str = "random",
                 seed: int = 0, split: str = "train"):
        if order not in self.ORDERS:
            raise ValueError(f"unknown batch order {order!r}: choose one of {', '.join(self.ORDERS)}")
        if len(tokens) < context_length + 1:
            raise ValueError(f"the {split} split holds {len(tokens)} tokens, fewer than one context window "
                             f"plus its shifted target ({context_length + 1}): use more text or a smaller "
                             "context length")
        self.tokens, self.context_length, self.order = tokens, context_length, order
        self.generator = torch.Generator().manual_seed(seed)
        self.position = 0  # next window start, sequential order

    def next_starts(self, n: int) -> torch.Tensor:
        """The start offsets of the next ``n`` windows."""
        T = self.context_length
        if self.order == "random":
            return torch.randint(0, len(self.tokens) - T, (n,), generator=self.generator)
        starts = []
        for _ in range(n):
            if self.position + T + 1 > len(self.tokens):
                self.position = 0
            starts.append(self.position)
            self.position += T
        return torch.tensor(starts)

    def batch(self, starts: torch.Tensor, device: torch.device | str = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs ``tokens[s : s+T]`` and targets ``tokens[s+1 : s+T+1]`` for each start ``s``."""
        T = self.context_length
        windows = torch.from_numpy(np.stack([self.tokens[s: s + T + 1] for s in starts.tolist()]).astype(np.int64))
        x, y = windows[:, :-1], windows[:, 1:]
        if torch.device(device).type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.contiguous(), y.contiguous()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.position = int(state["position"])
