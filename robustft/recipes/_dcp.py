"""The FSDP2 checkpoint ``checkpoint.dcp/``: sharded, rotated kill-safe, its metadata read safely.

- Every rank writes its shards with ``torch.distributed.checkpoint`` (DCP) into
  ``checkpoint.dcp/`` (a sharded save; resume on the same world size). Only tensors go in (the
  optimiser's hyper-parameters come from the configuration). DCP's ``.metadata`` file is a
  pickle: it is read by an unpickler that admits an exact allow-list of (module, name) pairs —
  DCP's metadata dataclasses, ``torch.Size``, dtypes, layouts, memory formats — with no dotted
  names, and a metadata that declares a non-tensor (pickled bytes) item, which DCP would
  unpickle, is refused before any data is read.
- The DCP folder is rotated ``.tmp`` → ``checkpoint.dcp`` (the previous one kept as ``.old``
  until the new one is in place): a kill between any two steps leaves a complete checkpoint (a
  folder whose ``.metadata`` exists), which the next load finds, and the next save tidies up.
- A damaged or foreign folder ends in one line that names it and says what to do, never in the
  library's own error.

:func:`save_dcp` and :func:`load_dcp` are what :func:`robustft.recipes._checkpoint.save` and
:func:`~robustft.recipes._checkpoint.load` do under FSDP2; the pieces both checkpoint formats
share (:func:`counters`, :data:`RESTART`) live here too; a failure on one rank is raised on every
rank by :func:`robustft.recipes._runtime.fail_together`.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import io
import os
import pathlib
import pickle
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from robustft.recipes._runfolder import RunError, write_error
from robustft.recipes._runtime import Runtime, fail_together
from robustft.recipes._weights import mismatches

__all__ = ["DCP", "RESTART", "counters", "load_dcp", "save_dcp"]

DCP = "checkpoint.dcp"
_TMP, _OLD, _META = DCP + ".tmp", DCP + ".old", ".metadata"
RESTART = "start the run again with --overwrite (or from an earlier copy of the run folder)"


# ---------------------------------------------------------------------------------------------
# the averaging state's and the optimiser's tensors


def counters(state: Any) -> dict[str, Tensor]:
    """The averaging state's tensor fields but ``live`` (its counters); ``{}`` without one."""
    if state is None:
        return {}
    return {k: v for k, v in state._asdict().items() if isinstance(v, Tensor) and k != "live"}


def _tensor_leaves(tree: Any) -> Any:
    """The nested dict ``tree`` with only its tensor leaves (DCP then pickles no values)."""
    if isinstance(tree, Mapping):
        out = {k: _tensor_leaves(v) for k, v in tree.items()}
        return {
            k: v for k, v in out.items() if isinstance(v, Tensor) or (isinstance(v, dict) and v)
        }
    return tree if isinstance(tree, Tensor) else None


# ---------------------------------------------------------------------------------------------
# checkpoint.dcp (FSDP2): the restricted metadata unpickler


@functools.cache
def _allowed() -> dict[tuple[str, str], Any]:
    """The exact (module, qualified name) pairs a DCP ``.metadata`` file may reference.

    What torch's own metadata files hold: DCP's metadata dataclasses and memory-format enum, the
    file system writer's storage record, ``torch.Size``, ``torch.serialization._get_layout``
    (a layout by name), the path DCP records as the checkpoint id, and every dtype, layout and
    memory format by its name in ``torch``; ``collections.OrderedDict`` for older files.
    """
    from torch.distributed.checkpoint import filesystem as fs
    from torch.distributed.checkpoint import metadata as md

    allowed: dict[tuple[str, str], Any] = {
        ("torch.distributed.checkpoint.metadata", cls.__name__): cls
        for cls in (
            md.Metadata,
            md.TensorStorageMetadata,
            md.BytesStorageMetadata,  # admitted to be named in the refusal, never loaded
            md.ChunkStorageMetadata,
            md.TensorProperties,
            md.MetadataIndex,
            md.StorageMeta,
            md._MEM_FORMAT_ENCODING,
        )
    }
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = fs._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    allowed[("pathlib", "PosixPath")] = pathlib.PosixPath
    for name, value in vars(torch).items():
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = value
    return allowed


@functools.cache
def _buildable() -> frozenset[type]:
    """The classes whose instances a metadata pickle may set the state of (``BUILD``)."""
    from torch.distributed.checkpoint import filesystem as fs
    from torch.distributed.checkpoint import metadata as md

    return frozenset(
        {
            md.Metadata,
            md.TensorStorageMetadata,
            md.BytesStorageMetadata,
            md.ChunkStorageMetadata,
            md.TensorProperties,
            md.MetadataIndex,
            md.StorageMeta,
            fs._StorageInfo,
        }
    )


class _Refused(pickle.UnpicklingError):
    """A metadata pickle asked for something outside the allow-list."""


_BUILD: Callable[[Any], None] = pickle._Unpickler.dispatch[pickle.BUILD[0]]


class _MetadataUnpickler(pickle._Unpickler):
    """Admits only the exact pairs of :func:`_allowed`, resolved by us, never by attribute walk.

    The pure-Python unpickler, so that ``BUILD`` (which sets attributes) can be limited to
    instances of DCP's metadata classes: a pickle cannot write attributes onto a class.
    """

    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = dict(pickle._Unpickler.dispatch)
    stack: list[Any]

    def find_class(self, module: str, name: str) -> Any:
        found = _allowed().get((module, name))
        if found is None:
            raise _Refused(f"it references {module}.{name}, which DCP metadata never holds")
        return found

    def _load_build(self) -> None:
        target = self.stack[-2] if len(self.stack) >= 2 else None
        if type(target) not in _buildable():
            raise _Refused(f"it sets the state of a {type(target).__name__}")
        _BUILD(self)

    dispatch[pickle.BUILD[0]] = _load_build

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("it references a persistent id")


def _refused(path: Path, why: str) -> RunError:
    return RunError(
        f"refusing checkpoint metadata {str(path)!r}: {why}; robustft writes tensors only, so "
        f"this file was not written by it (or was altered) — {RESTART}"
    )


def _check_metadata(path: Path, metadata: Any) -> None:
    """Refuse what DCP could turn into an unpickle or a read outside the folder."""
    from torch.distributed.checkpoint import filesystem as fs
    from torch.distributed.checkpoint import metadata as md

    if type(metadata) is not md.Metadata or not isinstance(metadata.state_dict_metadata, dict):
        raise _refused(path, "it is not DCP metadata")
    for key, item in metadata.state_dict_metadata.items():
        if type(item) is md.BytesStorageMetadata:
            raise _refused(
                path, f"it declares {key!r} a pickled (non-tensor) item, which loading unpickles"
            )
        if type(item) is not md.TensorStorageMetadata or not isinstance(key, str):
            raise _refused(path, f"its entry {key!r} is not a tensor")
    if not isinstance(metadata.storage_data, dict):
        raise _refused(path, "it has no storage records")
    for info in metadata.storage_data.values():
        rel = getattr(info, "relative_path", None)
        if type(info) is not fs._StorageInfo or not isinstance(rel, str):
            raise _refused(path, "a storage record is not DCP's")
        if rel in ("", ".", "..") or Path(rel).name != rel or "\\" in rel:
            raise _refused(path, f"a storage record points outside its folder ({rel!r})")
        if info.transform_descriptors:
            raise _refused(
                path, f"a storage record asks for transforms {info.transform_descriptors}"
            )


def _read_dcp_metadata(folder: Path) -> Any:
    """The checkpoint folder's ``.metadata``, unpickled by :class:`_MetadataUnpickler`, checked.

    Raises:
        RunError: if the file cannot be read, is damaged, references anything outside the
            allow-list, or declares a non-tensor item.
    """
    path = folder / _META
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RunError(
            f"cannot read checkpoint metadata {str(path)!r}: {err.strerror or err} — check the "
            f"folder and its permissions"
        ) from err
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except _Refused as err:
        raise _refused(path, str(err)) from None
    except Exception as err:  # a truncated or garbage pickle: any error of the unpickler
        raise RunError(
            f"checkpoint metadata {str(path)!r} is damaged (truncated or overwritten) — {RESTART}"
        ) from err
    _check_metadata(path, metadata)
    return metadata


def _safe_reader(folder: Path, metadata: Any | None = None) -> Any:
    """A DCP file system reader that hands DCP ``metadata`` (read by :func:`_read_dcp_metadata`).

    Its ``read_metadata`` takes no ``rank``: DCP then never falls back to another file.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    checked = _read_dcp_metadata(Path(folder)) if metadata is None else metadata

    class SafeReader(FileSystemReader):
        def read_metadata(self) -> Any:
            if checked.storage_meta is None:
                checked.storage_meta = StorageMeta()
            checked.storage_meta.load_id = self.load_id
            return checked

    return SafeReader(str(folder))


# ---------------------------------------------------------------------------------------------
# checkpoint.dcp: save, rotation, load


def _complete(folder: Path) -> bool:
    """A DCP folder is complete once its ``.metadata`` exists (DCP writes it last, by rename)."""
    return (folder / _META).is_file()


def _remove(folder: Path) -> None:
    """Remove a checkpoint folder; its ``.metadata`` first, so a half-removed one is incomplete."""
    if folder.is_symlink() or folder.is_file():
        folder.unlink()
    elif folder.exists():
        with contextlib.suppress(FileNotFoundError):
            (folder / _META).unlink()
        shutil.rmtree(folder)


def _fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (a no-op where directories cannot be synced)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _tidy_dcp(run_dir: Path) -> None:
    """Before a save: keep the last complete checkpoint as ``checkpoint.dcp``, drop the rest.

    A kill between two steps of :func:`_rotate_dcp` leaves some of ``.tmp`` (partial, or
    complete but not yet promoted), ``checkpoint.dcp`` and ``.old``; ``.old`` is the last
    complete one only when ``checkpoint.dcp`` is missing or incomplete.
    """
    tmp, final, old = run_dir / _TMP, run_dir / DCP, run_dir / _OLD
    if not _complete(final) and _complete(old):
        _remove(final)
        os.replace(old, final)
        _fsync_dir(run_dir)
    _remove(old)
    _remove(tmp)


def _rotate_dcp(run_dir: Path) -> None:
    """After a save into ``.tmp``: put it in place, then drop the previous checkpoint."""
    tmp, final, old = run_dir / _TMP, run_dir / DCP, run_dir / _OLD
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    _remove(old)


def _dcp_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, state: Any
) -> tuple[dict[str, Any], Any, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(module, optimizer, options=options)
    app = {
        "model": model_sd,
        "optim": _tensor_leaves(optim_sd.get("state", {})) or {},
        "average": {} if state is None else dict(state.average),
        "counters": counters(state),
    }
    return app, model_sd, optim_sd


def _dcp_failure(err: BaseException) -> BaseException:
    """The first rank's exception inside a DCP ``CheckpointException`` (else ``err``); the
    ``OSError`` behind it if there is one (``torch.save`` wraps a full disk in a RuntimeError)."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        if isinstance(first, tuple) and first and isinstance(first[0], BaseException):
            err = first[0]
    link: BaseException | None = err
    for _ in range(8):  # a short chain: causes and contexts
        if link is None or isinstance(link, OSError):
            break
        link = link.__cause__ or link.__context__
    return link if isinstance(link, OSError) else err


def _io_error(folder: Path) -> OSError:
    """A write that failed without an errno: a full disk if the disk is (nearly) full now."""
    with contextlib.suppress(OSError):
        if shutil.disk_usage(folder).free < 2**20:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return OSError(errno.EIO, "the write failed")


def save_dcp(
    run_dir: Path,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: Any,
    loop: dict[str, Tensor],
    runtime: Runtime,
) -> None:
    """:func:`robustft.recipes._checkpoint.save` under FSDP2 (``loop``: the loop's scalars)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    app, _, _ = _dcp_state(module, optimizer, state)
    app["loop"] = loop
    tmp, final = run_dir / _TMP, run_dir / DCP
    error: BaseException | None = None
    if runtime.main:
        try:
            _tidy_dcp(run_dir)
        except OSError as err:
            error = write_error(tmp, err)
    fail_together(error, runtime, f"rank 0 could not prepare {str(tmp)!r} (see its error)")
    try:
        dcp.save(app, checkpoint_id=str(tmp))
    except (CheckpointException, OSError, RuntimeError) as err:  # every rank gets DCP's error
        cause = _dcp_failure(err)
        if isinstance(cause, OSError):
            raise write_error(tmp, cause) from None
        if "enforce fail" in str(cause) or "write failed" in str(cause):  # torch.save's I/O
            raise write_error(tmp, _io_error(run_dir)) from None
        raise cause from err  # not an I/O fault: a bug, with its traceback
    error = None
    if runtime.main:
        try:
            _rotate_dcp(run_dir)
        except OSError as err:
            error = write_error(final, err)
    fail_together(error, runtime, f"rank 0 could not rename {str(tmp)!r} (see its error)")


def _flat(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """DCP's flat keys of a nested dict (``model.visual.proj``) and their leaves."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _dcp_folder(run_dir: Path) -> Path:
    """The last complete DCP checkpoint: ``checkpoint.dcp``, else ``checkpoint.dcp.old``."""
    for name in (DCP, _OLD):
        if _complete(run_dir / name):
            return run_dir / name
    raise FileNotFoundError(
        f"resume: run folder {str(run_dir)!r} has no {DCP} to resume from (a folder without its "
        f"{_META} file is incomplete: the run was stopped while writing it)"
    )


def load_dcp(
    run_dir: Path, module: nn.Module, optimizer: torch.optim.Optimizer, state: Any, runtime: Runtime
) -> tuple[int, float]:
    """:func:`robustft.recipes._checkpoint.load` under FSDP2: the step and best score saved."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    error: BaseException | None = None
    folder, metadata = run_dir / DCP, cast(Any, None)
    try:  # every rank reads the same file: the same refusal on every rank
        folder = _dcp_folder(run_dir)
        metadata = _read_dcp_metadata(folder)
    except (FileNotFoundError, RunError) as err:
        error = err
    fail_together(error, runtime, f"another rank could not read {str(folder)!r} (see its error)")
    app, model_sd, optim_sd = _dcp_state(module, optimizer, state)
    app["loop"] = {"step": torch.tensor(0), "best_score": torch.tensor(0.0, dtype=torch.float64)}
    saved = {k: (v.size, v.properties.dtype) for k, v in metadata.state_dict_metadata.items()}
    problems = mismatches(saved, {k: (v.shape, v.dtype) for k, v in _flat(app)})
    if problems:  # the same tree on every rank: the same refusal on every rank
        raise RunError(
            f"checkpoint {str(folder)!r} was not written by this run: {'; '.join(problems)} — "
            f"resume the run that wrote it, or {RESTART}"
        )
    try:
        dcp.load(app, storage_reader=_safe_reader(folder, metadata))
    except (CheckpointException, Exception) as err:  # DCP gathers every rank's failure
        cause = _dcp_failure(err)
        missing = getattr(cause, "filename", None) if isinstance(cause, OSError) else None
        what = f"cannot read {str(missing)!r}" if missing else "a data file is truncated or damaged"
        raise RunError(f"checkpoint {str(folder)!r} is damaged: {what} — {RESTART}") from None
    set_state_dict(
        module,
        optimizer,
        model_state_dict=model_sd,
        optim_state_dict=optim_sd,
        # frozen parameters (CLIPood's class texts) are not in the checkpoint; the trained
        # ones are, checked above
        options=StateDictOptions(ignore_frozen_params=True, strict=False),
    )
    # the averaging state's tensors were loaded in place (they are the state's own)
    return int(app["loop"]["step"]), float(app["loop"]["best_score"])
