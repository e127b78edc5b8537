r"""Running weight averages as ``(init, update, update_)`` factories: BMA, EMA, uniform (SWA)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from robustft._checks import check_device, check_dtype, check_number
from robustft.averaging._kernel import (
    PlanCache,
    check_params,
    fold,
    fold_traced,
    fold_traced_,
    make_average,
)
from robustft.averaging._states import (
    AverageState,
    BmaState,
    EmaState,
    UniformState,
    check_state,
    counter,
    live_cell,
)
from robustft.averaging._weights import (
    _check_beta_args,
    fold_weight,
    fold_weight_tensor,
    log_add,
    log_beta_weight,
    log_beta_weight_tensor,
)
from robustft.typing import Device, Params

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

_compiling = torch.compiler.is_compiling


class Averager(NamedTuple):
    """A running weight average: three functions and no hidden state (optax's pattern).

    ``state = averager.init(params)`` copies ``params`` into a fresh accumulator tree;
    ``state = averager.update(state, params)`` (pure) returns a new state with fresh tensors and
    leaves the old one intact; ``state = averager.update_(state, params)`` (in place, the fast path)
    writes into the accumulator tensors of ``state`` itself with ``torch._foreach_lerp_`` -- no
    parameter-sized temporary -- and returns a new state object owning them. Both read ``params``
    only, never write them, and give bit-identical results, also when ``params`` alias the
    state's own accumulators (such parameters are copied first). Call ``update``/``update_`` after
    each optimiser step.

    **What a state knows.** Each state records the ``settings`` of the averager that made it
    (kind, ``total_steps``, ``beta``, ``decay``, ``accumulator_dtype``, ``device``: what the factory
    took). Updating it with an averager of another kind raises ``TypeError``, with one of the same
    kind but other settings (a resumed run with another ``total_steps``) ``ValueError``; both name
    the two settings.

    **Stale states.** ``update_`` advances the accumulators in place, so the state object passed
    to it no longer matches its tensors: it is marked stale (its ``live`` cell is set to
    ``False``) and any later ``update``/``update_`` of it raises ``ValueError``. Keep using the
    state ``update_`` returns; use ``update`` to keep the old one. (Checked in eager mode; code
    compiled with ``torch.compile`` skips the check, which would need the cell's value.)

    **Resuming.** A state is a NamedTuple of 0-d CPU tensors, one tree and a dict of Python
    numbers, strings and a ``torch.dtype``: ``torch.save(state, f)`` and ``torch.load(f)`` (default
    ``weights_only=True``; ``import robustft`` registers the state classes) resume a run
    bit-identically.

    **Cost.** The in-place update validates ``params`` once per structure: a later call with the
    very same tensor objects under the same keys only compares identities before the kernel (a
    tensor whose ``.data`` was replaced by one of another shape is not re-checked). Eager weights
    are Python floats computed on the host from the CPU counters: no device synchronisation. Under
    ``torch.compile(fullgraph=True)`` the counters and the weight stay tensors, so the steps of a
    run compile once (an ``update`` past ``bma``'s ``total_steps`` then folds in nothing instead
    of raising).

    Attributes:
        init: ``(params) -> state``.
        update: ``(state, params) -> state``, pure.
        update_: ``(state, params) -> state``, updates ``state.average`` in place.

    >>> avg = ema(0.5)
    >>> state = avg.init({"w": torch.tensor([0.0])})
    >>> new = avg.update_(state, {"w": torch.tensor([2.0])})
    >>> new.average, bool(state.live), bool(new.live)  # the old object is stale now
    ({'w': tensor([1.])}, False, True)
    """

    init: Callable[[Params], AverageState]
    update: Callable[[AverageState, Params], AverageState]
    update_: Callable[[AverageState, Params], AverageState]


def _settings(
    fn: str, accumulator_dtype: object, device: object, **kw: object
) -> tuple[dict[str, object], torch.dtype, torch.device | None]:
    dtype = check_dtype(fn, "accumulator_dtype", accumulator_dtype)
    dev = check_device(fn, "device", device)
    settings: dict[str, object] = {"kind": fn, **kw}
    settings.update(accumulator_dtype=dtype, device=None if dev is None else str(dev))
    return settings, dtype, dev


def _done(state: AverageState) -> Tensor:
    """Mark ``state`` consumed by ``update_``; return the new owner's live cell."""
    state.live.fill_(False)
    return live_cell()


def bma(
    total_steps: int,
    *,
    beta: float = 0.5,
    accumulator_dtype: torch.dtype = torch.float32,
    device: Device = None,
) -> Averager:
    r"""CLIPood's Beta moving average (BMA) of the fine-tuning trajectory.

    .. math::

        \bar\theta_T = \frac{\sum_{t=0}^{T} \alpha_t\,\theta_t}{\sum_{t=0}^{T} \alpha_t},
        \qquad \alpha_t = \mathrm{BetaPDF}_{\beta,\beta}\!\left(\tfrac{t+1/2}{T+1}\right),

    computed as a running lerp: ``init`` sets :math:`\bar\theta = \theta_0` (the pre-trained
    parameters, weight :math:`S_0 = \alpha_0`), and the update after optimiser step :math:`t`
    does :math:`S_t = S_{t-1} + \alpha_t`,
    :math:`\bar\theta \leftarrow \bar\theta + (\alpha_t / S_t)(\theta_t - \bar\theta)`.
    The weights (:func:`beta_weights`) are handled through their logarithms
    (:math:`\log S_t = \mathrm{logaddexp}(\log S_{t-1}, \log\alpha_t)`), so a :math:`\beta` in the
    hundreds, whose first weights are below float64's range, still gives the exact weighted mean.
    Eager updates compute them on the host from the state's CPU counters: no device sync.

    Accumulators are kept in ``promote_types(param dtype, accumulator_dtype)`` -- float32 for
    bf16/fp16 parameters (the official code averages in fp16 and drifts). Only floating-point
    tensors are accepted: integer/bool buffers raise ``TypeError`` (average parameters; copy
    buffers yourself).

    The state (:class:`BmaState`) records ``total_steps``, ``beta``, ``accumulator_dtype`` and
    ``device``: a state updated by a ``bma`` with other settings raises, as does a stale state
    (the object an ``update_`` consumed); see :class:`Averager`.

    Args:
        total_steps: :math:`T`, the number of ``update`` calls the run will make (optimiser
            steps, not epochs), at least 1; a Python or NumPy integer.
        beta: :math:`\beta > 0`, finite (0.5 for domain shift, 0.1 for open-class in CLIPood);
            a Python or NumPy number.
        accumulator_dtype: the minimum floating dtype of the average.
        device: where the average lives (e.g. ``"cpu"`` while training on GPU); ``None`` keeps
            each tensor's device.

    Returns:
        An :class:`Averager` whose states are :class:`BmaState`. ``update``/``update_`` take a
        tree with the keys and shapes of ``init``'s (any floating dtype, any device).

    Raises:
        TypeError: bad argument types; at ``init``/``update`` a non-tree, a non-floating tensor,
            a state of another averager or a malformed state.
        ValueError: ``total_steps < 1``, ``beta`` not finite and ``> 0``, a bad device,
            mismatched keys or shapes at ``update``, a state made with other settings, a stale
            state, or an ``update`` past ``total_steps``.

    >>> avg = bma(2, beta=1.0)  # beta = 1: equal weights, a plain mean
    >>> state = avg.init({"w": torch.tensor([0.0])})
    >>> state = avg.update_(state, {"w": torch.tensor([3.0])})
    >>> state = avg.update_(state, {"w": torch.tensor([6.0])})
    >>> int(state.step), round(float(state.weight_sum), 12), state.average
    (2, 3.0, {'w': tensor([3.])})

    References:
        Shu et al., "CLIPood: Generalizing CLIP to Out-of-Distributions", ICML 2023, Sec. 3.3.
        Code: https://github.com/thuml/CLIPood
    """
    T, b = _check_beta_args("bma", total_steps, beta)
    settings, dtype, dev = _settings("bma", accumulator_dtype, device, total_steps=T, beta=b)
    log_alpha0 = log_beta_weight(0, T, b)
    plans = PlanCache()

    def init(params: Params) -> BmaState:
        params = check_params("bma.init", params)
        return BmaState(
            counter(0, torch.int64),
            counter(log_alpha0, torch.float64),
            make_average(params, dtype, dev),
            dict(settings),
            live_cell(),
        )

    def advance(fn: str, state: BmaState) -> tuple[float, int, float]:
        """Eager: the lerp weight and the new counters, in host arithmetic."""
        check_state(fn, state, BmaState, settings)
        t = int(state.step) + 1
        if t > T:
            raise ValueError(
                f"{fn}: cannot fold in a step past total_steps={T}, got state.step="
                f"{t - 1}; create bma(total_steps=...) with the run's number of optimiser steps"
            )
        log_alpha = log_beta_weight(t, T, b)
        log_sum = log_add(float(state.log_weight_sum), log_alpha)
        return fold_weight(log_alpha, log_sum), t, log_sum

    def advance_traced(fn: str, state: BmaState) -> tuple[Tensor, Tensor, Tensor]:
        """Compiled: the same quantities as 0-d tensors (no Python number changes per step)."""
        check_state(fn, state, BmaState, settings)
        t = state.step + 1
        log_alpha = log_beta_weight_tensor(t, T, b)
        log_sum = torch.logaddexp(state.log_weight_sum, log_alpha)
        inside = t <= T  # past total_steps: weight 0 and the sum unchanged (cannot raise here)
        w = torch.where(inside, fold_weight_tensor(log_alpha, log_sum), 0.0)
        return w, t, torch.where(inside, log_sum, state.log_weight_sum)

    def update(state: BmaState, params: Params) -> BmaState:
        fn = "bma.update"
        if _compiling():
            wt, tt, st = advance_traced(fn, state)
            return BmaState(
                tt, st, fold_traced(state.average, params, wt, fn=fn), state.settings, live_cell()
            )
        w, t, s = advance(fn, state)
        avg = fold(state.average, params, w, fn=fn)
        return BmaState(
            counter(t, torch.int64), counter(s, torch.float64), avg, state.settings, live_cell()
        )

    def update_(state: BmaState, params: Params) -> BmaState:
        fn = "bma.update_"
        if _compiling():
            wt, tt, st = advance_traced(fn, state)
            fold_traced_(state.average, params, wt, fn=fn)
            return BmaState(tt, st, state.average, state.settings, _done(state))
        w, t, s = advance(fn, state)
        live = live_cell()
        plans.fold_(state.average, params, w, live, fn=fn)
        state.live.fill_(False)
        return BmaState(
            counter(t, torch.int64), counter(s, torch.float64), state.average, state.settings, live
        )

    return Averager(init, update, update_)  # type: ignore[arg-type]


def ema(
    decay: float,
    *,
    accumulator_dtype: torch.dtype = torch.float32,
    device: Device = None,
) -> Averager:
    r"""Exponential moving average of the iterates, started from ``init``'s parameters.

    .. math::

        \bar\theta_0 = \theta_0, \qquad
        \bar\theta_t = d\,\bar\theta_{t-1} + (1 - d)\,\theta_t
        \quad\Longrightarrow\quad
        \bar\theta_T = d^T\theta_0 + \sum_{t=1}^{T} (1-d)\,d^{T-t}\,\theta_t,

    so the parameters given to ``init`` (typically the pre-trained model) keep weight :math:`d^T`.
    ``decay = 0`` returns the last iterate, ``decay = 1`` keeps the start. The same lerp kernel as
    :func:`bma` with the constant weight :math:`1 - d`; accumulators, buffers, ``device``, the
    recorded settings (``decay``, ``accumulator_dtype``, ``device``) and the stale-state rule as
    there (:class:`Averager`).

    Args:
        decay: :math:`d \in [0, 1]`, a Python or NumPy number.
        accumulator_dtype: the minimum floating dtype of the average (float32: a bf16 EMA with
            :math:`d` close to 1 stalls, its increments rounding to zero).
        device: where the average lives; ``None`` keeps each tensor's device.

    Returns:
        An :class:`Averager` whose states are :class:`EmaState`.

    Raises:
        TypeError: bad argument types, non-trees, non-floating tensors, a foreign or malformed
            state.
        ValueError: ``decay`` outside ``[0, 1]``, a bad device, mismatched keys or shapes, a state
            made with other settings, a stale state.

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
    settings, dtype, dev = _settings("ema", accumulator_dtype, device, decay=d)
    w = 1.0 - d
    plans = PlanCache()

    def init(params: Params) -> EmaState:
        params = check_params("ema.init", params)
        avg = make_average(params, dtype, dev)
        return EmaState(counter(0, torch.int64), avg, dict(settings), live_cell())

    def update(state: EmaState, params: Params) -> EmaState:
        fn = "ema.update"
        check_state(fn, state, EmaState, settings)
        if _compiling():
            avg = fold_traced(state.average, params, w, fn=fn)
            return EmaState(state.step + 1, avg, state.settings, live_cell())
        avg = fold(state.average, params, w, fn=fn)
        return EmaState(counter(int(state.step) + 1, torch.int64), avg, state.settings, live_cell())

    def update_(state: EmaState, params: Params) -> EmaState:
        fn = "ema.update_"
        check_state(fn, state, EmaState, settings)
        if _compiling():
            fold_traced_(state.average, params, w, fn=fn)
            return EmaState(state.step + 1, state.average, state.settings, _done(state))
        step = counter(int(state.step) + 1, torch.int64)
        live = live_cell()
        plans.fold_(state.average, params, w, live, fn=fn)
        state.live.fill_(False)
        return EmaState(step, state.average, state.settings, live)

    return Averager(init, update, update_)  # type: ignore[arg-type]


def uniform(
    *,
    accumulator_dtype: torch.dtype = torch.float32,
    device: Device = None,
) -> Averager:
    r"""Uniform running mean of every tree seen (SWA), ``init``'s parameters included as the first.

    .. math::

        \bar\theta_T = \frac{1}{T + 1}\sum_{t=0}^{T}\theta_t, \qquad
        \bar\theta_t = \bar\theta_{t-1} + \tfrac{1}{t + 1}\,(\theta_t - \bar\theta_{t-1}),

    the same lerp kernel as :func:`bma` with the weight :math:`1/(t+1)`. To average only the
    fine-tuned iterates (SWA's usual form), call ``init`` with the first iterate instead. The
    recorded settings (``accumulator_dtype``, ``device``) and the stale-state rule are those of
    :class:`Averager`.

    Args:
        accumulator_dtype: the minimum floating dtype of the average.
        device: where the average lives; ``None`` keeps each tensor's device.

    Returns:
        An :class:`Averager` whose states are :class:`UniformState`.

    Raises:
        TypeError: bad argument types, non-trees, non-floating tensors, a foreign or malformed
            state.
        ValueError: a bad device, mismatched keys or shapes, a state made with other settings, a
            stale state.

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
    settings, dtype, dev = _settings("uniform", accumulator_dtype, device)
    plans = PlanCache()

    def init(params: Params) -> UniformState:
        params = check_params("uniform.init", params)
        avg = make_average(params, dtype, dev)
        return UniformState(counter(0, torch.int64), avg, dict(settings), live_cell())

    def traced_weight(step: Tensor) -> Tensor:
        return (step + 2).to(torch.float64).reciprocal()  # 1 / (t + 1), exact as on the host

    def update(state: UniformState, params: Params) -> UniformState:
        fn = "uniform.update"
        check_state(fn, state, UniformState, settings)
        if _compiling():
            avg = fold_traced(state.average, params, traced_weight(state.step), fn=fn)
            return UniformState(state.step + 1, avg, state.settings, live_cell())
        n = int(state.step)
        avg = fold(state.average, params, 1.0 / (n + 2), fn=fn)
        return UniformState(counter(n + 1, torch.int64), avg, state.settings, live_cell())

    def update_(state: UniformState, params: Params) -> UniformState:
        fn = "uniform.update_"
        check_state(fn, state, UniformState, settings)
        if _compiling():
            fold_traced_(state.average, params, traced_weight(state.step), fn=fn)
            return UniformState(state.step + 1, state.average, state.settings, _done(state))
        n = int(state.step)
        live = live_cell()
        plans.fold_(state.average, params, 1.0 / (n + 2), live, fn=fn)
        state.live.fill_(False)
        return UniformState(counter(n + 1, torch.int64), state.average, state.settings, live)

    return Averager(init, update, update_)  # type: ignore[arg-type]
