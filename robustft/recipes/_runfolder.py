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
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "RunError",
    "absolute",
    "atomic_write",
    "check_record",
    "claim",
    "classes_change",
    "fingerprint",
    "locked",
    "read_json",
    "read_record",
    "state",
    "versions",
    "write_error",
    "write_json",
    "write_record",
]


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


# ---------------------------------------------------------------------------------------------
# what a folder holds, and claiming it for a job

RUN_FILES = (
    "config.json",
    "run.json",
    "metrics.jsonl",
    "results.json",
    "summary.md",
    "checkpoint.pt",
    "checkpoint.dcp",
    "checkpoint.dcp.tmp",
    "checkpoint.dcp.old",
)
"""The files (and folders) a job writes into its folder, besides ``*.safetensors`` weights."""

LOCK = ".robustft.lock"
TRAINING = ("finetune", "ueo")
"""The commands whose folder is a training run (posthoc/evaluate never write into one)."""


def _kind(folder: Path) -> str:
    """``"absent"``, ``"empty"``, ``"finished"``, ``"interrupted"`` or ``"foreign"`` (a non-empty
    folder that holds no run)."""
    if not folder.exists():
        return "absent"
    if not folder.is_dir():
        return "foreign"
    names = {p.name for p in folder.iterdir()} - {LOCK}
    if not names:
        return "empty"
    if "results.json" in names and _status(folder) != "running":
        return "finished"
    if names & {"config.json", "run.json", "checkpoint.pt", "checkpoint.dcp", "checkpoint.dcp.old"}:
        return "interrupted"
    return "foreign"


def _status(folder: Path) -> str | None:
    try:
        record = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record.get("status") if isinstance(record, dict) else None


def state(folder: str | os.PathLike[str]) -> str:
    """What ``folder`` holds: ``"absent"``, ``"empty"``, ``"finished"`` (a completed job),
    ``"interrupted"`` (a job that started and did not finish) or ``"foreign"`` (other files).

    Example:
        >>> import tempfile
        >>> state(tempfile.mkdtemp())
        'empty'
    """
    return _kind(Path(folder))


def claim(folder: str | os.PathLike[str], *, command: str, overwrite: bool, resume: bool) -> Path:
    """Check that ``command`` may write its results into ``folder``; create it.

    A folder that holds a job is never reused silently: without ``resume``, a finished or an
    interrupted job is refused with the commands that continue it or replace it (``overwrite``
    removes the job's own files first, and nothing else); a non-empty folder that holds no job is
    refused (it may be the user's data). With ``resume``, the folder must hold an interrupted job.

    Returns:
        The folder as an absolute path.

    Raises:
        RunError: the folder holds a job (or other files) and may not be written.
    """
    path = Path(folder).expanduser().absolute()
    kind = _kind(path)
    shown = str(folder)
    if kind != "absent":
        _check_unlocked(path)
    if resume:
        if kind in ("absent", "empty", "foreign"):
            raise RunError(
                f"--resume {shown!r}: the folder holds no run to continue (no config.json); start "
                f"one with robustft {command} ... --output {shown}"
            )
        return path
    if kind == "foreign":
        raise RunError(
            f"--output {shown!r} is not empty and holds no robustft run; choose a new or empty "
            f"folder (nothing there is removed, even with --overwrite)"
        )
    if kind in ("finished", "interrupted") and command not in TRAINING:
        owner = (read_record(path, option="--output").get("command")) or "finetune"
        if owner in TRAINING:
            raise RunError(
                f"--output {shown!r} is a training run's folder; robustft {command} never writes "
                f"into a run folder — choose a new folder (e.g. {shown.rstrip('/')}-{command})"
            )
    if kind in ("finished", "interrupted") and not overwrite:
        if kind == "finished":
            what = "a finished run (results.json)"
            how = "choose another --output, or add --overwrite to replace it"
        else:
            what = "an unfinished run"
            how = (
                f"continue it with: robustft {command} --resume {shown} — or add --overwrite to "
                f"start it again from step 0"
            )
        raise RunError(f"--output {shown!r} holds {what}; {how}")
    if kind in ("finished", "interrupted"):
        clear(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(path, err) from err
    return path


def clear(folder: Path) -> None:
    """Remove a job's own files from ``folder`` (:data:`RUN_FILES` and ``*.safetensors``)."""
    import shutil

    for child in folder.iterdir():
        if (
            child.name in RUN_FILES
            or child.suffix == ".safetensors"
            or child.name.startswith(".checkpoint")
        ):
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()


def _check_unlocked(folder: Path) -> None:
    """Refuse a folder that a running job holds (its lock is taken)."""
    import fcntl

    path = folder / LOCK
    if not path.is_file():
        return
    try:
        with open(path, encoding="utf-8") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = handle.read().strip() or "another process"
                raise RunError(
                    f"{str(folder)!r} is being written by another robustft process ({holder}); "
                    f"wait for it to end, or choose another --output"
                ) from None
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    except OSError:  # an unreadable lock file: the exclusive lock below decides
        return


@contextlib.contextmanager
def locked(folder: Path, *, active: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` while a job writes it (a no-op when not ``active``:
    the ranks other than 0, which write no file alone).

    Raises:
        RunError: another process holds the lock (another job is writing this folder).
    """
    if not active:
        yield
        return
    import fcntl

    path = folder / LOCK
    try:
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held across the yield
    except OSError as err:
        raise write_error(path, err) from err
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunError(
                f"{str(folder)!r} is being written by another robustft process ({holder}); wait "
                f"for it to end, or choose another --output"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        yield
    finally:
        handle.close()


# ---------------------------------------------------------------------------------------------
# the facts a run records, and the checks every later command makes against them


def fingerprint(samples: Sequence[tuple[str, int]], root: str | os.PathLike[str]) -> str:
    """A short hash of a dataset's ``(path relative to root, label)`` pairs, in order."""
    import hashlib

    h = hashlib.sha256()
    base = os.fspath(root)
    for path, label in samples:
        h.update(f"{os.path.relpath(path, base)}\t{label}\n".encode())
    return h.hexdigest()[:16]


def versions() -> dict[str, str]:
    """The versions of robustft, torch and open_clip (recorded with every run)."""
    import torch

    from robustft._version import __version__

    out = {"robustft": __version__, "torch": torch.__version__}
    try:
        import open_clip

        out["open_clip"] = open_clip.__version__
    except (ImportError, AttributeError):  # pragma: no cover - open_clip is a dependency
        pass
    return out


def read_json(path: Path, *, option: str) -> dict[str, Any]:
    """A JSON-object file of a run folder (``config.json``, ``run.json``, ``results.json``).

    Raises:
        RunError: naming ``option`` and the file, if it cannot be read, is not valid JSON or does
            not hold an object.
    """
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RunError(
            f"{option}: {str(path)!r} is damaged ({err}); the run cannot be read or checked"
        ) from err
    if not isinstance(value, dict):
        raise RunError(f"{option}: {str(path)!r} must hold a JSON object")
    return value


def read_record(folder: Path, *, option: str) -> dict[str, Any]:
    """The ``run.json`` of a run folder (``{}`` for runs written before it existed).

    Raises:
        RunError: the file exists but is damaged (:func:`read_json`).
    """
    path = folder / "run.json"
    return read_json(path, option=option) if path.exists() else {}


def write_record(folder: Path, *, command: str, status: str, **facts: Any) -> None:
    """Write ``run.json``: the job, its status, the command line, the working directory, the
    versions, and ``facts`` (the classes, templates, preprocessing and data a run saw)."""
    import sys

    record = {
        "command": command,
        "status": status,
        "argv": sys.argv,
        "cwd": str(Path.cwd()),
        "versions": versions(),
        **facts,
    }
    write_json(folder / "run.json", record)


def classes_change(before: Sequence[Sequence[str]], now: Sequence[Sequence[str]]) -> str | None:
    """What changed between two class lists of ``[folder, name]`` (``None`` if nothing)."""
    b = [tuple(c) for c in before]
    n = [tuple(c) for c in now]
    if b == n:
        return None
    bf, nf = [c[0] for c in b], [c[0] for c in n]
    added = [f for f in nf if f not in bf]
    missing = [f for f in bf if f not in nf]
    if added or missing:
        parts = []
        if added:
            parts.append(f"added {added[:5]}")
        if missing:
            parts.append(f"missing {missing[:5]}")
        return f"the classes changed ({', '.join(parts)}; {len(b)} classes then, {len(n)} now)"
    if bf != nf:
        i = next(k for k in range(len(bf)) if bf[k] != nf[k])
        return (
            f"the same classes are in another label order (label {i} was {bf[i]!r}, is now "
            f"{nf[i]!r}): the class-names file was reordered"
        )
    i = next(k for k in range(len(b)) if b[k] != n[k])
    return f"the readable name of class {b[i][0]!r} changed from {b[i][1]!r} to {n[i][1]!r}"


def check_record(
    recorded: Mapping[str, Any], current: Mapping[str, Any], *, where: str, sets: Sequence[str]
) -> None:
    """Refuse when what a command is about to read differs from what the run recorded.

    Compares the classes (folder and name, in label order), the templates, the class
    descriptions (``--descriptions``), Lipsum-FT's
    vocabulary (the token ids of ``--lipsum-vocabulary``), the image normalisation and, for
    each of ``sets`` (``"train"``, ``"val"``), the images (count and
    fingerprint). Records written before a fact existed are not checked on it.

    Raises:
        RunError: naming what changed and ``where`` it was recorded.
    """
    problems: list[str] = []
    if "classes" in recorded:
        change = classes_change(recorded["classes"], current["classes"])
        if change:
            problems.append(change)
    if "templates" in recorded and list(recorded["templates"]) != list(current["templates"]):
        problems.append(
            f"the prompt templates differ ({len(recorded['templates'])} recorded, "
            f"{len(current['templates'])} now)"
        )
    if recorded.get("descriptions") != current.get("descriptions") and (
        "descriptions" in recorded or current.get("descriptions") is not None
    ):
        then, now = recorded.get("descriptions"), current.get("descriptions")
        problems.append(
            "the class descriptions differ ("
            + ("none" if then is None else f"{sum(map(len, then.values()))}")
            + " recorded, "
            + ("none" if now is None else f"{sum(map(len, now.values()))}")
            + " now)"
        )
    if "lipsum_vocabulary" in recorded and recorded["lipsum_vocabulary"] != current.get(
        "lipsum_vocabulary"
    ):
        now = current.get("lipsum_vocabulary")
        problems.append(
            f"the Lipsum-FT vocabulary differs ({len(recorded['lipsum_vocabulary'])} token ids "
            f"recorded, {'the whole vocabulary' if now is None else f'{len(now)} token ids'} now)"
        )
    before_pre, now_pre = recorded.get("preprocess"), current.get("preprocess")
    if before_pre and now_pre:
        keys = ("mean", "std", "resize_mode", "interpolation", "image_size")
        diff = [k for k in keys if before_pre.get(k) != now_pre.get(k)]
        if diff:
            problems.append(
                "the image preprocessing differs ("
                + ", ".join(f"{k} {before_pre.get(k)} then, {now_pre.get(k)} now" for k in diff)
                + ")"
            )
    for name in sets:
        then, now = recorded.get("data", {}).get(name), current.get("data", {}).get(name)
        if not then or not now:
            continue
        if then["fingerprint"] != now["fingerprint"]:
            problems.append(
                f"the {name} images changed ({then['images']} images then, {now['images']} now, "
                f"in {now['root']!r})"
            )
    if problems:
        raise RunError(
            f"{where}: " + "; ".join(problems) + " — the run's numbers would not mean what it "
            "recorded; restore the data, or start a new run"
        )


PATH_FIELDS = (
    "train", "val", "classnames", "model", "pretrained", "templates", "descriptions",
    "lipsum_vocabulary", "output",
)  # fmt: skip
"""The configuration fields that may hold a path (besides the named sets)."""


def absolute(config: Any) -> Any:
    """``config`` with every path made absolute (relative to the working directory), so that a
    run folder means the same from any directory. Names that are not existing paths (an open_clip
    model name or pretrained tag, ``openai`` templates) are kept as they are."""
    import dataclasses

    from robustft.recipes._config import NAMED_SETS

    def fix(value: Any, must_exist: bool) -> Any:
        if not isinstance(value, str) or not value:
            return value
        path = Path(value).expanduser()
        if must_exist and not path.exists():
            return value
        return str(path.absolute())

    changes: dict[str, Any] = {}
    for name in PATH_FIELDS:
        changes[name] = fix(getattr(config, name), must_exist=name not in ("train", "output"))
    for name in NAMED_SETS:
        changes[name] = {k: fix(v, False) for k, v in getattr(config, name).items()}
    return dataclasses.replace(config, **changes)
