"""Resumable checkpoints: written atomically, read without running any code.

- One process or DDP: rank 0 writes ``checkpoint.pt`` (trained parameters, optimiser state, the
  averaging state, the loop's step) with ``torch.save``; every rank reads it with
  ``torch.load(weights_only=True)``, which refuses any object but tensors and plain containers.
- FSDP2: every rank writes its shards into ``checkpoint.dcp/`` with
  ``torch.distributed.checkpoint``, rotated kill-safe, its metadata read by an exact allow-list
  unpickler (:mod:`robustft.recipes._dcp`); :func:`save` and :func:`load` dispatch to it.
- ``checkpoint.pt`` and the rewritten ``metrics.jsonl`` go through
  :func:`robustft.recipes._runfolder.atomic_write`: a kill, a full disk or a read-only folder
  leaves the previous version intact and ends in one :class:`RunError` line.
- Weights (the exported classifiers) are safetensors files, with string metadata
  (:mod:`robustft.recipes._weights`; :func:`save_tree`, :func:`load_tree` and
  :func:`read_metadata` are re-exported here).
- A damaged or foreign file ends in one line that names it and says what to do, never in the
  library's own error.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from robustft.recipes._dcp import DCP as DCP
from robustft.recipes._dcp import RESTART, counters, load_dcp, save_dcp
from robustft.recipes._methods import trained_tree
from robustft.recipes._runfolder import RunError, atomic_write
from robustft.recipes._runtime import Runtime, fail_together
from robustft.recipes._weights import load_tree, mismatches, read_metadata, save_tree, specs

__all__ = ["Loaded", "load", "load_tree", "read_metadata", "save", "save_tree", "trim_metrics"]

PT, METRICS = "checkpoint.pt", "metrics.jsonl"


class Loaded(NamedTuple):
    """The loop state a checkpoint restores (the rest is loaded in place)."""

    step: int
    best_score: float


# ---------------------------------------------------------------------------------------------
# checkpoint.pt (one process, DDP)


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
        save_dcp(Path(run_dir), module, optimizer, state, loop, runtime)
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
            "counters": counters(state),
        }
        try:
            atomic_write(Path(run_dir) / PT, _torch_save(payload))
        except RunError as err:
            error = err
    fail_together(
        error, runtime, f"rank 0 could not write {str(Path(run_dir) / PT)!r} (see its error)"
    )


def _read_pt(path: Path, device: torch.device) -> Any:
    """``torch.load(weights_only=True)`` of ``path``, its failures in one line."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" not in str(err):  # not a refused reference: an unreadable pickle
            raise _damaged_pt(path) from err
        raise RunError(
            f"checkpoint {str(path)!r} holds objects other than tensors and plain containers "
            f"(refusing to unpickle them: robustft never writes such a file) — {RESTART}"
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
        f"— {RESTART}"
    )


def _check_pt(path: Path, payload: Any, module: nn.Module, state: Any) -> None:
    """Refuse a ``checkpoint.pt`` that is not this run's, before anything is loaded."""

    def foreign(what: str) -> RunError:
        return RunError(
            f"checkpoint {str(path)!r} was not written by this run: {what} — resume the run "
            f"that wrote it, or {RESTART}"
        )

    keys = ("loop", "module", "optimizer", "average", "counters")
    if not isinstance(payload, dict) or not set(keys) <= set(payload):
        raise foreign(f"it must hold the entries {list(keys)}")
    trees: list[tuple[str, Any, Mapping[str, Tensor]]] = [
        ("parameters", payload["module"], trained_tree(module))
    ]
    if state is not None:
        trees.append(("averaged parameters", payload["average"], state.average))
        trees.append(("averaging counters", payload["counters"], counters(state)))
    elif payload["average"] is not None:
        raise foreign("it holds an averaging state and this run averages nothing")
    for name, saved, own in trees:
        if not isinstance(saved, dict) or not all(isinstance(v, Tensor) for v in saved.values()):
            raise foreign(f"its {name} are not a dict of tensors")
        problems = mismatches(specs(saved), specs(own))
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
        return Loaded(*load_dcp(run_dir, module, optimizer, state, runtime))
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
    fail_together(error, runtime, f"another rank could not read {str(path)!r} (see its error)")
    try:  # first: it refuses a foreign state before changing anything
        optimizer.load_state_dict(payload["optimizer"])
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise RunError(
            f"checkpoint {str(path)!r} holds an optimiser state that does not fit this run's "
            f"optimiser (another optimiser or parameter groups) — resume with the run's own "
            f"configuration, or {RESTART}"
        ) from err
    with torch.no_grad():
        for name, p in trained_tree(module).items():
            p.copy_(payload["module"][name])
        if state is not None:
            for name, v in state.average.items():
                v.copy_(payload["average"][name])
            for name, v in counters(state).items():
                v.copy_(payload["counters"][name])
    loop = payload["loop"]
    return Loaded(int(loop["step"]), float(loop["best_score"]))


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
