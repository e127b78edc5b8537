"""Argument checks shared by the OOD scores (metadata only: safe under torch.func and compile)."""

from __future__ import annotations

from torch import Tensor

from robustft._checks import check_floating, check_scalar
from robustft.typing import Scalar

__all__ = ["check_class_axis", "check_temperature"]


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
    """A finite real number > 0 (Python or NumPy), or a 0-d floating tensor (value not read)."""
    return check_scalar(fn, "temperature", temperature, positive=True)
