"""Training data: text -> token ids on disk, and (input, target) batches read back by memory map.

``prepare`` writes a data folder holding

* ``tokens.bin``: every token id, uint16 when the vocabulary fits (uint32 otherwise), the
  validation split being the last ``val_fraction`` of the ids;
* ``meta.json``: the dtype, the split and the tokenizer (a character vocabulary is saved here).

Files are read and encoded in blocks that end at a line break (or a space, on a long line), so a
corpus larger than memory works; record files (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``,
``.parquet``, ``.arrow``: :mod:`gptfast.corpora`) give one document per record. GPT-2 BPE
separates documents (files, records) with ``<|endoftext|>``. Worker processes encode
(:mod:`gptfast.encoding`), the output the same for any number of them. Files found in folders
that are not UTF-8 text are skipped with a warning; a file reached twice (named twice, or through
its folder, a symlink or a hard link) is read once; devices and FIFOs are refused, never opened; a
run's own output (its out-dir) is never read. ``meta.json`` is written last, so a folder without
it is an interrupted preparation, which loading refuses. :class:`TokenData` maps the ids back
without loading them, and :class:`BatchStream` cuts them into (input, target shifted by one) batches.
"""

from __future__ import annotations

import codecs
import fnmatch
import json
import os
import shutil
import stat
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .corpora import DEFAULT_TEXT_FIELD, BadRecords, is_records, read_records
from .encoding import OrderedEncoder, default_workers
from .outputs import RUN_OUTPUTS
from .shards import HEADER_BYTES, MAX_SHARD_TOKENS, ShardedTokens, read_shard, shard_files, split_shards, write_shards
from .tokenizer import CharTokenizer, Tokenizer, load_tokenizer, tokenizer_from_dict, vocab_size_of

DEFAULT_CORPUS = "pydoc"  # Python's own documentation topics, shipped with every Python
TOKENS_FILE = "tokens.bin"
META_FILE = "meta.json"
META_FORMAT = 1  # the layout of meta.json this version writes and reads
SHARDS_FORMAT = "llmc"  # the "format" of a folder of llm.c shards (it has no meta.json)
FORMATS = ("tokens", SHARDS_FORMAT)  # what prepare writes: tokens.bin and meta.json, or llm.c shards
DEFAULT_SHARD_TOKENS = 100_000_000  # llm.c's shard size
META_FIELDS = {"format": int, "dtype": str, "num_tokens": int, "num_val_tokens": int, "tokenizer": dict,
               "sources": list}  # every field of meta.json, and its JSON type
JSON_KINDS = {int: "an integer", str: "a string", dict: "a JSON object", list: "a list"}
BLOCK_BYTES = 1 << 20  # files are decoded and encoded one ~1 MiB block at a time
PROGRESS_MIN_BYTES = 16 << 20  # show a progress bar from this input size on
HF_DATASET_FILES = {"dataset_info.json", "state.json"}  # beside the Arrow files of datasets' save_to_disk


def default_corpus() -> str:
    """The embedded corpus: Python's ``pydoc_data.topics`` (about 460 KB of English), no download."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics)) + "\n"


class NotText(ValueError):
    """A file that is not UTF-8 text (undecodable bytes, or NUL bytes: a binary file)."""


def _matches(relative: Path, globs: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(relative.as_posix(), g) or fnmatch.fnmatch(relative.name, g) for g in globs)


def _is_data_output(folder: Path) -> bool:
    """A folder ``prepare`` wrote (or began to write): its tokens.bin is never read as text."""
    return (folder / TOKENS_FILE).exists() or (folder / (TOKENS_FILE + ".tmp")).exists()


def _run_outputs() -> frozenset[str]:
    """The names a training run writes into its out-dir (each also as an in-progress ``.tmp``)."""
    return frozenset(RUN_OUTPUTS) | {name + ".tmp" for name in RUN_OUTPUTS}


def _special_kind(mode: int) -> str | None:
    """What a path is when neither a folder nor a regular file (reading it could block or never end)."""
    for test, kind in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return None if stat.S_ISDIR(mode) or stat.S_ISREG(mode) else "a special file"


def _stat_source(source: str | os.PathLike) -> tuple[Path, os.stat_result]:
    """A named source and its status: an empty name, a missing path or a device/FIFO/socket is an error."""
    if not os.fspath(source):
        raise ValueError("an empty name ('') is not a file or folder: name the text to read")
    path = Path(source).expanduser()
    try:
        status = path.stat()
    except FileNotFoundError:
        target = f" (a symlink to {os.readlink(path)!r}, which does not exist)" if path.is_symlink() else ""
        raise FileNotFoundError(f"no such file or folder: {str(path)!r}{target}") from None
    kind = _special_kind(status.st_mode)
    if kind:
        raise ValueError(f"{str(path)!r} is {kind}, not a regular file: refused (name text files or folders)")
    return path, status


def _folder_files(path: Path, include: Sequence[str], exclude: Sequence[str], outputs: set[Path]) -> list[Path]:
    """The files below ``path`` chosen by the globs, sorted, leaving out hidden ones, prepared data
    folders and ``outputs``."""
    if (path / TOKENS_FILE).exists():
        state = "is a prepared data folder" if is_prepared(path) else \
            f"holds {TOKENS_FILE} but no {META_FILE} (an interrupted `gptfast prepare`?)"
        raise ValueError(f"folder {str(path)!r} {state}, not text: prepare it again from the text")
    if shard_files(path):
        raise ValueError(f"folder {str(path)!r} holds llm.c shards (token ids), not text: train on it as it is")
    found = []
    for root, folders, names in os.walk(path):
        root = Path(root)
        if HF_DATASET_FILES <= set(names):  # a `datasets` folder saved with save_to_disk: its Arrow files only
            names = [name for name in names if name.endswith(".arrow")]
        folders[:] = [d for d in folders if not d.startswith(".") and not _is_data_output(root / d)
                      and (root / d).resolve() not in outputs]
        for name in names:
            relative = (root / name).relative_to(path)
            if not name.startswith(".") and (not include or _matches(relative, include)) \
                    and not _matches(relative, exclude) and (root / name).is_file() \
                    and (root / name).resolve() not in outputs:
                found.append(root / name)
    if not found:
        chosen = " matching the include/exclude globs" if include or exclude else ""
        raise ValueError(f"folder {str(path)!r} holds no files{chosen}")
    return sorted(found)


def text_files(sources: Sequence[str | os.PathLike], *, include: Sequence[str] = (), exclude: Sequence[str] = (),
               skip: Sequence[str | os.PathLike] = ()) -> list[tuple[Path, bool]]:
    """The files named by ``sources`` as (path, named): each folder expanded to its files, recursively,
    leaving out hidden files, prepared data folders and files whose name or relative path matches no
    ``include`` glob (when given) or an ``exclude`` glob. ``named`` is True for a file named itself
    rather than found in a folder.

    ``skip`` are output folders (prepare's, a run's out-dir): never read. One found in a source folder
    is left out whole; in one that is itself a source folder, what a run writes there (its checkpoint,
    log, loss plot, TensorBoard files) is left out, and naming one of those is an error. A file reached
    more than once (named twice, by name and through its folder, or through a link) is read once, with
    one warning line. Devices, FIFOs and sockets are refused, never opened."""
    if not sources:
        raise ValueError("no input: name at least one text file or folder")
    folders = {Path(s).expanduser().resolve() for s in skip}
    outputs = folders | {folder / name for folder in folders for name in _run_outputs()}
    files: list[tuple[Path, bool]] = []
    for source in sources:
        path, status = _stat_source(source)
        if path.resolve() in outputs - folders:
            raise ValueError(f"{str(path)!r} is written by the run into its out-dir, not text: leave it out")
        if stat.S_ISDIR(status.st_mode):
            files.extend((found, False) for found in _folder_files(path, include, exclude, outputs))
        elif path.name == TOKENS_FILE:
            raise ValueError(f"{str(path)!r} holds token ids written by `gptfast prepare`, not text")
        else:
            files.append((path, True))
    return _read_once(files)


def _read_once(files: list[tuple[Path, bool]]) -> list[tuple[Path, bool]]:
    """Each file once (the same device and inode: a path named twice, a symlink, a hard link), named if
    any of its paths was; one warning line says what was given more than once."""
    first: dict[tuple[int, int], int] = {}
    kept: list[tuple[Path, bool]] = []
    again: list[tuple[Path, Path]] = []
    for path, named in files:
        status = path.stat()
        key = (status.st_dev, status.st_ino)
        if key in first:
            seen, was_named = kept[first[key]]
            kept[first[key]] = (seen, was_named or named)
            again.append((path, seen))
        else:
            first[key] = len(kept)
            kept.append((path, named))
    if again:
        (path, seen), more = again[0], f" (and {len(again) - 1} more file(s) given twice)" if len(again) > 1 else ""
        print(f"warning: {str(path)!r} is the same file as {str(seen)!r}{more}: each file is read once",
              file=sys.stderr)
    return kept


def _whitespace_cut(text: str) -> int:
    """Where to end a block of text without a line break: before its last space or tab (GPT-2's BPE
    starts a word with its space, so the tokens are those of the whole text), else at its end."""
    cut = max(text.rfind(" "), text.rfind("\t"))
    return cut if cut > 0 else len(text)


def _read_blocks(path: Path) -> Iterator[str]:
    """The UTF-8 text of ``path`` in blocks of about BLOCK_BYTES that end at a line break where there
    is one (else at a space), so memory stays bounded; bytes that are not text raise :class:`NotText`
    giving their exact byte offset."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, carry = 0, ""
    with open(path, "rb") as f:
        while True:
            raw = f.read(BLOCK_BYTES)
            start = offset - len(decoder.getstate()[0])  # the file offset of the bytes the decoder holds
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as error:
                raise NotText(f"{str(path)!r} is not UTF-8 text: undecodable bytes at byte offset "
                              f"{start + max(error.start, 0)} ({error.reason})") from None
            if "\0" in text:
                at = start + len(text[: text.index("\0")].encode("utf-8"))
                raise NotText(f"{str(path)!r} is not text: a NUL byte at byte offset {at} (a binary file?)")
            offset += len(raw)
            text = carry + text
            if not raw:
                if text:
                    yield text
                return
            cut = text.rfind("\n") + 1 or (_whitespace_cut(text) if len(text) >= BLOCK_BYTES else 0)
            if cut:
                yield text[:cut]
            carry = text[cut:]


def _progress(total_bytes: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True,
                disable=total_bytes < PROGRESS_MIN_BYTES)


class _Cut(NamedTuple):
    """A marker after the pieces of file ``file``, found not to be text: what was read of it is taken back."""

    file: int


# A piece of the input: (its text, (whether it starts a document, the index of its file)).
Piece = tuple[str, tuple[bool, int]]


def _pieces(files: list[tuple[Path, bool]] | None, skipped: list[Path], text_field: str, bad: BadRecords,
            bar) -> Iterator[Piece | _Cut]:
    """The input in order, leaving out ``skipped`` files: each text file in blocks (its first starts a
    document), each record of a record file a document (:mod:`gptfast.corpora`). A file found in a
    folder that is not text is added to ``skipped``, with a :class:`_Cut` after what was read of it."""
    if files is None:
        text = default_corpus()
        bar.update(len(text))
        yield text, (True, 0)
        return
    for index, (path, named) in enumerate(files):
        if path in skipped:
            continue
        try:
            if is_records(path):
                for text, nbytes in read_records(path, text_field, bad):
                    bar.update(nbytes)
                    if text is not None:
                        yield text, (True, index)
            else:
                for j, block in enumerate(_read_blocks(path)):
                    bar.update(len(block.encode("utf-8")))
                    yield block, (j == 0, index)
        except NotText as error:
            _skip(error, path, named, skipped)
            yield _Cut(index)


def _jobs(pieces: Iterator[Piece | _Cut]) -> Iterator[list[Piece] | _Cut]:
    """Consecutive pieces in jobs of about BLOCK_BYTES characters (cut the same for any number of workers)."""
    job: list[Piece] = []
    size = 0
    for piece in pieces:
        if isinstance(piece, _Cut):
            if job:
                yield job
            job, size = [], 0
            yield piece
            continue
        job.append(piece)
        size += len(piece[0])
        if size >= BLOCK_BYTES:
            yield job
            job, size = [], 0
    if job:
        yield job


def _skip(error: NotText, path: Path, named: bool, skipped: list[Path]) -> None:
    """A file found in a folder that is not text is left out with one warning line; a named one stops."""
    if named:
        raise error
    from tqdm import tqdm

    skipped.append(path)
    tqdm.write(f"warning: skipping {error}", file=sys.stderr)


def _alphabet(files: list[tuple[Path, bool]] | None, skipped: list[Path], text_field: str, bad: BadRecords) -> set[str]:
    """The characters of the input (a first pass, for the char tokenizer), files that are not text left out."""
    chars: set[str] = set()
    found: set[str] = set()
    current = None
    with _progress(_input_bytes(files), "reading") as bar:
        for piece in _pieces(files, skipped, text_field, bad, bar):
            if isinstance(piece, _Cut):
                found = set() if piece.file == current else found
                continue
            if piece[1][1] != current:
                chars |= found
                found, current = set(), piece[1][1]
            found.update(piece[0])
    return chars | found


def _input_bytes(files: list[tuple[Path, bool]] | None) -> int:
    return len(default_corpus()) if files is None else sum(p.stat().st_size for p, _ in files)


def prepare(sources: Sequence[str | os.PathLike] | None, out_dir: str | os.PathLike, *,
            tokenizer: str = "char", val_fraction: float = 0.1, tiktoken_file: str | os.PathLike | None = None,
            include: Sequence[str] = (), exclude: Sequence[str] = (), skip: Sequence[str | os.PathLike] = (),
            text_field: str = DEFAULT_TEXT_FIELD, strict: bool = False, workers: int | None = None,
            format: str = "tokens", shard_tokens: int = DEFAULT_SHARD_TOKENS) -> dict:
    """Tokenize text files, record files or folders (None: the embedded corpus) into ``out_dir``;
    returns the metadata.

    ``tokenizer`` is "char" (a vocabulary built from this text) or "gpt2" (BPE). Files found in
    folders can be chosen with ``include`` / ``exclude`` globs (on the name or the path below the
    folder); those that are not UTF-8 text are skipped with a warning. ``.jsonl`` (``.gz``,
    ``.zst``), ``.parquet`` and ``.arrow`` files hold one document per record, its text in
    ``text_field``; a bad record is skipped and counted, or with ``strict`` refused. ``workers``
    processes encode (default: one per core); the result is the same for any number. ``out_dir``
    and ``skip`` (a run's out-dir) are never read (see :func:`text_files`).

    ``format="tokens"`` writes tokens.bin and meta.json; the folder is valid only once ``meta.json``
    is written, last, so an interrupted prepare leaves the previous data in place, or a folder that
    loading refuses. ``format="llmc"`` (GPT-2 tokens) writes llm.c shards of ``shard_tokens`` each
    (:mod:`gptfast.shards`) into a new or empty ``out_dir``, built in a hidden folder beside it and
    renamed into place when complete.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    out = _output_folder(out_dir, format, tokenizer, shard_tokens)
    files = None if sources is None else text_files(sources, include=include, exclude=exclude, skip=[out, *skip])
    names = [f"<embedded corpus: {DEFAULT_CORPUS}>"] if files is None else [str(p) for p, _ in files]
    skipped: list[Path] = []
    tok = _tokenizer_for(tokenizer, files, names, skipped, text_field, strict, tiktoken_file)
    bad = BadRecords(strict)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
    encoder = OrderedEncoder(tok, dtype, workers or default_workers(),
                             None if tiktoken_file is None else os.fspath(tiktoken_file))
    folder = out.parent / f".{out.name}.partial" if format == SHARDS_FORMAT else out
    if folder != out and folder.exists():
        shutil.rmtree(folder)  # what an interrupted prepare of shards left
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (TOKENS_FILE + ".tmp")
    try:
        with open(tmp, "wb") as f, _progress(_input_bytes(files), "tokenizing") as bar:
            results = encoder.map(_jobs(_pieces(files, skipped, text_field, bad, bar)))
            num_tokens = _write_tokens(f, results, tok.eot_token_id, dtype, bar)
            f.flush()
            os.fsync(f.fileno())
        _check_some_text(num_tokens, names, skipped, bad)
        num_val = max(1, round(num_tokens * val_fraction))
        _put_in_place(tmp, out, dtype, num_val, shard_tokens)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if folder != out:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    if skipped:
        print(f"skipped {len(skipped)} file(s) that are not UTF-8 text", file=sys.stderr)
    if bad.count:
        print(bad.summary(), file=sys.stderr)
    if folder != out:
        return read_meta(out)
    meta = {"format": META_FORMAT, "tokenizer": tok.to_dict(), "dtype": dtype.name, "num_tokens": num_tokens,
            "num_val_tokens": num_val, "sources": [n for n in names if Path(n) not in skipped]}
    _write_json_atomic(out / META_FILE, meta)
    return meta


def _tokenizer_for(name: str, files: list[tuple[Path, bool]] | None, names: list[str], skipped: list[Path],
                   text_field: str, strict: bool, tiktoken_file: str | os.PathLike | None) -> Tokenizer:
    """GPT-2's BPE, or a char vocabulary from a first pass over the input (leaving out, in ``skipped``,
    the files found not to be text)."""
    if name != "char":
        return load_tokenizer(name, tiktoken_file=tiktoken_file)
    bad = BadRecords(strict)
    chars = _alphabet(files, skipped, text_field, bad)
    _check_some_text(chars, names, skipped, bad)
    return CharTokenizer(chars)


def _put_in_place(tmp: Path, out: Path, dtype: np.dtype, num_val: int, shard_tokens: int) -> None:
    """The finished token file ``tmp`` into ``out``: as tokens.bin (meta.json, removed here, comes
    after), or cut into llm.c shards beside it in its hidden folder, renamed to ``out`` whole."""
    if tmp.parent == out:
        (out / META_FILE).unlink(missing_ok=True)  # the folder is not prepared until the new meta.json is in
        os.replace(tmp, out / TOKENS_FILE)
        return
    write_shards(np.memmap(tmp, dtype=dtype, mode="r"), num_val, tmp.parent, shard_tokens)
    tmp.unlink()
    tmp.parent.replace(out)  # out is new or empty: one rename puts every shard in place


def _output_folder(out_dir: str | os.PathLike, format: str, tokenizer: str, shard_tokens: int) -> Path:
    """``out_dir`` checked before anything is read: a name, and a folder (or nothing yet) there; for
    llm.c shards, GPT-2 tokens and a new or empty folder (shards are never mixed with other files)."""
    if not os.fspath(out_dir):
        raise ValueError("the output folder's name (--out) is empty: name the folder to write the data to")
    out = Path(out_dir)
    if out.is_symlink() and not out.exists():
        raise ValueError(f"output folder {str(out)!r} is a symlink to {os.readlink(out)!r}, which does not exist")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {str(out)!r} is a file, not a folder")
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}: choose one of {', '.join(FORMATS)}")
    if format == SHARDS_FORMAT:
        if tokenizer != "gpt2":
            raise ValueError("llm.c shards hold GPT-2 tokens: prepare them with --tokenizer gpt2")
        if not 1 <= shard_tokens <= MAX_SHARD_TOKENS:
            raise ValueError(f"--shard-tokens must be from 1 to {MAX_SHARD_TOKENS:,} (the shard header's int32 "
                             f"count), got {shard_tokens:,}")
        if out.exists() and out.resolve() == Path.cwd().resolve():
            raise ValueError(f"output folder {str(out)!r} is the current folder: llm.c shards go into a new or "
                             "empty folder of their own, made whole by one rename")
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"output folder {str(out)!r} is not empty: llm.c shards go into a new or empty folder "
                             "(nothing there is overwritten)")
    return out


def _write_tokens(f, results: Iterator[tuple[list[Piece], list[np.ndarray]] | _Cut], eot: int | None,
                  dtype: np.dtype, bar) -> int:
    """Write the encoded jobs in order, ``eot`` between documents; a file cut (:class:`_Cut`) is taken
    back out. Returns the number of tokens written."""
    num_tokens, start = 0, time.perf_counter()
    current = (-1, 0)  # the file being written, and the tokens written before it
    separator = None if eot is None else np.asarray([eot], dtype=dtype)
    for result in results:
        if isinstance(result, _Cut):
            if current[0] == result.file:
                num_tokens = current[1]
                f.seek(num_tokens * dtype.itemsize)
                f.truncate()
            continue
        job, encoded = result
        parts = []
        for (_, (starts, index)), ids in zip(job, encoded):
            if index != current[0]:
                current = (index, num_tokens)
            if starts and len(ids) and num_tokens and separator is not None:
                parts.append(separator)  # separate documents
                num_tokens += 1
            parts.append(ids)
            num_tokens += len(ids)
        f.write(np.concatenate(parts).tobytes())
        bar.set_postfix_str(f"{num_tokens / (time.perf_counter() - start):,.0f} tokens/s", refresh=False)
    return num_tokens


def _check_some_text(found, names: list[str], skipped: list[Path], bad: BadRecords) -> None:
    if found:
        return
    if skipped and len(skipped) == len(names):
        raise ValueError(f"no text to train on: none of the {len(names)} file(s) is UTF-8 text")
    if bad.count:
        raise ValueError(f"no text to train on: every record of {', '.join(names)} is bad; the first: {bad.first}")
    raise ValueError(f"no text to train on: {', '.join(names)} is empty")


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_prepared(path: str | os.PathLike) -> bool:
    """A folder ``prepare`` finished (it holds meta.json), or one of llm.c shards."""
    return (Path(path) / META_FILE).is_file() or bool(shard_files(Path(path)))


def _shard_meta(data_dir: Path) -> dict:
    """What meta.json would say of a folder of llm.c shards (GPT-2 tokens, ``*_val_*`` the validation split)."""
    train, val = split_shards(data_dir)
    num_val = sum(len(read_shard(p)) for p in val)
    return {"format": SHARDS_FORMAT, "tokenizer": {"kind": "gpt2"}, "dtype": "uint16",
            "num_tokens": num_val + sum(len(read_shard(p)) for p in train), "num_val_tokens": num_val,
            "sources": [p.name for p in train + val]}


def read_meta(data_dir: Path) -> dict:
    """A prepared folder's meta.json, every field checked: a bad one is an error naming the file and
    field. A folder of llm.c shards gets the same fields from their headers."""
    path = data_dir / META_FILE
    if not path.is_file() and shard_files(data_dir):
        return _shard_meta(data_dir)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
                         "prepare the data again") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text; prepare the data again") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: holds a {type(meta).__name__}, expected a JSON object; prepare the data again")
    for field, kind in META_FIELDS.items():
        if field not in meta:
            raise ValueError(f"{path}: no {field!r} field; prepare the data again")
        if not isinstance(meta[field], kind) or isinstance(meta[field], bool):
            raise ValueError(f"{path}: field {field!r} is {meta[field]!r}, expected {JSON_KINDS[kind]}")
    if meta["format"] != META_FORMAT:
        raise ValueError(f"{path}: field 'format' is {meta['format']}, expected {META_FORMAT} (this version's "
                         "format); prepare the data again with this version")
    if not all(isinstance(source, str) for source in meta["sources"]):
        raise ValueError(f"{path}: field 'sources' is {meta['sources']!r}, expected a list of file names")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise ValueError(f"{path}: field 'dtype' is {meta['dtype']!r}, expected 'uint16' or 'uint32'")
    if not 0 < meta["num_val_tokens"] < meta["num_tokens"]:
        raise ValueError(f"{path}: field 'num_val_tokens' is {meta['num_val_tokens']}, expected between 1 and "
                         f"num_tokens - 1 = {meta['num_tokens'] - 1}")
    vocab_size_of(meta["tokenizer"], f"{path}: field 'tokenizer'")
    return meta


class TokenData:
    """A prepared data folder, memory-mapped: ``train`` and ``val`` are views on ``tokens.bin``, or
    for a folder of llm.c shards (:mod:`gptfast.shards`) its training and ``*_val_*`` shards.

    Opening it checks meta.json (or each shard's header), the size of the token files and that every
    id is inside the vocabulary.
    """

    def __init__(self, data_dir: str | os.PathLike):
        self.dir = Path(data_dir)
        if not (self.dir / META_FILE).is_file() and shard_files(self.dir):
            self._open_shards()
            return
        if not is_prepared(self.dir):
            if (self.dir / TOKENS_FILE).exists():
                raise ValueError(f"{str(self.dir)!r} holds {TOKENS_FILE} but no {META_FILE}: an interrupted "
                                 "`gptfast prepare`? prepare the data again")
            raise FileNotFoundError(f"{str(self.dir)!r} is not a prepared data folder (no {META_FILE}); "
                                    "create one with `gptfast prepare`")
        self.meta = read_meta(self.dir)
        path, dtype = self.dir / TOKENS_FILE, np.dtype(self.meta["dtype"])
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file, though {META_FILE} is there; prepare the data again")
        size = path.stat().st_size
        if size % dtype.itemsize or size == 0:
            raise ValueError(f"{path}: {size} bytes, not a whole number of {dtype.name} tokens "
                             f"({dtype.itemsize} bytes each): the file is cut short; prepare the data again")
        tokens = np.memmap(path, dtype=dtype, mode="r")
        if len(tokens) != self.meta["num_tokens"]:
            raise ValueError(f"{path} holds {len(tokens)} tokens but {META_FILE} says "
                             f"{self.meta['num_tokens']}: prepare the data again")
        split = len(tokens) - self.meta["num_val_tokens"]
        self._check_ids(tokens, split)
        self.train, self.val = tokens[:split], tokens[split:]

    def _check_ids(self, tokens: np.ndarray, split: int) -> None:
        """Every id inside the vocabulary: a max over the memory map, one chunk at a time."""
        vocab = vocab_size_of(self.meta["tokenizer"])
        bad = _first_outside(tokens, vocab)
        if bad is not None:
            where = f"train split, offset {bad}" if bad < split else f"validation split, offset {bad - split}"
            raise ValueError(f"{self.dir / TOKENS_FILE}: token id {tokens[bad]} at offset {bad} ({where}) is "
                             f"outside the vocabulary of {vocab} ({self.meta['tokenizer']['kind']} tokenizer "
                             f"in {META_FILE}); prepare the data again")

    def _open_shards(self) -> None:
        """A folder of llm.c shards, each checked: its header against its size, its ids against GPT-2's vocabulary."""
        self.meta = _shard_meta(self.dir)
        train, val = split_shards(self.dir)
        self.train, self.val = ShardedTokens(train), ShardedTokens(val)
        vocab = vocab_size_of(self.meta["tokenizer"])
        for path, tokens in zip(train + val, self.train.parts + self.val.parts):
            bad = _first_outside(tokens, vocab)
            if bad is not None:
                raise ValueError(f"{path}: token id {tokens[bad]} at byte offset {HEADER_BYTES + 2 * bad} (token "
                                 f"{bad}) is outside GPT-2's vocabulary of {vocab}: not GPT-2 tokens")

    def tokenizer(self, tiktoken_file: str | os.PathLike | None = None) -> Tokenizer:
        return tokenizer_from_dict(self.meta["tokenizer"], tiktoken_file=tiktoken_file)


def _first_outside(tokens: np.ndarray, vocab: int, chunk: int = 1 << 24) -> int | None:
    """The index of the first id in ``tokens`` of ``vocab`` or more (a max over the memory map, one
    chunk at a time), or None."""
    for start in range(0, len(tokens), chunk):
        part = tokens[start: start + chunk]
        if part.max() >= vocab:
            return start + int(np.argmax(part >= vocab))
    return None


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
