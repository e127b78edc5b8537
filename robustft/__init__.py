"""robustft: composable, exact, fast building blocks for robust fine-tuning of CLIP-like models.

Use the submodules inside your own training loop::

    from robustft import losses, averaging, merging, projections, metrics, scores, tree

Where things live, by mechanism: :mod:`~robustft.losses` (objectives), :mod:`~robustft.averaging`
(averages *along* a run: BMA, EMA, uniform), :mod:`~robustft.merging` (combinations *across*
finished runs: WiSE-FT, soups), :mod:`~robustft.projections` (constraints *around* the pre-trained
weights: L2/MARS balls, TPGM), :mod:`~robustft.metrics` and :mod:`~robustft.scores` (evaluation),
:mod:`~robustft.tree` (parameter-tree arithmetic), :mod:`~robustft.peft` (LoRA and adapters as
factor trees), :mod:`~robustft.tta` (test-time adaptation: TPT, C-TPT, TDA), :mod:`~robustft.clip` (open_clip models) and
:mod:`~robustft.distributed` (collectives). Submodules are imported lazily, on first attribute
access, so ``import robustft`` stays cheap; type checkers see them through the imports below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from robustft._version import __version__

# Register the state classes (averagers, SPD, FTP) with torch.serialization, so a checkpoint
# holding one loads with torch.load's default weights_only=True in a process that only ran
# `import robustft`. Light: torch and the tree core, never open_clip.
from robustft.averaging import _states as _averaging_states  # noqa: F401
from robustft.projections import _ftp as _ftp_states  # noqa: F401
from robustft.projections import _spd as _spd_states  # noqa: F401

if TYPE_CHECKING:  # static view of the lazily imported submodules
    from robustft import (
        averaging,
        clip,
        distributed,
        losses,
        merging,
        metrics,
        peft,
        projections,
        scores,
        tree,
        tta,
        typing,
    )

__all__ = [
    "__version__",
    "averaging",
    "clip",
    "distributed",
    "losses",
    "merging",
    "metrics",
    "peft",
    "projections",
    "scores",
    "tree",
    "tta",
    "typing",
]

_SUBMODULES = frozenset(__all__) - {"__version__"}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = importlib.import_module(f"robustft.{name}")
        globals()[name] = module  # later lookups skip this hook
        return module
    raise AttributeError(f"module 'robustft' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES)
