"""robustft: composable, exact, fast building blocks for robust fine-tuning of CLIP-like models.

Use the submodules inside your own training loop::

    from robustft import losses, averaging, projections, metrics, scores, tree

``robustft.clip`` (open_clip integration) is imported lazily, only when you touch it.
"""

from __future__ import annotations

import importlib
from typing import Any

from robustft._version import __version__

__all__ = ["__version__"]

_SUBMODULES = {
    "averaging",
    "clip",
    "distributed",
    "losses",
    "metrics",
    "projections",
    "scores",
    "tree",
    "typing",
}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"robustft.{name}")
    raise AttributeError(f"module 'robustft' has no attribute {name!r}")
