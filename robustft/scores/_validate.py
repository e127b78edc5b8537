"""Argument checks shared by the OOD scores (metadata only: safe under torch.func and compile)."""

from __future__ import annotations

import torch
from torch import Tensor

from robustft._checks import check_floating, check_number
from robustft.tree import accumulation_dtype
from robustft.typing import Scalar

__all__ = ["check_class_axis", "check_temperature", "score_dtype"]


def check_class_axis(fn: str, name: str, x: Tensor) -> Tensor:
    """Check ``x`` is a floating tensor ``[..., classes]`` with at least one class."""
    check_floating(fn, name, x)
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(
            f"{fn}: {name} must have shape [..., classes] with classes >= 1, got shape "
            f"{tuple(x.shape)}"
        )
    return x


def check_temperature(fn: str, temperature: Scalar) -> Scalar:
    """A temperature is a Python number > 0, or a 0-d floating tensor (value not read)."""
    return check_number(
        fn, "temperature", temperature, low=0.0, low_inclusive=False, allow_tensor=True
    )


def score_dtype(x: Tensor) -> torch.dtype:
    """Scores are computed and returned in at least float32 (bf16 scores would tie massively)."""
    return accumulation_dtype(x.dtype)
