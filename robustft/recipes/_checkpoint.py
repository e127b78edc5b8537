"""Resumable checkpoints and weight files, loaded without an unsafe unpickle.

- One process or DDP: rank 0 writes ``checkpoint.pt`` (trained parameters, optimiser state, the
  averaging state, the loop's step) with ``torch.save``; every rank reads it with
  ``torch.load(weights_only=True)``.
- FSDP2: every rank writes its shards with ``torch.distributed.checkpoint`` into
  ``checkpoint.dcp/`` (a sharded save; resume on the same world size). Only tensors go in
  (the optimiser's hyper-parameters come from the configuration), so no value is ever
  unpickled, and DCP's own metadata file is read by a restricted unpickler that admits only
  DCP's metadata classes.
- Both are written to a temporary name and renamed, so a process killed mid-save leaves the
  previous checkpoint intact.
- Weights (the exported classifiers) are safetensors files.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from robustft.recipes._methods import trained_tree
from robustft.recipes._runtime import Runtime

__all__ = ["Loaded", "load", "load_tree", "save", "save_tree", "trim_metrics"]

PT, DCP = "checkpoint.pt", "checkpoint.dcp"


class Loaded(NamedTuple):
    """The loop state a checkpoint restores (the rest is loaded in place)."""

    step: int
    best_score: float


def save_tree(path: Path, tree: Mapping[str, Tensor]) -> None:
    """Write a tree of tensors as a safetensors file (atomically: temporary file, then rename)."""
    from safetensors.torch import save_file

    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tree.items()}, str(tmp))
    os.replace(tmp, path)


def load_tree(path: Path, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Read a safetensors file written by :func:`save_tree`."""
    from safetensors.torch import load_file

    return load_file(str(path), device=str(device))


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
    """Write the resumable state of the loop at optimiser step ``step`` (a collective under FSDP2)."""
    loop = {"step": torch.tensor(step), "best_score": torch.tensor(best_score, dtype=torch.float64)}
    if runtime.strategy == "fsdp":
        _save_dcp(run_dir, module, optimizer, state, loop, runtime)
        return
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
        tmp = run_dir / (PT + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, run_dir / PT)
    if runtime.world > 1:
        dist.barrier(group=runtime.group)


def load(
    run_dir: Path, module: nn.Module, optimizer: torch.optim.Optimizer, state: Any, runtime: Runtime
) -> Loaded:
    """Restore the module, optimiser and averaging state in place from ``run_dir``'s checkpoint.

    Raises:
        FileNotFoundError: if the run folder has no checkpoint.
        ValueError: if the checkpoint's parameters do not match the module's.
    """
    fn = "resume"
    if runtime.strategy == "fsdp":
        return _load_dcp(run_dir, module, optimizer, state, runtime)
    path = run_dir / PT
    if not path.exists():
        raise FileNotFoundError(f"{fn}: run folder {str(run_dir)!r} has no {PT} to resume from")
    payload = torch.load(path, map_location=runtime.device, weights_only=True)
    params = trained_tree(module)
    saved = payload["module"]
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise ValueError(
            f"{fn}: checkpoint parameters must match the run's, got missing {missing[:5]} and "
            f"unexpected {extra[:5]}"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    optimizer.load_state_dict(payload["optimizer"])
    if state is not None:
        with torch.no_grad():
            for name, v in state.average.items():
                v.copy_(payload["average"][name])
            for name, v in _counters(state).items():
                v.copy_(payload["counters"][name])
    loop = payload["loop"]
    return Loaded(int(loop["step"]), float(loop["best_score"]))


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


def _save_dcp(
    run_dir: Path,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: Any,
    loop: dict[str, Tensor],
    runtime: Runtime,
) -> None:
    import torch.distributed.checkpoint as dcp

    app, _, _ = _dcp_state(module, optimizer, state)
    app["loop"] = loop
    tmp, final, old = run_dir / (DCP + ".tmp"), run_dir / DCP, run_dir / (DCP + ".old")
    if runtime.main and tmp.exists():
        shutil.rmtree(tmp)
    dist.barrier(group=runtime.group)
    dcp.save(app, checkpoint_id=str(tmp))
    dist.barrier(group=runtime.group)
    if runtime.main:
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
    dist.barrier(group=runtime.group)


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only what DCP's metadata file holds: its dataclasses, torch dtypes/sizes, builtins."""

    _MODULES: ClassVar[tuple[str, ...]] = (
        "torch.distributed.checkpoint.metadata",
        "torch.distributed.checkpoint.filesystem",
        "torch.distributed.checkpoint.planner",
    )
    _SAFE: ClassVar[set[tuple[str, str]]] = {
        ("torch", "Size"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("torch", "device"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "PureWindowsPath"),
        ("torch.serialization", "_get_layout"),
    }  # the last maps a layout name to torch.layout

    def find_class(self, module: str, name: str) -> Any:
        if module in self._MODULES or (module, name) in self._SAFE:
            return super().find_class(module, name)
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
        ):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"resume: checkpoint metadata must hold only torch.distributed.checkpoint metadata, "
            f"got a reference to {module}.{name}; refusing to unpickle it"
        )


def _safe_reader(path: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            rank = kwargs.get("rank")
            meta_path = self._get_metadata_path(rank)
            with self.fs.create_stream(meta_path, "rb") as f:
                metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _load_dcp(
    run_dir: Path, module: nn.Module, optimizer: torch.optim.Optimizer, state: Any, runtime: Runtime
) -> Loaded:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    path = run_dir / DCP
    if not path.exists() and (run_dir / (DCP + ".old")).exists():
        path = run_dir / (DCP + ".old")
    if not path.exists():
        raise FileNotFoundError(f"resume: run folder {str(run_dir)!r} has no {DCP} to resume from")
    app, model_sd, optim_sd = _dcp_state(module, optimizer, state)
    app["loop"] = {"step": torch.tensor(0), "best_score": torch.tensor(0.0, dtype=torch.float64)}
    dcp.load(app, storage_reader=_safe_reader(path))
    set_state_dict(
        module,
        optimizer,
        model_state_dict=model_sd,
        optim_state_dict=optim_sd,
        # frozen parameters (CLIPood's class texts) are not in the checkpoint; the trained
        # ones are, or dcp.load above has already failed on the missing key
        options=StateDictOptions(ignore_frozen_params=True, strict=False),
    )
    # the averaging state's tensors were loaded in place (they are the state's own)
    return Loaded(int(app["loop"]["step"]), float(app["loop"]["best_score"]))


def trim_metrics(run_dir: Path, step: int) -> list[dict[str, float]]:
    """Drop ``metrics.jsonl`` lines logged after the checkpoint's ``step``; return the kept ones."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    kept = [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    kept = [line for line in kept if line.get("step", 0) <= step]
    path.write_text("".join(json.dumps(line) + "\n" for line in kept), encoding="utf-8")
    return kept
