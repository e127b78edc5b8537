"""Type aliases used across robustft's public signatures.

``Params``
    A parameter tree: a mapping from dotted parameter names to tensors, exactly what
    ``dict(model.named_parameters())`` returns and :func:`torch.func.functional_call` accepts.
``Scalar``
    A finite real number (Python or NumPy) or a 0-d floating tensor (tensors are never read on the
    host, so a traced or scheduled value works too).
``PerTensor[T]``
    A hyper-parameter given either once for every tensor (a ``T``) or per tensor, as a mapping with
    exactly the tree's keys (optax's convention for projections).
``Reduction``
    ``"mean"``, ``"sum"`` or ``"none"`` (per sample), the ``reduction=`` of every loss.
``Device``
    ``None``, a ``torch.device`` or a string naming one (``"cpu"``, ``"cuda:0"``).
``Group``
    A ``torch.distributed`` process group, or ``None`` (the default group when one is initialised,
    else a single process).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal, Optional, TypeVar, Union

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["Device", "Group", "Params", "PerTensor", "Reduction", "Scalar"]

T = TypeVar("T")

Params = Mapping[str, Tensor]
"""A parameter tree: ``Mapping[str, Tensor]`` keyed by dotted parameter names."""

Scalar = Union[float, int, Tensor]
"""A finite real number or a 0-d floating tensor."""

PerTensor = Union[T, Mapping[str, T]]
"""A value for every tensor (``T``) or one per tensor (``Mapping[str, T]`` with the tree's keys)."""

Reduction = Literal["mean", "sum", "none"]
"""How a loss reduces its per-sample values."""

Device = Union[torch.device, str, None]
"""Where tensors live: ``None`` (keep each tensor's device), a ``torch.device`` or its name."""

Group = Optional["ProcessGroup"]
"""A ``torch.distributed`` process group or ``None``."""
