"""The run folder: one home for what makes a run a record.

A run folder is treated like a commit: every file in it is written atomically (a temporary file
in the same folder, flushed to disk, then renamed over the old one), so a kill, a full disk or a
read-only mount at any moment leaves the previous version of each file intact; a fault while
writing ends in one :class:`RunError` line that names the file and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["RunError", "atomic_write", "write_error", "write_json"]


class RunError(RuntimeError):
    """A failure of a run that the user can act on; its message is one line.

    The command prints it as ``robustft: error: <message>`` (no traceback unless ``--debug``)
    and exits with status 1.
    """


def write_error(path: Path, err: OSError) -> RunError:
    """The one-line :class:`RunError` for an ``OSError`` raised while writing ``path``."""
    code = err.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space (or choose another --output), then run the command again"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "the folder is read-only or not yours; choose a writable --output"
    else:
        fix = "check the folder and the disk, then run the command again"
    reason = err.strerror or str(err)
    return RunError(
        f"could not write {str(path)!r}: {reason} — {fix}; the previous version of the file, if "
        f"any, is intact"
    )


@contextlib.contextmanager
def _temporary(path: Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` (unique to this process), removed unless renamed."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write(path: Path, data: bytes | str | Callable[[Path], None]) -> None:
    """Replace ``path`` with ``data`` atomically: write a temporary sibling, fsync, rename.

    Args:
        path: the file to (re)write.
        data: the content (``str`` is written as UTF-8), or a callable that writes the file whose
            path it is given (``torch.save``, ``safetensors.torch.save_file``).

    Raises:
        RunError: if writing fails (full disk, read-only folder, ...); ``path`` is then as it was.
    """
    path = Path(path)
    try:
        with _temporary(path) as tmp:
            if callable(data):
                data(tmp)
            else:
                tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except OSError as err:
        raise write_error(path, err) from err
    except RuntimeError as err:  # torch.save wraps the OSError of a full disk in a RuntimeError
        if isinstance(err, RunError):
            raise
        cause = err.__cause__ or err.__context__
        if isinstance(cause, OSError):
            raise write_error(path, cause) from err
        if "enforce fail" in str(err) or "file write failed" in str(err):
            raise write_error(path, OSError(errno.EIO, "the write failed (disk full?)")) from err
        raise


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as indented JSON (one trailing newline) atomically to ``path``."""
    atomic_write(path, json.dumps(value, indent=1) + "\n")
