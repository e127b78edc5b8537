"""Weight files: trees of tensors as safetensors files, written atomically, read back checked.

- Weights (the exported classifiers, the best weights of a run) are safetensors files, with
  string metadata (:func:`save_tree`, :func:`load_tree`, :func:`read_metadata`).
- They go through :func:`robustft.recipes._runfolder.atomic_write`: a kill, a full disk or a
  read-only folder leaves the previous version intact and ends in one :class:`RunError` line.
- A damaged or foreign file ends in one line that names it and says what to do, never in the
  library's own error.
- The check that two trees have the same keys, shapes and kinds of dtype (:func:`mismatches`,
  over the :func:`specs` of each) is shared with the checkpoints of
  :mod:`robustft.recipes._checkpoint` and :mod:`robustft.recipes._dcp`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from robustft.recipes._runfolder import RunError, atomic_write

__all__ = ["load_tree", "mismatches", "read_metadata", "save_tree", "specs"]


def _os_error(err: Exception) -> OSError:
    """The ``OSError`` inside a safetensors error (``... (os error 28)``), else a generic EIO."""
    found = re.search(r"os error (\d+)", str(err))
    code = int(found[1]) if found else errno.EIO
    return OSError(code, os.strerror(code))


def _header(metadata: Mapping[str, Any] | None) -> dict[str, str] | None:
    """safetensors metadata: string keys; string values as given, others JSON-encoded."""
    if metadata is None:
        return None
    out = {}
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise TypeError(f"save_tree: metadata keys must be strings, got {key!r}")
        try:
            out[key] = value if isinstance(value, str) else json.dumps(value)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"save_tree: metadata[{key!r}] must be a string or JSON-serialisable, got "
                f"{type(value).__name__}"
            ) from err
    return out


def save_tree(
    path: Path, tree: Mapping[str, Tensor], *, metadata: Mapping[str, Any] | None = None
) -> None:
    """Write a tree of tensors as a safetensors file, atomically.

    Args:
        path: the ``.safetensors`` file to (re)write.
        tree: the tensors, by name (moved to the CPU, made contiguous).
        metadata: string metadata stored in the file's header (read back by
            :func:`read_metadata`); a value that is not a string is stored JSON-encoded.

    Raises:
        TypeError: if a metadata key is not a string or a value cannot be JSON-encoded.
        RunError: if the file cannot be written (full disk, read-only folder); the previous
            version of ``path``, if any, is intact.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    header = _header(metadata)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tree.items()}

    def write(tmp: Path) -> None:
        try:
            save_file(tensors, str(tmp), metadata=header)
        except SafetensorError as err:  # an I/O error, wrapped: recover its errno
            raise _os_error(err) from err

    atomic_write(Path(path), write)


@contextlib.contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Turn the failures of reading the safetensors file ``path`` into one line naming it."""
    try:
        yield
    except (RunError, FileNotFoundError):
        raise
    except OSError as err:
        raise RunError(
            f"cannot read {what} file {str(path)!r}: {err.strerror or err} — check the path and "
            f"its permissions"
        ) from err
    except Exception as err:  # SafetensorError and friends: the file is not what it claims
        empty = path.is_file() and path.stat().st_size == 0
        reason = "it is empty" if empty else "truncated, damaged or not a safetensors file"
        raise RunError(
            f"cannot read {what} file {str(path)!r}: {reason} — write it again with the command "
            f"that made it, or choose another file"
        ) from err


def _exists(path: Path, what: str, fn: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{fn}: {what} file {str(path)!r} does not exist")


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "boolean"
    if dtype.is_complex:
        return "complex"
    return "floating-point" if dtype.is_floating_point else "integer"


def _listed(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{names[:limit]}{more}"


def mismatches(
    got: Mapping[str, tuple[torch.Size, torch.dtype]],
    want: Mapping[str, tuple[torch.Size, torch.dtype]],
) -> list[str]:
    """What differs between two trees' keys, shapes and dtype kinds, one phrase per kind."""
    problems = []
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing:
        problems.append(f"missing keys {_listed(missing)}")
    if extra:
        problems.append(f"unexpected keys {_listed(extra)}")
    shapes = [
        f"{k} has shape {list(got[k][0])}, expected {list(want[k][0])}"
        for k in sorted(set(got) & set(want))
        if tuple(got[k][0]) != tuple(want[k][0])
    ]
    kinds = [
        f"{k} is {_kind(got[k][1])}, expected {_kind(want[k][1])}"
        for k in sorted(set(got) & set(want))
        if _kind(got[k][1]) != _kind(want[k][1])
    ]
    for found in (shapes, kinds):
        if found:
            more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
            problems.append(", ".join(found[:3]) + more)
    return problems


def specs(tree: Mapping[str, Tensor]) -> dict[str, tuple[torch.Size, torch.dtype]]:
    return {k: (v.shape, v.dtype) for k, v in tree.items()}


def load_tree(
    path: Path,
    device: torch.device | str = "cpu",
    *,
    like: Mapping[str, Tensor] | None = None,
    what: str = "weights",
) -> dict[str, Tensor]:
    """Read a safetensors file written by :func:`save_tree`.

    Args:
        path: the ``.safetensors`` file.
        device: where to put the tensors.
        like: the tree the file must match (e.g. the model's own): the same keys, the same
            shapes and the same kind of dtype (floating-point, integer, boolean, complex).
        what: what the file holds, for the messages (``"weights"``, ``"best weights"``).

    Returns:
        The tensors, by name, on ``device``.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        RunError: if the file is damaged or not a safetensors file, or does not match ``like``
            (the message lists the missing and unexpected keys and the mismatched shapes).
    """
    from safetensors.torch import load_file

    path = Path(path)
    _exists(path, what, "load_tree")
    with _reading(path, what):
        tree = load_file(str(path), device="cpu")
    if like is not None:
        problems = mismatches(specs(tree), specs(like))
        if problems:
            raise RunError(
                f"{what} file {str(path)!r} does not fit this model: {'; '.join(problems)} — it "
                f"was written for another model or class list; use weights of a run with this "
                f"model and classes"
            )
    return {k: v.to(device) for k, v in tree.items()}


def read_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file (``{}`` if it has none).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        RunError: if the file is damaged or not a safetensors file.
    """
    from safetensors import safe_open

    path = Path(path)
    _exists(path, "weights", "read_metadata")
    with _reading(path, "weights"), safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
