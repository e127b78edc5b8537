"""Resumable checkpoints and weight files: written atomically, read without running any code.

- One process or DDP: rank 0 writes ``checkpoint.pt`` (trained parameters, optimiser state, the
  averaging state, the loop's step) with ``torch.save``; every rank reads it with
  ``torch.load(weights_only=True)``, which refuses any object but tensors and plain containers.
- FSDP2: every rank writes its shards with ``torch.distributed.checkpoint`` (DCP) into
  ``checkpoint.dcp/`` (a sharded save; resume on the same world size). Only tensors go in (the
  optimiser's hyper-parameters come from the configuration). DCP's ``.metadata`` file is a
  pickle: it is read by an unpickler that admits an exact allow-list of (module, name) pairs —
  DCP's metadata dataclasses, ``torch.Size``, dtypes, layouts, memory formats — with no dotted
  names, and a metadata that declares a non-tensor (pickled bytes) item, which DCP would
  unpickle, is refused before any data is read.
- ``checkpoint.pt``, the weight files and the rewritten ``metrics.jsonl`` go through
  :func:`robustft.recipes._runfolder.atomic_write`: a kill, a full disk or a read-only folder
  leaves the previous version intact and ends in one :class:`RunError` line.
- The DCP folder is rotated ``.tmp`` → ``checkpoint.dcp`` (the previous one kept as ``.old``
  until the new one is in place): a kill between any two steps leaves a complete checkpoint (a
  folder whose ``.metadata`` exists), which the next load finds, and the next save tidies up.
- Weights (the exported classifiers) are safetensors files, with string metadata.
- A damaged or foreign file ends in one line that names it and says what to do, never in the
  library's own error.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import io
import json
import os
import pathlib
import pickle
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from robustft.recipes._methods import trained_tree
from robustft.recipes._runfolder import RunError, atomic_write, write_error
from robustft.recipes._runtime import Runtime

__all__ = ["Loaded", "load", "load_tree", "read_metadata", "save", "save_tree", "trim_metrics"]

PT, DCP, METRICS = "checkpoint.pt", "checkpoint.dcp", "metrics.jsonl"
_TMP, _OLD, _META = DCP + ".tmp", DCP + ".old", ".metadata"
_RESTART = "start the run again with --overwrite (or from an earlier copy of the run folder)"


class Loaded(NamedTuple):
    """The loop state a checkpoint restores (the rest is loaded in place)."""

    step: int
    best_score: float


# ---------------------------------------------------------------------------------------------
# weight files (safetensors)


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


def _mismatches(
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


def _specs(tree: Mapping[str, Tensor]) -> dict[str, tuple[torch.Size, torch.dtype]]:
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
        problems = _mismatches(_specs(tree), _specs(like))
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


# ---------------------------------------------------------------------------------------------
# ranks agree on a failure


def _agree(error: BaseException | None, runtime: Runtime, other: str) -> None:
    """Raise ``error`` on its rank and a :class:`RunError` saying ``other`` on every other rank.

    A collective under several processes (it also orders what comes after it behind what came
    before on every rank, like a barrier), so one rank's failure never leaves the others waiting.
    """
    if runtime.world > 1:
        flag = torch.tensor(0 if error is None else 1, device=runtime.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=runtime.group)
        if error is None and int(flag):
            raise RunError(other)
    if error is not None:
        raise error


# ---------------------------------------------------------------------------------------------
# checkpoint.pt (one process, DDP)


def _counters(state: Any) -> dict[str, Tensor]:
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


def _torch_save(payload: Any) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # through a file object: a full disk is an OSError(ENOSPC)
            torch.save(payload, f)

    return write


def save(
    run_dir: Path,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: Any,
    runtime: Runtime,
    *,
    step: int,
    best_score: float,
) -> None:
    """Write the resumable state of the loop at optimiser step ``step`` (a collective).

    Args:
        run_dir: the run folder.
        module: the trained module (DDP-wrapped or FSDP2-sharded under several processes).
        optimizer: its optimiser.
        state: the averaging state, or ``None``.
        runtime: where the run executes.
        step: the optimiser steps taken.
        best_score: the best validation score so far.

    Raises:
        RunError: on every rank, if the checkpoint cannot be written (full disk, read-only
            folder); the previous checkpoint is intact and loadable.
    """
    loop = {"step": torch.tensor(step), "best_score": torch.tensor(best_score, dtype=torch.float64)}
    if runtime.strategy == "fsdp":
        _save_dcp(Path(run_dir), module, optimizer, state, loop, runtime)
        return
    error = None
    if runtime.main:
        payload = {
            "loop": loop,
            "module": {n: p.detach().cpu() for n, p in trained_tree(module).items()},
            "optimizer": optimizer.state_dict(),
            "average": None
            if state is None
            else {k: v.detach().cpu() for k, v in state.average.items()},
            "counters": _counters(state),
        }
        try:
            atomic_write(Path(run_dir) / PT, _torch_save(payload))
        except RunError as err:
            error = err
    _agree(error, runtime, f"rank 0 could not write {str(Path(run_dir) / PT)!r} (see its error)")


def _read_pt(path: Path, device: torch.device) -> Any:
    """``torch.load(weights_only=True)`` of ``path``, its failures in one line."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" not in str(err):  # not a refused reference: an unreadable pickle
            raise _damaged_pt(path) from err
        raise RunError(
            f"checkpoint {str(path)!r} holds objects other than tensors and plain containers "
            f"(refusing to unpickle them: robustft never writes such a file) — {_RESTART}"
        ) from err
    except OSError as err:
        raise RunError(
            f"cannot read checkpoint {str(path)!r}: {err.strerror or err} — check the file and "
            f"its permissions"
        ) from err
    except Exception as err:  # PytorchStreamReader, EOFError, ...: the file is damaged
        raise _damaged_pt(path) from err


def _damaged_pt(path: Path) -> RunError:
    return RunError(
        f"checkpoint {str(path)!r} is damaged (truncated, overwritten or not a torch checkpoint) "
        f"— {_RESTART}"
    )


def _check_pt(path: Path, payload: Any, module: nn.Module, state: Any) -> None:
    """Refuse a ``checkpoint.pt`` that is not this run's, before anything is loaded."""

    def foreign(what: str) -> RunError:
        return RunError(
            f"checkpoint {str(path)!r} was not written by this run: {what} — resume the run "
            f"that wrote it, or {_RESTART}"
        )

    keys = ("loop", "module", "optimizer", "average", "counters")
    if not isinstance(payload, dict) or not set(keys) <= set(payload):
        raise foreign(f"it must hold the entries {list(keys)}")
    trees: list[tuple[str, Any, Mapping[str, Tensor]]] = [
        ("parameters", payload["module"], trained_tree(module))
    ]
    if state is not None:
        trees.append(("averaged parameters", payload["average"], state.average))
        trees.append(("averaging counters", payload["counters"], _counters(state)))
    elif payload["average"] is not None:
        raise foreign("it holds an averaging state and this run averages nothing")
    for name, saved, own in trees:
        if not isinstance(saved, dict) or not all(isinstance(v, Tensor) for v in saved.values()):
            raise foreign(f"its {name} are not a dict of tensors")
        problems = _mismatches(_specs(saved), _specs(own))
        if problems:
            raise foreign(f"its {name} differ ({'; '.join(problems)})")
    loop = payload["loop"]
    if not isinstance(loop, dict) or not all(
        isinstance(loop.get(k), Tensor) and loop[k].numel() == 1 for k in ("step", "best_score")
    ):
        raise foreign("its loop state must hold the scalars 'step' and 'best_score'")


def load(
    run_dir: Path, module: nn.Module, optimizer: torch.optim.Optimizer, state: Any, runtime: Runtime
) -> Loaded:
    """Restore the module, optimiser and averaging state in place from ``run_dir``'s checkpoint.

    Under FSDP2 the last complete ``checkpoint.dcp`` is read (``checkpoint.dcp.old`` if a kill
    left only that one).

    Args:
        run_dir: the run folder.
        module: the trained module, as :func:`save` was given it.
        optimizer: its optimiser.
        state: the averaging state (loaded in place), or ``None``.
        runtime: where the run executes.

    Returns:
        The step and best score the checkpoint was saved at.

    Raises:
        FileNotFoundError: if the run folder has no (complete) checkpoint.
        RunError: on every rank, if the checkpoint is damaged, holds anything but tensors, or
            was written for another model or configuration (the message names the file and
            what differs).
    """
    run_dir = Path(run_dir)
    if runtime.strategy == "fsdp":
        return _load_dcp(run_dir, module, optimizer, state, runtime)
    path = run_dir / PT
    error: BaseException | None = None
    payload: Any = None
    try:
        if not path.exists():
            raise FileNotFoundError(
                f"resume: run folder {str(run_dir)!r} has no {PT} to resume from"
            )
        payload = _read_pt(path, runtime.device)
        _check_pt(path, payload, module, state)
    except (FileNotFoundError, RunError) as err:
        error = err
    _agree(error, runtime, f"another rank could not read {str(path)!r} (see its error)")
    try:  # first: it refuses a foreign state before changing anything
        optimizer.load_state_dict(payload["optimizer"])
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise RunError(
            f"checkpoint {str(path)!r} holds an optimiser state that does not fit this run's "
            f"optimiser (another optimiser or parameter groups) — resume with the run's own "
            f"configuration, or {_RESTART}"
        ) from err
    with torch.no_grad():
        for name, p in trained_tree(module).items():
            p.copy_(payload["module"][name])
        if state is not None:
            for name, v in state.average.items():
                v.copy_(payload["average"][name])
            for name, v in _counters(state).items():
                v.copy_(payload["counters"][name])
    loop = payload["loop"]
    return Loaded(int(loop["step"]), float(loop["best_score"]))


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
        f"this file was not written by it (or was altered) — {_RESTART}"
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
            f"checkpoint metadata {str(path)!r} is damaged (truncated or overwritten) — {_RESTART}"
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
        "counters": _counters(state),
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


def _save_dcp(
    run_dir: Path,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: Any,
    loop: dict[str, Tensor],
    runtime: Runtime,
) -> None:
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
    _agree(error, runtime, f"rank 0 could not prepare {str(tmp)!r} (see its error)")
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
    _agree(error, runtime, f"rank 0 could not rename {str(tmp)!r} (see its error)")


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


def _load_dcp(
    run_dir: Path, module: nn.Module, optimizer: torch.optim.Optimizer, state: Any, runtime: Runtime
) -> Loaded:
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
    _agree(error, runtime, f"another rank could not read {str(folder)!r} (see its error)")
    app, model_sd, optim_sd = _dcp_state(module, optimizer, state)
    app["loop"] = {"step": torch.tensor(0), "best_score": torch.tensor(0.0, dtype=torch.float64)}
    saved = {k: (v.size, v.properties.dtype) for k, v in metadata.state_dict_metadata.items()}
    problems = _mismatches(saved, {k: (v.shape, v.dtype) for k, v in _flat(app)})
    if problems:  # the same tree on every rank: the same refusal on every rank
        raise RunError(
            f"checkpoint {str(folder)!r} was not written by this run: {'; '.join(problems)} — "
            f"resume the run that wrote it, or {_RESTART}"
        )
    try:
        dcp.load(app, storage_reader=_safe_reader(folder, metadata))
    except (CheckpointException, Exception) as err:  # DCP gathers every rank's failure
        cause = _dcp_failure(err)
        missing = getattr(cause, "filename", None) if isinstance(cause, OSError) else None
        what = f"cannot read {str(missing)!r}" if missing else "a data file is truncated or damaged"
        raise RunError(f"checkpoint {str(folder)!r} is damaged: {what} — {_RESTART}") from None
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
    return Loaded(int(app["loop"]["step"]), float(app["loop"]["best_score"]))


# ---------------------------------------------------------------------------------------------
# metrics.jsonl


def trim_metrics(run_dir: Path, step: int) -> list[dict[str, float]]:
    """Drop ``metrics.jsonl`` lines logged after the checkpoint's ``step``; return the kept ones.

    The file is rewritten atomically. A partial last line (a kill while a line was appended; it
    belongs to a step after the checkpoint) is dropped.

    Args:
        run_dir: the run folder.
        step: the step of the checkpoint resumed from.

    Returns:
        The kept lines, parsed.

    Raises:
        RunError: if a line other than a partial last one is not a JSON object (the message
            names the file and the line), or the file cannot be rewritten.
    """
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    partial = not raw.endswith(b"\n")  # then the last element is a line cut short
    if not partial:
        lines.pop()
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError and JSONDecodeError
            value = None
        if not isinstance(value, dict) or not isinstance(value.get("step", 0), (int, float)):
            if partial and number == len(lines):
                break
            raise RunError(
                f"{str(path)!r} line {number} is not a metrics line (a JSON object with a "
                f"'step'): the run's log is damaged — fix or delete that line, then resume again"
            )
        if value.get("step", 0) <= step:
            kept.append(value)
    atomic_write(path, "".join(json.dumps(line) + "\n" for line in kept))
    return kept
