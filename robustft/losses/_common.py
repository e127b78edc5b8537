"""Helpers shared by the losses: argument checks, normalisation, value checks that never sync.

Value checks (labels in range, positive confidences) read tensor *values*. They run only where that
is free: on CPU tensors in eager mode, outside ``torch.func`` transforms and ``torch.compile``
tracing. Everywhere else (accelerators, transforms, compiled graphs) the losses stay branch-free and
make a bad value visible as NaN instead of a silent number, so no hot path waits on the device.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from robustft._checks import (
    check_floating,
    check_number,
    check_same_size,
    describe,
    is_functorch_wrapped,
)


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype a loss computes in: the promoted input dtype, at least float32."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.promote_types(dtype, torch.float32)


def normalize(x: Tensor, dtype: torch.dtype) -> Tensor:
    """L2-normalise the last dimension in ``dtype`` (idempotent up to rounding)."""
    return F.normalize(x.to(dtype), dim=-1)


def check_features(fn: str, name: str, value: Any) -> Tensor:
    """A ``[batch, dim]`` floating tensor."""
    return check_floating(fn, name, value, ndim=2)


def check_pair(fn: str, name_a: str, a: Any, name_b: str, b: Any) -> None:
    """Two ``[batch, dim]`` floating tensors of the same shape."""
    check_features(fn, name_a, a)
    check_features(fn, name_b, b)
    check_same_size(fn, name_a, a, 0, name_b, b, 0)
    check_same_size(fn, name_a, a, 1, name_b, b, 1)


def check_scale(fn: str, name: str, value: Any) -> Any:
    """A positive real number or a 0-d floating tensor (not read, so it may be traced)."""
    return check_number(fn, name, value, low=0.0, low_inclusive=False, allow_tensor=True)


def values_readable(t: Tensor) -> bool:
    """Whether reading ``t``'s values costs no device sync and breaks no trace.

    True for plain CPU tensors in eager mode; False under ``torch.compile`` tracing, inside
    ``torch.func`` transforms (batched or gradient-tracking wrappers) and on accelerators.
    """
    if torch.compiler.is_compiling():
        return False
    if is_functorch_wrapped(t) or type(t) not in (Tensor, torch.nn.Parameter):
        return False
    return t.device.type == "cpu"


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


def check_positive_values(fn: str, name: str, value: Tensor) -> None:
    """Raise if some entry is not > 0 (or is NaN), only where values are readable."""
    if not values_readable(value) or value.numel() == 0:
        return
    value = value.detach()
    if not float(torch.amin(value)) > 0:  # amin propagates NaN
        first = float(value[~(value > 0)][0])
        raise ValueError(f"{fn}: {name} must be > 0 everywhere, got {first!r}")


def nan_where_invalid(per_sample: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Per-sample values, NaN where the label is outside ``[0, num_classes)`` (branch-free)."""
    return torch.where(safe_labels(labels, num_classes) == labels, per_sample, float("nan"))


def safe_labels(labels: Tensor, num_classes: int) -> Tensor:
    """Labels clamped into ``[0, num_classes)`` so gathers never index out of bounds."""
    return labels.clamp(0, num_classes - 1)


def check_group(fn: str, group: Any) -> None:
    """Check ``group`` is ``None`` or a ``torch.distributed.ProcessGroup``."""
    if group is None:
        return
    if not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(
            f"{fn}: group must be a torch.distributed ProcessGroup or None, got {describe(group)}"
        )
