r"""The states of the running averages: counters, one accumulator tree, the settings, a live cell.

A state is a NamedTuple of tensors, a tree and a ``settings`` dict of Python numbers, strings and
a ``torch.dtype`` -- all things ``torch.load(weights_only=True)`` accepts once the three state
classes are allowed (``torch.serialization.add_safe_globals``, done when this module is imported,
which ``import robustft`` does).

Counters are 0-d CPU tensors rather than Python numbers so that ``torch.compile`` sees them as graph
inputs (a Python number that changes every step makes dynamo recompile every step); the eager path
reads them on the host (CPU tensors: no device synchronisation).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple, cast

import torch
from torch import Tensor

from robustft._checks import describe

__all__ = [
    "AverageState",
    "BmaState",
    "EmaState",
    "UniformState",
    "check_state",
    "counter",
    "describe_settings",
    "live_cell",
]

Settings = dict[str, object]


class BmaState(NamedTuple):
    r"""State of :func:`bma`: the Beta-weighted mean of the iterates folded in so far.

    Attributes:
        step: optimiser steps folded in (0 right after ``init``), a 0-d int64 CPU tensor.
        log_weight_sum: :math:`\log S_{step}`, :math:`S_{step} = \sum_{t \le step} \alpha_t`, a
            0-d float64 CPU tensor (kept as a log so that weights below float64's range, at
            :math:`\beta` in the hundreds, still count exactly); :attr:`weight_sum` is its exp.
        average: the average, a tree in the accumulator dtype.
        settings: the settings of the :func:`bma` that made the state (``kind``,
            ``total_steps``, ``beta``, ``accumulator_dtype``, ``device``); an update by an
            averager with other settings raises.
        live: 0-d bool CPU tensor, ``True`` while this object owns its accumulators; ``update_``
            sets it ``False`` on the state it consumed (whose tensors it advanced in place), so
            the stale object is refused instead of silently mixing two steps.

    >>> from robustft import averaging
    >>> state = averaging.bma(4).init({"w": torch.zeros(2)})
    >>> int(state.step), state.settings["total_steps"], bool(state.live)
    (0, 4, True)
    """

    step: Tensor
    log_weight_sum: Tensor
    average: dict[str, Tensor]
    settings: dict[str, object]
    live: Tensor

    @property
    def weight_sum(self) -> Tensor:
        r""":math:`S_{step} = \sum_{t \le step} \alpha_t`, a 0-d float64 tensor."""
        return self.log_weight_sum.exp()


class EmaState(NamedTuple):
    """State of :func:`ema`.

    Attributes:
        step: updates applied since ``init``, a 0-d int64 CPU tensor.
        average: the exponential moving average, a tree in the accumulator dtype.
        settings: the settings of the :func:`ema` that made the state (``kind``, ``decay``,
            ``accumulator_dtype``, ``device``).
        live: ``True`` while this object owns its accumulators (see :class:`BmaState`).

    >>> from robustft import averaging
    >>> state = averaging.ema(0.9).init({"w": torch.zeros(2)})
    >>> state.settings["decay"], bool(state.live)
    (0.9, True)
    """

    step: Tensor
    average: dict[str, Tensor]
    settings: dict[str, object]
    live: Tensor


class UniformState(NamedTuple):
    """State of :func:`uniform`.

    Attributes:
        step: updates applied since ``init``, a 0-d int64 CPU tensor; the mean is over
            ``step + 1`` trees.
        average: the running mean, a tree in the accumulator dtype.
        settings: the settings of the :func:`uniform` that made the state (``kind``,
            ``accumulator_dtype``, ``device``).
        live: ``True`` while this object owns its accumulators (see :class:`BmaState`).

    >>> from robustft import averaging
    >>> state = averaging.uniform().init({"w": torch.zeros(2)})
    >>> state.settings["kind"], int(state.step)
    ('uniform', 0)
    """

    step: Tensor
    average: dict[str, Tensor]
    settings: dict[str, object]
    live: Tensor


AverageState = BmaState | EmaState | UniformState
"""Any state returned by an :class:`Averager`."""

# ``torch.load`` defaults to ``weights_only=True``: allow the states so a checkpoint reloads as is.
torch.serialization.add_safe_globals([BmaState, EmaState, UniformState])

_CPU = torch.device("cpu")


def counter(value: int | float, dtype: torch.dtype) -> Tensor:
    """A 0-d CPU counter (CPU even under ``torch.set_default_device``)."""
    return torch.tensor(value, dtype=dtype, device=_CPU)


def live_cell() -> Tensor:
    """A fresh ``live`` cell: a 0-d bool CPU tensor holding ``True``."""
    return torch.ones((), dtype=torch.bool, device=_CPU)


def describe_settings(settings: object) -> str:
    """``bma(total_steps=10, beta=0.5, ...)`` for a settings dict (or a description of junk)."""
    if not isinstance(settings, Mapping) or not isinstance(settings.get("kind"), str):
        return f"unknown settings {describe(settings)}"
    args = ", ".join(f"{k}={v!r}" for k, v in settings.items() if k != "kind")
    return f"{settings['kind']}({args})"


def _malformed(state: tuple[object, ...], fields: tuple[str, ...]) -> list[str]:
    """Fields of a state that are not what the averagers make (cheap metadata checks)."""
    want = {"step": torch.int64, "log_weight_sum": torch.float64, "live": torch.bool}
    bad = []
    for name, value in zip(fields, state):
        if name in want:
            if not (isinstance(value, Tensor) and value.ndim == 0 and value.dtype == want[name]):
                bad.append(name)
        elif name == "average" and not isinstance(value, Mapping):
            bad.append(name)
    return bad


def check_state(fn: str, state: object, cls: type, settings: Settings) -> None:
    """``state`` is a ``cls`` made by an averager with ``settings``, well formed and not stale.

    The live cell is read only in eager mode (a host read of a CPU tensor); under
    ``torch.compile`` the stale-state check is skipped (it would need the cell's value).
    """
    kind = settings["kind"]
    if not isinstance(state, cls):
        made_by = ""
        if isinstance(state, (BmaState, EmaState, UniformState)):
            made_by = f" made by {describe_settings(state.settings)}"
        raise TypeError(
            f"{fn}: state must be the {cls.__name__} returned by {kind}'s init or a previous "
            f"update, got {type(state).__name__}{made_by}; this averager is "
            f"{describe_settings(settings)}"
        )
    state = cast(AverageState, state)
    if state.settings != settings:
        raise ValueError(
            f"{fn}: state was made by {describe_settings(state.settings)}, but this averager is "
            f"{describe_settings(settings)}; resume with the settings the state was made with"
        )
    bad = _malformed(state, state._fields)
    if bad:
        got = ", ".join(f"{k}={describe(getattr(state, k))}" for k in bad)
        raise TypeError(
            f"{fn}: state must be the {cls.__name__} returned by init or a previous update, got "
            f"malformed fields {bad} ({got})"
        )
    if not torch.compiler.is_compiling() and not bool(state.live):
        raise ValueError(
            f"{fn}: state is stale: update_ advanced its accumulators in place and returned a new "
            "state; use the state update_ returned (state = avg.update_(state, params)), or the "
            "pure update to keep the old one"
        )
