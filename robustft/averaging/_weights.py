r"""CLIPood's Beta weights: how much each optimiser step counts in the Beta moving average.

The density is evaluated in log space (``math.lgamma``, ``math.log1p``), so no :math:`\beta` makes
it overflow, and the running average folds weights in through their logarithms
(:func:`log_beta_weight`, :func:`log_add`): a weight that underflows to 0 in float64 (the first
and last steps when :math:`\beta` is in the hundreds) still has a finite log, and the update
weight :math:`\alpha_t / S_t = \exp(\log\alpha_t - \log S_t)` stays exact. Two twins of each
formula exist: Python floats for the eager path (host arithmetic, no device sync) and 0-d float64
tensors for code traced by ``torch.compile`` (no Python number that changes per step, so no
recompilation); they evaluate the same expressions in the same order.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from robustft._checks import check_int, check_number

__all__ = ["beta_weights"]


_LOG2 = math.log(2.0)
_ASYMPTOTIC_FROM = 100.0


def _log_norm(beta: float) -> float:
    r"""``K(beta) = log(Gamma(2 beta) / (Gamma(beta)^2 4^(beta - 1)))``, the density's constant.

    :math:`\mathrm{BetaPDF}_{\beta,\beta}(x) = \exp(K(\beta) + (\beta - 1)\log(4x(1-x)))`.
    ``lgamma`` below ``beta = 100``; above, the Stirling series of the ratio, whose huge terms
    cancel analytically: :math:`K = \log 2 + \tfrac12\log(\beta/\pi) - \tfrac{1}{8\beta} +
    \tfrac{1}{192\beta^3} - \tfrac{1}{640\beta^5}` (next term below 1.2e-17 at 100), so
    ``K`` stays accurate to a few ulps for every finite ``beta`` instead of losing the digits of
    ``lgamma(2 beta) ~ 2 beta log beta``.
    """
    if beta < _ASYMPTOTIC_FROM:
        return math.lgamma(2.0 * beta) - 2.0 * math.lgamma(beta) - 2.0 * (beta - 1.0) * _LOG2
    inv = 1.0 / beta
    series = inv * (-0.125 + inv * inv * (1.0 / 192.0 - inv * inv / 640.0))
    return _LOG2 + 0.5 * math.log(beta / math.pi) + series


def _log_4x1mx(x: float) -> float:
    """``log(4 x (1 - x))`` for ``0 < x < 1``, accurate near the ends and near ``x = 1/2``."""
    if 0.25 <= x <= 0.75:
        d = 1.0 - 2.0 * x  # exact here; 4x(1-x) = 1 - d^2
        return math.log1p(-d * d)
    return math.log(4.0 * x) + math.log1p(-x)


def _check_beta_args(fn: str, total_steps: object, beta: object) -> tuple[int, float]:
    """Validate ``(total_steps, beta)`` for ``fn``; return them as Python numbers.

    Python and NumPy numbers are accepted; ``beta`` must be finite and ``> 0``.
    """
    steps = check_int(fn, "total_steps", total_steps, low=1)
    b = check_number(fn, "beta", beta, low=0.0, low_inclusive=False)
    return steps, b


def log_beta_weight(t: int, total_steps: int, beta: float) -> float:
    r"""``log alpha_t`` of :func:`beta_weights`, one step at a time (no list of ``T`` floats).

    May be ``-inf`` (a weight far below float64's range at an astronomically large ``beta``).
    """
    x = (t + 0.5) / (total_steps + 1)
    return _log_norm(beta) + (beta - 1.0) * _log_4x1mx(x)


def log_beta_weight_tensor(t: Tensor, total_steps: int, beta: float) -> Tensor:
    """:func:`log_beta_weight` of a 0-d integer tensor ``t``, as a 0-d float64 tensor (traceable)."""
    x = (t.to(torch.float64) + 0.5) / (total_steps + 1)
    d = 1.0 - 2.0 * x
    middle = torch.log1p(-d * d)
    ends = torch.log(4.0 * x) + torch.log1p(-x)
    g = torch.where((x >= 0.25) & (x <= 0.75), middle, ends)
    return _log_norm(beta) + (beta - 1.0) * g


def log_add(a: float, b: float) -> float:
    """``log(exp(a) + exp(b))`` without overflow or underflow (``torch.logaddexp``'s formula)."""
    if math.isinf(a) and a == b:
        return a
    m = max(a, b)
    return m + math.log1p(math.exp(-abs(a - b)))


def fold_weight(log_alpha: float, log_sum: float) -> float:
    r"""The lerp weight :math:`\alpha_t / S_t = \exp(\log\alpha_t - \log S_t)`.

    1 while every weight so far is 0 in float64 (``log_sum = -inf``): the first representable
    weight then replaces the average, as the exact weighted mean does.
    """
    if log_sum == -math.inf:
        return 1.0
    return math.exp(log_alpha - log_sum)


def fold_weight_tensor(log_alpha: Tensor, log_sum: Tensor) -> Tensor:
    """:func:`fold_weight` on 0-d float64 tensors (traceable)."""
    return torch.where(torch.isneginf(log_sum), 1.0, torch.exp(log_alpha - log_sum))


def beta_weights(total_steps: int, *, beta: float = 0.5) -> Tensor:
    r"""The weight of each iterate in CLIPood's Beta moving average.

    .. math::

        \alpha_t = \mathrm{BetaPDF}_{\beta,\beta}\!\left(\frac{t + 1/2}{T + 1}\right)
                 = \frac{x_t^{\beta-1}(1-x_t)^{\beta-1}}{B(\beta, \beta)},
        \qquad x_t = \frac{t + 1/2}{T + 1},\quad t = 0, \dots, T,

    where :math:`T` is ``total_steps`` and :math:`\alpha_0` weighs the pre-trained parameters the
    average starts from. The density is evaluated in float64 and in log space
    (:math:`\log\alpha_t = -\log B(\beta,\beta) + (\beta - 1)(\log x_t + \log(1 - x_t))`, through
    ``math.lgamma``; no scipy), so it never overflows: with :math:`\beta` in the hundreds the
    weights of the first and last steps are below float64's range and come back as 0, their
    correctly rounded value (the running average itself keeps their logarithms and stays exact).
    At astronomically large :math:`\beta` the density itself is ill-conditioned in float64 (its
    log is of order :math:`\beta`): weight ratios are then accurate to about
    :math:`\beta \cdot 10^{-16}`, and the weights stay finite.
    With :math:`\beta < 1` the weights are U-shaped (the pre-trained model and the last iterates
    count most); :math:`\beta = 1` gives equal weights (a uniform average); :math:`\beta > 1`
    favours the middle of training.

    Args:
        total_steps: :math:`T`, the number of *optimiser steps* the average will see (iterations,
            not epochs), at least 1; a Python or NumPy integer.
        beta: :math:`\beta > 0`, both shape parameters of the symmetric Beta distribution
            (0.5 in CLIPood's domain-shift runs, 0.1 in its open-class runs); a finite Python or
            NumPy number.

    Returns:
        ``[total_steps + 1]`` float64 tensor :math:`(\alpha_0, \dots, \alpha_T)` (unnormalised).

    Raises:
        TypeError: if ``total_steps`` is not an integer or ``beta`` not a real number.
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
    logs = [log_beta_weight(t, steps, b) for t in range(steps + 1)]
    return torch.tensor(logs, dtype=torch.float64).exp()
