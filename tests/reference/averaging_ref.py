"""Naive references for robustft.averaging, written from the papers with explicit loops.

Float64, scipy's Beta density, closed-form weighted sums over a stored trajectory, and the model
soups recipe as the official code writes it: no code path shared with the library.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.special
import scipy.stats
import torch
from torch import Tensor

Tree = dict[str, Tensor]


def beta_weights_ref(total_steps: int, beta: float) -> list[float]:
    """alpha_t = BetaPDF_{beta,beta}((t + 0.5) / (T + 1)), t = 0..T (CLIPood's code uses scipy)."""
    dist = scipy.stats.beta(beta, beta)
    return [float(dist.pdf((t + 0.5) / (total_steps + 1))) for t in range(total_steps + 1)]


def beta_weights_logspace_ref(total_steps: int, beta: float) -> list[float]:
    """alpha_t from the log density written out with scipy's betaln (no pdf underflow shortcuts)."""
    x = (np.arange(total_steps + 1) + 0.5) / (total_steps + 1)
    logs = (beta - 1.0) * (np.log(x) + np.log1p(-x)) - scipy.special.betaln(beta, beta)
    return [float(v) for v in np.exp(logs)]


def bma_logspace_ref(trajectory: Sequence[Tree], total_steps: int, beta: float) -> Tree:
    """The closed form with weights normalised from scipy's log density (any beta, no underflow).

    ``softmax(logpdf)`` over the steps seen: the same weighted mean as :func:`bma_ref` where the
    density is representable, and still defined where every weight underflows in float64.
    """
    t = np.arange(len(trajectory))
    logs = scipy.stats.beta(beta, beta).logpdf((t + 0.5) / (total_steps + 1))
    w = np.exp(logs - logs.max())
    return weighted_mean_ref(trajectory, [float(v) for v in w / w.sum()])


def weighted_mean_ref(trajectory: Sequence[Tree], weights: Sequence[float]) -> Tree:
    """sum_t w_t theta_t / sum_t w_t, key by key, in float64."""
    total = sum(weights)
    out = {}
    for k in trajectory[0]:
        acc = torch.zeros_like(trajectory[0][k], dtype=torch.float64)
        for w, theta in zip(weights, trajectory):
            acc = acc + w * theta[k].double()
        out[k] = acc / total
    return out


def bma_ref(trajectory: Sequence[Tree], total_steps: int, beta: float) -> Tree:
    """The closed form of the Beta moving average after len(trajectory) - 1 steps."""
    alphas = beta_weights_ref(total_steps, beta)[: len(trajectory)]
    return weighted_mean_ref(trajectory, alphas)


def ema_ref(trajectory: Sequence[Tree], decay: float) -> Tree:
    """d^T theta_0 + sum_{t>=1} (1 - d) d^(T - t) theta_t (weights do not need renormalising)."""
    T = len(trajectory) - 1
    weights = [decay**T] + [(1 - decay) * decay ** (T - t) for t in range(1, T + 1)]
    out = {}
    for k in trajectory[0]:
        acc = torch.zeros_like(trajectory[0][k], dtype=torch.float64)
        for w, theta in zip(weights, trajectory):
            acc = acc + w * theta[k].double()
        out[k] = acc
    return out


def uniform_ref(trajectory: Sequence[Tree]) -> Tree:
    return weighted_mean_ref(trajectory, [1.0] * len(trajectory))
