"""Weight averages along a fine-tuning run and across fine-tuned models.

Running averages of the trajectory -- CLIPood's Beta moving average (:func:`bma`), the EMA
(:func:`ema`) and the uniform mean (:func:`uniform`, SWA) -- are ``(init, update, update_)``
factories in optax's style: the state is a NamedTuple of 0-d CPU counters, one accumulator tree,
the settings of the averager that made it and a ``live`` cell (a state refuses an averager with
other settings, and the object an ``update_`` consumed is refused as stale); ``update`` is pure
and ``update_`` folds the new parameters into the state's own buffers in place (one
``torch._foreach_lerp_`` per device/dtype group, no parameter-sized temporary, validation once
per tree structure, one compilation per run under ``torch.compile``). All three
share one stateless kernel, a lerp with a time-varying weight. Post-hoc combinations of finished
runs (WiSE-FT, model soups) live in :mod:`robustft.merging`.

Parameters are trees, ``dict(model.named_parameters())``; averages work on sharded (FSDP2
``DTensor``) trees as on plain ones, without copying the module.
"""

from typing import TYPE_CHECKING

from robustft._checks import moved_names
from robustft.averaging._averagers import (
    Averager,
    AverageState,
    BmaState,
    EmaState,
    UniformState,
    bma,
    ema,
    uniform,
)
from robustft.averaging._weights import beta_weights

__all__ = [
    "AverageState",
    "Averager",
    "BmaState",
    "EmaState",
    "UniformState",
    "beta_weights",
    "bma",
    "ema",
    "uniform",
]

# Public names that moved or were removed, and where they went (CHANGELOG, docs/migration.md)
_MOVED = {
    "uniform_soup": "moved to robustft.merging.uniform_soup (same behaviour)",
    "greedy_soup": "moved to robustft.merging.greedy_soup (same behaviour)",
}

if not TYPE_CHECKING:  # runtime only: type checkers keep flagging unknown names
    __getattr__ = moved_names(__name__, _MOVED)
