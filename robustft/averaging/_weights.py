r"""CLIPood's Beta weights: how much each optimiser step counts in the Beta moving average."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from robustft._checks import check_int, check_number

__all__ = ["beta_weights"]


def _beta_pdf(x: float, beta: float) -> float:
    """``BetaPDF_{beta,beta}(x)`` for ``0 < x < 1``, in float64 through ``lgamma`` (no scipy)."""
    log_norm = math.lgamma(2.0 * beta) - 2.0 * math.lgamma(beta)
    return math.exp(log_norm + (beta - 1.0) * (math.log(x) + math.log1p(-x)))


def _check_beta_args(fn: str, total_steps: object, beta: object) -> tuple[int, float]:
    """Validate ``(total_steps, beta)`` for ``fn``; return them as Python numbers."""
    steps = check_int(fn, "total_steps", total_steps, low=1)
    b = check_number(fn, "beta", beta, low=0.0, low_inclusive=False)
    if math.isinf(b):
        raise ValueError(f"{fn}: beta must be a finite number > 0, got {beta!r}")
    return steps, b


def _beta_weight(t: int, total_steps: int, beta: float) -> float:
    """``alpha_t`` of :func:`beta_weights`, one at a time (no list of ``total_steps`` floats)."""
    return _beta_pdf((t + 0.5) / (total_steps + 1), beta)


def beta_weights(total_steps: int, *, beta: float = 0.5) -> Tensor:
    r"""The weight of each iterate in CLIPood's Beta moving average.

    .. math::

        \alpha_t = \mathrm{BetaPDF}_{\beta,\beta}\!\left(\frac{t + 1/2}{T + 1}\right)
                 = \frac{x_t^{\beta-1}(1-x_t)^{\beta-1}}{B(\beta, \beta)},
        \qquad x_t = \frac{t + 1/2}{T + 1},\quad t = 0, \dots, T,

    where :math:`T` is ``total_steps`` and :math:`\alpha_0` weighs the pre-trained parameters the
    average starts from. The density is evaluated in float64 through ``math.lgamma`` (no scipy).
    With :math:`\beta < 1` the weights are U-shaped (the pre-trained model and the last iterates
    count most); :math:`\beta = 1` gives equal weights (a uniform average); :math:`\beta > 1`
    favours the middle of training.

    Args:
        total_steps: :math:`T`, the number of *optimiser steps* the average will see (iterations,
            not epochs), at least 1.
        beta: :math:`\beta > 0`, both shape parameters of the symmetric Beta distribution
            (0.5 in CLIPood's domain-shift runs, 0.1 in its open-class runs).

    Returns:
        ``[total_steps + 1]`` float64 tensor :math:`(\alpha_0, \dots, \alpha_T)` (unnormalised).

    Raises:
        TypeError: if ``total_steps`` is not an int or ``beta`` not a real number.
        ValueError: if ``total_steps < 1`` or ``beta`` is not a finite number ``> 0``.

    >>> beta_weights(1, beta=1.0)
    tensor([1., 1.], dtype=torch.float64)
    >>> beta_weights(2, beta=2.0)  # 6 x (1 - x) at x = 1/6, 1/2, 5/6
    tensor([0.8333, 1.5000, 0.8333], dtype=torch.float64)

    References:
        Shu et al., "CLIPood: Generalizing CLIP to Out-of-Distributions", ICML 2023, Sec. 3.3.
        Code: https://github.com/thuml/CLIPood
    """
    steps, b = _check_beta_args("beta_weights", total_steps, beta)
    return torch.tensor([_beta_weight(t, steps, b) for t in range(steps + 1)], dtype=torch.float64)
