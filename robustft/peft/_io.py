"""Factor files: a small safetensors file whose metadata says how to use it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from robustft._checks import check_tensor_tree, describe
from robustft.peft._spec import Spec, targets_of
from robustft.typing import Params

__all__ = ["header", "load", "save"]

_KEY = "robustft.peft"


def header(spec: Spec, factors: Params) -> dict[str, str]:
    """The safetensors header metadata of a factor file: ``{"robustft.peft": JSON}``.

    What :func:`save` writes and :func:`load` reads: the spec's hyper-parameters and the names of
    the weights the factors update. For writers of their own (atomic writes, extra metadata).

    Raises:
        TypeError: a bad spec or tree.
        ValueError: keys that are not factors of ``spec``.

    Example:
        >>> header(lora(rank=1, alpha=1, targets="w"), {"w_lora_A": torch.zeros(1, 2),
        ...        "w_lora_B": torch.zeros(2, 1)})["robustft.peft"][:30]
        '{"kind": "lora", "rank": 1, "a'
    """
    fn = "header"
    if not isinstance(spec, Spec):
        raise TypeError(f"{fn}: spec must be a robustft.peft.Spec, got {describe(spec)}")
    tree = check_tensor_tree(fn, "factors", factors)
    targets = targets_of(fn, spec, tree)
    return {_KEY: json.dumps({**spec.metadata(), "targets": [t.weight for t in targets]})}


def save(path: str | os.PathLike[str], spec: Spec, factors: Params) -> Path:
    """Write ``factors`` to a safetensors file with ``spec`` and the target weights in its metadata.

    The file holds the factors only (a LoRA of rank 2 on q/k/v of both towers of ViT-B/16 is about
    1 MB, not the model's 600 MB); its header's ``"robustft.peft"`` entry records the kind, rank,
    :math:`\\alpha`, scaling, q/k/v blocks, dropout, adapter dropping and the weight names, so
    :func:`load` rebuilds the :class:`Spec` and any safetensors reader can inspect it. Written to a
    temporary file in the same folder and renamed into place (a crash never leaves half a file).

    Args:
        path: the file to write (conventionally ``*.safetensors``).
        spec: the factors' :class:`Spec`.
        factors: the factor tree (full tensors; any device, saved contiguous on the CPU).

    Returns:
        The path written.

    Raises:
        TypeError: a bad spec or tree.
        ValueError: keys that are not factors of ``spec``.
        OSError: the file cannot be written.

    Example:
        >>> import tempfile, pathlib
        >>> spec = lora(rank=1, alpha=2, targets="w")
        >>> f = peft.init(spec, {"w": torch.zeros(2, 2)})
        >>> p = save(pathlib.Path(tempfile.mkdtemp()) / "f.safetensors", spec, f)
        >>> load(p)[0] == spec.__class__(**{**spec.__dict__, "targets": ("w",)})
        True
    """
    from safetensors.torch import save_file

    fn = "save"
    if not isinstance(spec, Spec):
        raise TypeError(f"{fn}: spec must be a robustft.peft.Spec, got {describe(spec)}")
    tree = check_tensor_tree(fn, "factors", factors)
    targets_of(fn, spec, tree)
    meta = header(spec, tree)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tree.items()}
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except Exception as err:  # safetensors wraps I/O errors in its own type
        if isinstance(err, OSError):
            raise
        raise OSError(f"{fn}: cannot write {str(path)!r} ({err})") from err
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> tuple[Spec, dict[str, Tensor]]:
    """Read a factor file written by :func:`save`: ``(spec, factors)``.

    The returned spec's ``targets`` is the tuple of weight names the file's factors update (the
    pattern that selected them is not stored), so ``init`` on the same model would select the same
    weights.

    Args:
        path: the file.
        device: where to put the tensors.

    Returns:
        ``(spec, factors)``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a safetensors file, or has no robustft factor metadata, or
            its tensors do not match it.

    Example:
        >>> import tempfile, pathlib
        >>> spec = adapter(targets="w")
        >>> p = save(pathlib.Path(tempfile.mkdtemp()) / "a.safetensors", spec,
        ...          {"w_adapter": torch.zeros(2, 2)})
        >>> loaded, factors = load(p)
        >>> loaded.kind, loaded.targets, list(factors)
        ('adapter', ('w',), ['w_adapter'])
    """
    from safetensors import safe_open

    fn = "load"
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{fn}: path must be an existing factor file, got {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            meta = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise ValueError(
            f"{fn}: {str(path)!r} is not a readable safetensors file ({err})"
        ) from None
    if _KEY not in meta:
        raise ValueError(
            f"{fn}: {str(path)!r} has no {_KEY!r} metadata: it is not a factor file written by "
            "robustft.peft.save (a folded model's weights load with load_state_dict instead)"
        )
    try:
        m = json.loads(meta[_KEY])
        spec = Spec(
            kind=m["kind"],
            rank=m["rank"],
            alpha=float(m["alpha"]),
            scaling=m["scaling"],
            targets=tuple(m["targets"]),
            qkv=tuple(m["qkv"]) if m["qkv"] is not None else None,
            dropout=float(m["dropout"]),
            drop=float(m["drop"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{fn}: {str(path)!r} has damaged {_KEY!r} metadata ({err})") from None
    found = sorted(t.weight for t in targets_of(fn, spec, tensors))
    recorded = sorted(m["targets"])
    if found != recorded:
        raise ValueError(
            f"{fn}: {str(path)!r}'s metadata names the weights {recorded} but its tensors are "
            f"factors of {found}"
        )
    return spec, tensors
