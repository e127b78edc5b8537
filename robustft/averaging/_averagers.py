r"""Running weight averages as ``(init, update, update_)`` factories: BMA, EMA, uniform (SWA)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from robustft._checks import check_number, describe
from robustft.averaging._kernel import (
    check_accumulator_dtype,
    check_params,
    fold,
    fold_,
    make_average,
    resolve_device,
)
from robustft.averaging._weights import _beta_weight, _check_beta_args

__all__ = [
    "AverageState",
    "Averager",
    "BmaState",
    "EmaState",
    "UniformState",
    "bma",
    "ema",
    "uniform",
]


class BmaState(NamedTuple):
    """State of :func:`bma`: the Beta-weighted mean of the iterates folded in so far.

    Attributes:
        step: optimiser steps folded in (0 right after ``init``), a Python ``int``.
        weight_sum: :math:`S_{step} = \\sum_{t \\le step} \\alpha_t`, a Python ``float``.
        average: the average, a tree in the accumulator dtype.
    """

    step: int
    weight_sum: float
    average: dict[str, Tensor]


class EmaState(NamedTuple):
    """State of :func:`ema`.

    Attributes:
        step: updates applied since ``init``, a Python ``int``.
        average: the exponential moving average, a tree in the accumulator dtype.
    """

    step: int
    average: dict[str, Tensor]


class UniformState(NamedTuple):
    """State of :func:`uniform`.

    Attributes:
        step: updates applied since ``init``; the mean is over ``step + 1`` trees.
        average: the running mean, a tree in the accumulator dtype.
    """

    step: int
    average: dict[str, Tensor]


AverageState = BmaState | EmaState | UniformState
"""Any state returned by an :class:`Averager`."""

# ``torch.load`` defaults to ``weights_only=True``: allow the states so a checkpoint reloads as is.
if hasattr(torch.serialization, "add_safe_globals"):  # torch >= 2.4
    torch.serialization.add_safe_globals([BmaState, EmaState, UniformState])


class Averager(NamedTuple):
    """A running weight average: three functions and no hidden state (optax's pattern).

    ``state = averager.init(params)`` copies ``params`` into a fresh accumulator tree;
    ``state = averager.update(state, params)`` (pure) returns a new state with fresh tensors and
    leaves the old one intact; ``state = averager.update_(state, params)`` (in place, the fast path)
    writes into the accumulator tensors of ``state`` itself with ``torch._foreach_lerp_`` -- no
    parameter-sized temporary -- and returns the state with its counters advanced (the old state
    object shares the advanced tensors: do not reuse it). Both read ``params`` only, never write
    them, and give bit-identical results. Call ``update``/``update_`` after each optimiser step.

    The state is a NamedTuple of Python numbers and one tree, so ``torch.save(state, f)`` and
    ``torch.load(f)`` resume a run bit-identically (the state classes are registered with
    ``torch.serialization.add_safe_globals`` for the default ``weights_only=True`` loading).

    Attributes:
        init: ``(params) -> state``.
        update: ``(state, params) -> state``, pure.
        update_: ``(state, params) -> state``, updates ``state.average`` in place.
    """

    init: Callable[[Mapping[str, Tensor]], Any]
    update: Callable[[Any, Mapping[str, Tensor]], Any]
    update_: Callable[[Any, Mapping[str, Tensor]], Any]


def _check_state(fn: str, state: object, cls: type) -> None:
    if not isinstance(state, cls):
        raise TypeError(
            f"{fn}: state must be the {cls.__name__} returned by init or a previous update, "
            f"got {describe(state)}"
        )


def _common(fn: str, accumulator_dtype: object, device: object) -> tuple[Any, Any]:
    return check_accumulator_dtype(fn, accumulator_dtype), resolve_device(fn, device)


def bma(
    total_steps: int,
    *,
    beta: float = 0.5,
    accumulator_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Averager:
    r"""CLIPood's Beta moving average (BMA) of the fine-tuning trajectory.

    .. math::

        \bar\theta_T = \frac{\sum_{t=0}^{T} \alpha_t\,\theta_t}{\sum_{t=0}^{T} \alpha_t},
        \qquad \alpha_t = \mathrm{BetaPDF}_{\beta,\beta}\!\left(\tfrac{t+1/2}{T+1}\right),

    computed as a running lerp: ``init`` sets :math:`\bar\theta = \theta_0` (the pre-trained
    parameters, weight :math:`S_0 = \alpha_0`), and the update after optimiser step :math:`t`
    does :math:`S_t = S_{t-1} + \alpha_t`,
    :math:`\bar\theta \leftarrow \bar\theta + (\alpha_t / S_t)(\theta_t - \bar\theta)`.
    The weights (:func:`beta_weights`) and counters are Python numbers: no device sync.

    Accumulators are kept in ``promote_types(param dtype, accumulator_dtype)`` -- float32 for
    bf16/fp16 parameters (the official code averages in fp16 and drifts). Only floating-point
    tensors are accepted: integer/bool buffers raise ``TypeError`` (average parameters; copy
    buffers yourself).

    Args:
        total_steps: :math:`T`, the number of ``update`` calls the run will make (optimiser
            steps, not epochs), at least 1.
        beta: :math:`\beta > 0` (0.5 for domain shift, 0.1 for open-class in CLIPood).
        accumulator_dtype: the minimum floating dtype of the average.
        device: where the average lives (e.g. ``"cpu"`` while training on GPU); ``None`` keeps
            each tensor's device.

    Returns:
        An :class:`Averager` whose states are :class:`BmaState`. ``update``/``update_`` take a
        tree with the keys and shapes of ``init``'s (any floating dtype, any device).

    Raises:
        TypeError: bad argument types; at ``init``/``update`` a non-tree, a non-floating tensor or
            a state of another averager.
        ValueError: ``total_steps < 1``, ``beta <= 0``, a bad device, mismatched keys or shapes
            at ``update``, or an ``update`` past ``total_steps``.

    >>> avg = bma(2, beta=1.0)  # beta = 1: equal weights, a plain mean
    >>> state = avg.init({"w": torch.tensor([0.0])})
    >>> state = avg.update_(state, {"w": torch.tensor([3.0])})
    >>> state = avg.update_(state, {"w": torch.tensor([6.0])})
    >>> state.step, state.weight_sum, state.average
    (2, 3.0, {'w': tensor([3.])})

    References:
        Shu et al., "CLIPood: Generalizing CLIP to Out-of-Distributions", ICML 2023, Sec. 3.3.
        Code: https://github.com/thuml/CLIPood
    """
    T, b = _check_beta_args("bma", total_steps, beta)
    dtype, dev = _common("bma", accumulator_dtype, device)

    def init(params: Mapping[str, Tensor]) -> BmaState:
        check_params("bma.init", params)
        return BmaState(0, _beta_weight(0, T, b), make_average(params, dtype, dev))

    def advance(fn: str, state: BmaState) -> tuple[float, int, float]:
        _check_state(fn, state, BmaState)
        t = state.step + 1
        if t > T:
            raise ValueError(
                f"{fn}: cannot fold in a step past total_steps={T}, got state.step="
                f"{state.step}; create bma(total_steps=...) with the run's number of optimiser steps"
            )
        alpha = _beta_weight(t, T, b)  # host arithmetic on Python numbers: no device sync
        weight_sum = state.weight_sum + alpha
        return alpha / weight_sum, t, weight_sum

    def update(state: BmaState, params: Mapping[str, Tensor]) -> BmaState:
        w, t, s = advance("bma.update", state)
        return BmaState(t, s, fold(state.average, params, w, fn="bma.update"))

    def update_(state: BmaState, params: Mapping[str, Tensor]) -> BmaState:
        w, t, s = advance("bma.update_", state)
        fold_(state.average, params, w, fn="bma.update_")
        return BmaState(t, s, state.average)

    return Averager(init, update, update_)


def ema(
    decay: float,
    *,
    accumulator_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Averager:
    r"""Exponential moving average of the iterates, started from ``init``'s parameters.

    .. math::

        \bar\theta_0 = \theta_0, \qquad
        \bar\theta_t = d\,\bar\theta_{t-1} + (1 - d)\,\theta_t
        \quad\Longrightarrow\quad
        \bar\theta_T = d^T\theta_0 + \sum_{t=1}^{T} (1-d)\,d^{T-t}\,\theta_t,

    so the parameters given to ``init`` (typically the pre-trained model) keep weight :math:`d^T`.
    ``decay = 0`` returns the last iterate, ``decay = 1`` keeps the start. The same lerp kernel as
    :func:`bma` with the constant weight :math:`1 - d`; accumulators, buffers and ``device`` as
    there.

    Args:
        decay: :math:`d \in [0, 1]`.
        accumulator_dtype: the minimum floating dtype of the average (float32: a bf16 EMA with
            :math:`d` close to 1 stalls, its increments rounding to zero).
        device: where the average lives; ``None`` keeps each tensor's device.

    Returns:
        An :class:`Averager` whose states are :class:`EmaState`.

    Raises:
        TypeError: bad argument types, non-trees, non-floating tensors, a foreign state.
        ValueError: ``decay`` outside ``[0, 1]``, a bad device, mismatched keys or shapes.

    >>> avg = ema(0.5)
    >>> state = avg.init({"w": torch.tensor([0.0])})
    >>> for x in (2.0, 4.0):
    ...     state = avg.update_(state, {"w": torch.tensor([x])})
    >>> state.average  # 0.5 * (0.5 * 0 + 0.5 * 2) + 0.5 * 4
    {'w': tensor([2.5000])}

    References:
        The EMA baseline of CLIPood (Shu et al., ICML 2023, https://github.com/thuml/CLIPood);
        ``torch.optim.swa_utils.get_ema_multi_avg_fn`` computes the same update.
    """
    d = check_number("ema", "decay", decay, low=0.0, high=1.0)
    dtype, dev = _common("ema", accumulator_dtype, device)
    w = 1.0 - d

    def init(params: Mapping[str, Tensor]) -> EmaState:
        check_params("ema.init", params)
        return EmaState(0, make_average(params, dtype, dev))

    def update(state: EmaState, params: Mapping[str, Tensor]) -> EmaState:
        _check_state("ema.update", state, EmaState)
        return EmaState(state.step + 1, fold(state.average, params, w, fn="ema.update"))

    def update_(state: EmaState, params: Mapping[str, Tensor]) -> EmaState:
        _check_state("ema.update_", state, EmaState)
        fold_(state.average, params, w, fn="ema.update_")
        return EmaState(state.step + 1, state.average)

    return Averager(init, update, update_)


def uniform(
    *,
    accumulator_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Averager:
    r"""Uniform running mean of every tree seen (SWA), ``init``'s parameters included as the first.

    .. math::

        \bar\theta_T = \frac{1}{T + 1}\sum_{t=0}^{T}\theta_t, \qquad
        \bar\theta_t = \bar\theta_{t-1} + \tfrac{1}{t + 1}\,(\theta_t - \bar\theta_{t-1}),

    the same lerp kernel as :func:`bma` with the weight :math:`1/(t+1)`. To average only the
    fine-tuned iterates (SWA's usual form), call ``init`` with the first iterate instead.

    Args:
        accumulator_dtype: the minimum floating dtype of the average.
        device: where the average lives; ``None`` keeps each tensor's device.

    Returns:
        An :class:`Averager` whose states are :class:`UniformState`.

    Raises:
        TypeError: bad argument types, non-trees, non-floating tensors, a foreign state.
        ValueError: a bad device, mismatched keys or shapes.

    >>> avg = uniform()
    >>> state = avg.init({"w": torch.tensor([1.0])})
    >>> state = avg.update(state, {"w": torch.tensor([5.0])})
    >>> state.average
    {'w': tensor([3.])}

    References:
        Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization",
        UAI 2018 (SWA; ``torch.optim.swa_utils``). The uniform baseline of CLIPood,
        https://github.com/thuml/CLIPood
    """
    dtype, dev = _common("uniform", accumulator_dtype, device)

    def init(params: Mapping[str, Tensor]) -> UniformState:
        check_params("uniform.init", params)
        return UniformState(0, make_average(params, dtype, dev))

    def update(state: UniformState, params: Mapping[str, Tensor]) -> UniformState:
        _check_state("uniform.update", state, UniformState)
        w = 1.0 / (state.step + 2)
        return UniformState(state.step + 1, fold(state.average, params, w, fn="uniform.update"))

    def update_(state: UniformState, params: Mapping[str, Tensor]) -> UniformState:
        _check_state("uniform.update_", state, UniformState)
        fold_(state.average, params, 1.0 / (state.step + 2), fn="uniform.update_")
        return UniformState(state.step + 1, state.average)

    return Averager(init, update, update_)
