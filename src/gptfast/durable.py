"""Files written whole or not at all, and a failed write reported as one line naming the file.

:func:`replace_atomically` writes a temporary file beside the target, flushes it to the disk, renames
it over the target and flushes the folder, so that a kill, a full disk or a power loss leaves the old
file or the new one, never half of one. A write the disk refuses (full) or the file size limit
(``ulimit -f``) forbids is one error naming the file and the sizes (:func:`write_failure`). The
checkpoint, ``log.jsonl``'s rewrite on resume and ``loss.png`` are written this way.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename) to the disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _amount(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.0f} MB" if nbytes >= 2**20 else f"{nbytes / 2**10:,.1f} KB"


def no_space(path: Path, needed: int) -> OSError:
    """The error of a disk too full to hold the ``needed`` bytes of ``path``."""
    error = OSError(f"no space left writing {path} (needs {_amount(needed)}, "
                    f"{shutil.disk_usage(path.parent).free / 2**20:,.0f} MB free); the previous file is kept")
    error.errno = errno.ENOSPC
    return error


def _file_size_limit() -> float:
    """The largest file this process may write (``ulimit -f``), in bytes; inf when unlimited or unknown."""
    try:
        import resource
    except ImportError:  # Windows
        return math.inf
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return math.inf if limit == resource.RLIM_INFINITY else limit


def write_failure(path: Path, needed: int, error: BaseException) -> BaseException:
    """What a failed write of ``needed`` bytes to ``path`` is reported as: a full disk or a file size limit
    (``ulimit -f``) below ``needed`` is one line naming the file, another failure that does not name it
    (torch's C++ writer raises RuntimeError) an OSError naming it; anything else (Ctrl-C) is ``error``."""
    if not isinstance(error, (OSError, RuntimeError)):
        return error
    code = getattr(error, "errno", None)
    if code == errno.ENOSPC or "No space left" in str(error) or (
            path.parent.is_dir() and shutil.disk_usage(path.parent).free < needed):
        return no_space(path, needed)
    limit = _file_size_limit()
    if limit < needed:
        too_large = OSError(f"could not write {path}: it needs {_amount(needed)} but this process may write "
                            f"files of {_amount(limit)} at most (ulimit -f); the previous file is kept")
        too_large.errno = errno.EFBIG
        return too_large
    if isinstance(error, RuntimeError) or error.filename is None:
        return OSError(f"could not write {path}: {error}; the previous file is kept")
    return error


def replace_atomically(path: Path, needed: int, write: Callable[[BinaryIO], object]) -> None:
    """Replace ``path`` by what ``write`` writes (about ``needed`` bytes) to a flushed temporary file
    renamed over it, then flush the folder. A failed write (a full disk, Ctrl-C) removes the
    temporary file, keeps the old one and is reported as :func:`write_failure` says."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        failure = write_failure(path, needed, error)
        if failure is error:
            raise
        raise failure from None
    fsync_folder(path.parent)


def write_atomic(path: Path, content: str | bytes) -> None:
    """Replace ``path`` by ``content`` (text as UTF-8) with :func:`replace_atomically`: old or new, never half."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    replace_atomically(path, len(data), lambda f: f.write(data))
