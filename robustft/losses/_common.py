"""Helpers shared by the losses: domain checks, the empty-batch reduction, value checks that never sync.

Value checks (labels in range, positive confidences) read tensor *values*. They run only where that
is free: on CPU tensors in eager mode, outside ``torch.func`` transforms and ``torch.compile``
tracing. Everywhere else (accelerators, transforms, compiled graphs) the losses stay branch-free and
make a bad value visible as NaN instead of a silent number, so no hot path waits on the device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from robustft._checks import check_floating, check_same_size
from robustft._numerics import values_readable


def check_features(fn: str, name: str, value: Any, *, what: str = "feature") -> Tensor:
    """A ``[rows, dim]`` floating tensor with a non-empty feature axis."""
    check_floating(fn, name, value, ndim=2)
    if value.shape[1] == 0:
        raise ValueError(
            f"{fn}: {name} must have a non-empty {what} axis (dim 1), got shape "
            f"{tuple(value.shape)}"
        )
    return value


def check_rows(fn: str, name: str, value: Tensor, what: str) -> None:
    """Reject a ``[0, dim]`` matrix whose rows are the classes, contexts or texts of a loss."""
    if value.shape[0] == 0:
        raise ValueError(
            f"{fn}: {name} must hold at least one {what}, got shape {tuple(value.shape)}"
        )


def check_pair(fn: str, name_a: str, a: Any, name_b: str, b: Any) -> None:
    """Two ``[batch, dim]`` floating tensors of the same shape (``dim > 0``)."""
    check_features(fn, name_a, a)
    check_features(fn, name_b, b)
    check_same_size(fn, name_a, a, 0, name_b, b, 0)
    check_same_size(fn, name_a, a, 1, name_b, b, 1)


def check_label_values(fn: str, name: str, labels: Tensor, num_classes: int) -> bool:
    """Raise if some label is outside ``[0, num_classes)``, where values are readable.

    Returns whether the values were read (and are therefore known to be valid): callers may then
    skip the branch-free NaN marking of invalid labels.
    """
    if not values_readable(labels):
        return False
    if labels.numel() == 0:
        return True
    lo, hi = torch.aminmax(labels.detach())
    if int(lo) < 0 or int(hi) >= num_classes:
        first = int(lo) if int(lo) < 0 else int(hi)
        raise ValueError(
            f"{fn}: {name} must be in [0, {num_classes}) (unknown-class samples, labelled outside "
            f"that range, carry no supervised loss: filter them out first), got {first}"
        )
    return True


def positive_values_error(fn: str, name: str, value: Tensor) -> str | None:
    """The error message if some entry is not > 0 (or is NaN); ``None`` if fine or not readable."""
    if not values_readable(value) or value.numel() == 0:
        return None
    value = value.detach()
    if float(torch.amin(value)) > 0:  # amin propagates NaN
        return None
    first = float(value[~(value > 0)][0])
    return f"{fn}: {name} must be > 0 everywhere, got {first!r}"


def nan_where_invalid(per_sample: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Per-sample values, NaN where the label is outside ``[0, num_classes)`` (branch-free)."""
    return torch.where(safe_labels(labels, num_classes) == labels, per_sample, float("nan"))


def safe_labels(labels: Tensor, num_classes: int) -> Tensor:
    """Labels clamped into ``[0, num_classes)`` so gathers never index out of bounds."""
    return labels.clamp(0, num_classes - 1)
