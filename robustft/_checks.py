"""Argument validators shared by every public function.

Every validator raises ``ValueError`` or ``TypeError`` with a message in the house form::

    fn: arg must be <what is allowed>, got <value received>

so that a user reading the traceback knows which call, which argument, what was passed and what
would have been accepted. Validators only look at Python-level metadata (types, shapes, dtypes and
Python numbers); they never read tensor *values*, so they are safe in hot paths, under
``torch.func`` transforms and inside ``torch.compile`` graphs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "apply_reduction",
    "check_choice",
    "check_floating",
    "check_int",
    "check_labels",
    "check_ndim",
    "check_number",
    "check_per_tensor",
    "check_reduction",
    "check_same_size",
    "check_tensor",
    "describe",
    "is_functorch_wrapped",
]

_REDUCTIONS = ("mean", "sum", "none")

_functorch_probe: Callable[[Tensor], bool] = getattr(
    torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False
)


def is_functorch_wrapped(t: Tensor) -> bool:
    """Whether ``t`` is a ``torch.func`` wrapper (batched by ``vmap``, tracked by ``grad``).

    Such tensors take the per-tensor paths (no ``torch._foreach_*``, no value reads). A metadata
    probe: no tensor value is read. Not traceable by dynamo: check
    ``torch.compiler.is_compiling()`` first.
    """
    return bool(_functorch_probe(t))


def describe(value: Any) -> str:
    """Short human description of ``value`` for error messages (never prints tensor contents)."""
    if isinstance(value, Tensor):
        return f"Tensor(shape={tuple(value.shape)}, dtype={value.dtype}, device={value.device})"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, Mapping):
        return f"{type(value).__name__} with keys {sorted(map(str, value))!r}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of length {len(value)}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_number(
    fn: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    allow_tensor: bool = False,
) -> float:
    """Check a real number lies in an interval; return it as a Python float.

    ``allow_tensor`` admits 0-d floating tensors; their value is *not* read (no ``.item()``) and the
    interval is then not checked, so traced or compiled callers keep working.
    """
    if allow_tensor and isinstance(value, Tensor):
        if value.ndim != 0 or not value.is_floating_point():
            raise TypeError(
                f"{fn}: {name} must be a real number or a 0-d floating tensor, got {describe(value)}"
            )
        return value  # type: ignore[return-value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a real number, got {describe(value)}")
    x = float(value)
    if math.isnan(x):
        raise ValueError(f"{fn}: {name} must not be NaN, got {value!r}")
    lo_ok = low is None or (x >= low if low_inclusive else x > low)
    hi_ok = high is None or (x <= high if high_inclusive else x < high)
    if not (lo_ok and hi_ok):
        lb = "-inf" if low is None else repr(low)
        hb = "inf" if high is None else repr(high)
        interval = ("[" if low_inclusive and low is not None else "(") + f"{lb}, {hb}"
        interval += "]" if high_inclusive and high is not None else ")"
        raise ValueError(f"{fn}: {name} must be in {interval}, got {value!r}")
    return x


def check_int(fn: str, name: str, value: Any, *, low: int | None = None) -> int:
    """Check ``value`` is a Python int (not bool) with ``value >= low``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int, got {describe(value)}")
    if low is not None and value < low:
        raise ValueError(f"{fn}: {name} must be an int >= {low}, got {value!r}")
    return value


def check_choice(fn: str, name: str, value: Any, choices: Collection[Any]) -> Any:
    """Check ``value`` is one of ``choices``."""
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{fn}: {name} must be one of {allowed}, got {describe(value)}")
    return value


def check_reduction(fn: str, reduction: Any) -> str:
    """Check a ``reduction`` argument is ``"mean"``, ``"sum"`` or ``"none"``."""
    if not isinstance(reduction, str):
        raise TypeError(
            f"{fn}: reduction must be one of 'mean', 'sum', 'none', got {describe(reduction)}"
        )
    return str(check_choice(fn, "reduction", reduction, _REDUCTIONS))


def check_tensor(fn: str, name: str, value: Any) -> Tensor:
    """Check ``value`` is a ``torch.Tensor``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {describe(value)}")
    return value


def check_floating(
    fn: str, name: str, value: Any, *, ndim: int | Sequence[int] | None = None
) -> Tensor:
    """Check ``value`` is a floating-point tensor, optionally of a given rank."""
    check_tensor(fn, name, value)
    if not value.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got dtype {value.dtype}")
    if ndim is not None:
        check_ndim(fn, name, value, ndim)
    return value


def check_ndim(fn: str, name: str, value: Tensor, ndim: int | Sequence[int]) -> Tensor:
    """Check a tensor's rank is ``ndim`` (or one of several ranks)."""
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if value.ndim not in allowed:
        what = " or ".join(str(n) for n in allowed)
        raise ValueError(
            f"{fn}: {name} must have {what} dimension(s), got shape {tuple(value.shape)}"
        )
    return value


def check_same_size(
    fn: str, name_a: str, a: Tensor, dim_a: int, name_b: str, b: Tensor, dim_b: int
) -> None:
    """Check ``a.shape[dim_a] == b.shape[dim_b]`` (e.g. matching batch or embedding sizes)."""
    if a.shape[dim_a] != b.shape[dim_b]:
        raise ValueError(
            f"{fn}: {name_a}.shape[{dim_a}] must equal {name_b}.shape[{dim_b}], got "
            f"{name_a} of shape {tuple(a.shape)} and {name_b} of shape {tuple(b.shape)}"
        )


def check_labels(fn: str, name: str, labels: Any, *, batch: int | None = None) -> Tensor:
    """Check ``labels`` is a 1-d integer tensor (optionally of length ``batch``).

    Values are not read here (no host sync); range checks that need values belong in eager-only
    paths (metrics), never in losses.
    """
    check_tensor(fn, name, labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{fn}: {name} must be an integer tensor, got dtype {labels.dtype}")
    check_ndim(fn, name, labels, 1)
    if batch is not None and labels.shape[0] != batch:
        raise ValueError(
            f"{fn}: {name} must have length {batch} (the batch size), got shape {tuple(labels.shape)}"
        )
    return labels


def check_per_tensor(fn: str, name: str, value: Any, keys: Collection[str]) -> None:
    """Check a per-tensor hyper-parameter: a scalar, or a mapping whose keys are exactly ``keys``."""
    if isinstance(value, Mapping):
        missing = sorted(set(keys) - set(value))
        unexpected = sorted(set(value) - set(keys))
        if missing or unexpected:
            raise ValueError(
                f"{fn}: {name} given per tensor must have the same keys as the tree; "
                f"missing keys {missing}, unexpected keys {unexpected}"
            )


def apply_reduction(fn: str, per_sample: Tensor, reduction: str) -> Tensor:
    """Reduce a per-sample loss ``[B]``: ``"mean"`` → 0-d mean, ``"sum"`` → 0-d sum, ``"none"`` → ``[B]``.

    The one place where every loss applies its ``reduction`` argument (SPEC §0).
    """
    check_reduction(fn, reduction)
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample
