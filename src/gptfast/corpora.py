"""Corpora of records: one document per record, its text in one field (``--text-field``, default ``text``).

Read by the file's name: ``.jsonl`` (one JSON object per line), ``.jsonl.gz``, ``.jsonl.zst``
(zstandard), ``.parquet`` and ``.arrow`` (the Arrow files of a Hugging Face ``datasets`` folder
saved with ``save_to_disk``), the last two through pyarrow, the optional extra ``data`` (``pip
install 'gptfast-triton[data]'``), as zstandard is. A bad record (a line that is not JSON, a
missing field, text that is not a string) is skipped and counted (:class:`BadRecords`), the first
one named by file and line (or record); ``strict`` refuses it instead. A file that cannot be read
as its kind at all is one error naming it and the byte offset or the problem.
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

DEFAULT_TEXT_FIELD = "text"
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".arrow")
EXTRA = "pip install 'gptfast-triton[data]'"
ROWS_PER_BATCH = 1024  # Arrow records are read this many at a time


def is_records(path: Path) -> bool:
    """Whether ``path`` is read as records (by its name), not as plain text."""
    return path.name.endswith(RECORD_SUFFIXES)


def _require(module: str, path: Path):
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"{path}: reading {path.suffix} files needs {module}: {EXTRA}") from None


class BadRecords:
    """Records skipped (or, ``strict``, refused): their count and the first one's place and problem."""

    def __init__(self, strict: bool = False):
        self.strict, self.count, self.first = strict, 0, None

    def add(self, where: str, problem: str) -> None:
        if self.strict:
            raise ValueError(f"{where}: {problem} (refused: --strict; leave it out to skip bad records)")
        self.count += 1
        self.first = self.first or f"{where}: {problem}"

    def summary(self) -> str | None:
        """The line that reports the skipped records, or None when there were none."""
        if not self.count:
            return None
        return f"skipped {self.count:,} bad record(s) (--strict refuses them); the first: {self.first}"


def read_records(path: Path, text_field: str, bad: BadRecords) -> Iterator[tuple[str | None, int]]:
    """(text, input bytes read since the last record) of each good record of ``path``, in order; a
    last (None, bytes) for what follows the last good one."""
    if path.name.endswith((".parquet", ".arrow")):
        yield from _arrow_records(path, text_field, bad)
    else:
        yield from _json_lines(path, text_field, bad)


def _open_lines(path: Path, raw: io.BufferedReader) -> tuple[io.BufferedIOBase, tuple[type[Exception], ...]]:
    """The decompressed byte stream of a ``.jsonl`` / ``.jsonl.gz`` / ``.jsonl.zst`` file opened as
    ``raw``, and the errors its decompressor raises on damaged data."""
    if path.name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw), (OSError, EOFError, zlib.error)
    if path.name.endswith(".zst"):
        zstandard = _require("zstandard", path)
        return io.BufferedReader(_ZstdFrames(raw, zstandard)), (zstandard.ZstdError, OSError, EOFError)
    return raw, ()


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a stream of zstandard frames; input that ends inside a frame (a cut
    file, which zstandard's own stream reader takes as the end) raises EOFError."""

    def __init__(self, raw: io.BufferedReader, zstandard):
        self.raw, self.zstandard = raw, zstandard
        self.frame, self.left, self.mid_frame = zstandard.ZstdDecompressor().decompressobj(), b"", False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            if self.left:
                data, self.left = self.left[: len(buffer)], self.left[len(buffer):]
                buffer[: len(data)] = data
                return len(data)
            chunk = self.frame.unused_data or self.raw.read(1 << 16)
            if not chunk:
                if self.mid_frame:
                    raise EOFError("the file ends inside a zstandard frame (cut short?)")
                return 0
            if self.frame.eof:  # the next frame
                self.frame = self.zstandard.ZstdDecompressor().decompressobj()
            self.left = self.frame.decompress(chunk)
            self.mid_frame = not self.frame.eof


def _json_lines(path: Path, text_field: str, bad: BadRecords) -> Iterator[tuple[str | None, int]]:
    with open(path, "rb") as raw:
        stream, damaged = _open_lines(path, raw)
        read, offset, number = 0, 0, 0
        try:
            for number, line in enumerate(stream, 1):
                offset += len(line)
                text = _json_text(line, text_field, f"{path}:{number}", bad)
                if text is not None:
                    position = raw.tell()
                    yield text, position - read
                    read = position
            yield None, raw.tell() - read
        except damaged as error:
            raise ValueError(f"{path}: cannot decompress after line {number} (uncompressed byte offset "
                             f"{offset}): {error}") from None


def _json_text(line: bytes, text_field: str, where: str, bad: BadRecords) -> str | None:
    """The text of one JSON line, or None (a blank line; a bad record, counted by ``bad``)."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        reason = f"column {error.colno}: {error.msg}" if isinstance(error, json.JSONDecodeError) else "not UTF-8"
        bad.add(where, f"not valid JSON ({reason})")
        return None
    if not isinstance(record, dict) or text_field not in record:
        bad.add(where, f"no {text_field!r} field" if isinstance(record, dict) else f"a JSON {type(record).__name__}, "
                "not an object")
        return None
    text = record[text_field]
    if not isinstance(text, str):
        bad.add(where, f"field {text_field!r} is {type(text).__name__}, not a string")
        return None
    return text


def _arrow_batches(path: Path, text_field: str) -> Iterator[tuple[list, int]]:
    """(the text column's values, input bytes read so far) batch by batch, of a Parquet or Arrow IPC file."""
    pa = _require("pyarrow", path)
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            reader = pq.ParquetFile(path)
            _check_column(path, text_field, reader.schema_arrow.names)
            size, groups = path.stat().st_size, reader.num_row_groups
            for group in range(groups):
                for batch in reader.iter_batches(ROWS_PER_BATCH, row_groups=[group], columns=[text_field]):
                    yield batch.column(0).to_pylist(), size * group // groups
            yield [], size  # the last row group read
            return
        with pa.memory_map(str(path)) as source:
            try:
                stream = pa.ipc.open_stream(source)  # what datasets' save_to_disk writes
                schema, batches = stream.schema, iter(stream)
            except pa.ArrowInvalid:  # the Arrow file format
                source.seek(0)
                whole = pa.ipc.open_file(source)
                schema, batches = whole.schema, (whole.get_batch(i) for i in range(whole.num_record_batches))
            _check_column(path, text_field, schema.names)
            for batch in batches:
                yield batch.column(text_field).to_pylist(), source.tell()
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{path}: not a readable {path.suffix[1:]} file ({' '.join(str(error).split())[:200]})") \
            from None


def _check_column(path: Path, text_field: str, columns: list[str]) -> None:
    if text_field not in columns:
        raise ValueError(f"{path}: no {text_field!r} column (it has {', '.join(columns[:20])}): choose the text "
                         "with --text-field")


def _arrow_records(path: Path, text_field: str, bad: BadRecords) -> Iterator[tuple[str | None, int]]:
    number, read, position = 0, 0, 0
    for values, position in _arrow_batches(path, text_field):
        for value in values:
            number += 1
            if isinstance(value, str):
                yield value, position - read
                read = position
            else:
                bad.add(f"{path}: record {number}", f"field {text_field!r} is {type(value).__name__}, not a string")
    yield None, position - read
