"""Type aliases used across robustft's public signatures.

``Params``
    A parameter tree: a mapping from dotted parameter names to tensors, exactly what
    ``dict(model.named_parameters())`` returns and :func:`torch.func.functional_call` accepts.
``Scalar``
    A Python real number or a 0-d floating tensor (tensors are never read on the host, so a
    traced or scheduled value works too).
``PerTensor[T]``
    A hyper-parameter given either once for every tensor (a ``T``) or per tensor, as a mapping with
    exactly the tree's keys (optax's convention for projections).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar, Union

from torch import Tensor

__all__ = ["Params", "PerTensor", "Scalar"]

T = TypeVar("T")

Params = Mapping[str, Tensor]
"""A parameter tree: ``Mapping[str, Tensor]`` keyed by dotted parameter names."""

Scalar = Union[float, int, Tensor]
"""A real number or a 0-d floating tensor."""

PerTensor = Union[T, Mapping[str, T]]
"""A value for every tensor (``T``) or one per tensor (``Mapping[str, T]`` with the tree's keys)."""
