"""Threshold-free OOD detection metrics: AUROC and the false-positive rate at a fixed TPR.

Convention: ``scores`` are higher for samples believed positive, and for OOD detection the
*positives are the in-distribution (known-class) samples*, as with every score in
:mod:`robustft.scores`; FPR@95TPR is then the fraction of unknown samples still accepted when 95%
of known ones are.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor

from robustft._checks import check_number
from robustft._numerics import compute_dtype
from robustft.metrics._validate import check_binary_targets

__all__ = ["auroc", "fpr_at_tpr"]


def auroc(scores: Tensor, is_positive: Tensor) -> Tensor:
    r"""Area under the ROC curve, ties counted ½ (the Mann–Whitney statistic; = scikit-learn).

    .. math::
        \mathrm{AUROC} = \frac{1}{PN} \sum_{i \in \mathcal{P}} \sum_{j \in \mathcal{N}}
        \Bigl([s_i > s_j] + \tfrac12 [s_i = s_j]\Bigr)

    the probability that a random positive scores above a random negative. Equals the trapezoidal
    area under the exact ROC curve, i.e. ``sklearn.metrics.roc_auc_score``. Computed in
    :math:`O(n \log n)` with a sort and two ``searchsorted`` calls; the pair counts are exact
    integers (int64), and one division at the end.

    Written by hand: torchmetrics' ``binary_auroc`` passes any score outside :math:`[0, 1]`
    through a sigmoid first, which in float32 rounds every score from 17 up to exactly 1.0,
    so energy or max-logit scores of 20 and 30 tie (measured: 0.5 instead of sklearn's 1.0 on
    ``[20, 25, 30, 18]``); and with no positives it warns and returns 0.

    Args:
        scores: ``[n]`` scores :math:`s`, higher = more likely positive; no NaN (±inf allowed).
        is_positive: ``[n]`` bool tensor (or integers in ``{0, 1}``) marking the positives
            :math:`\mathcal{P}` (the known-class samples, for OOD detection).

    Returns:
        0-d tensor in :math:`[0, 1]`, in ``scores``' dtype promoted to at least float32.

    Raises:
        TypeError: if ``scores`` is not floating or ``is_positive`` is floating.
        ValueError: if the shapes differ, ``scores`` contains NaN, ``is_positive`` holds values
            other than 0/1, or there is no positive or no negative sample (undefined, never NaN).

    Example:
        >>> auroc(torch.tensor([0.9, 0.4, 0.4, 0.1]), torch.tensor([True, True, False, False]))
        tensor(0.8750)

    References:
        Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution
        Examples in Neural Networks", ICLR 2017. Code: https://github.com/hendrycks/error-detection
    """
    fn = "auroc"
    pos, n_pos, n_neg = check_binary_targets(fn, scores, is_positive)
    s = scores.detach().to(compute_dtype(scores))
    negatives = torch.sort(s[~pos]).values
    positives = s[pos]
    below = torch.searchsorted(negatives, positives, right=False)  # negatives < s_i
    at_or_below = torch.searchsorted(negatives, positives, right=True)  # negatives <= s_i
    twice_u = (below + at_or_below).sum()  # 2 * (#{s_j < s_i} + ½ #{s_j = s_i}), exact in int64
    return twice_u.to(s.dtype) / (2.0 * n_pos * n_neg)


def fpr_at_tpr(scores: Tensor, is_positive: Tensor, *, tpr: float = 0.95) -> Tensor:
    r"""False-positive rate at the threshold that accepts a fraction ``tpr`` of the positives.

    .. math::
        k = \lceil \mathrm{tpr} \cdot P \rceil, \qquad
        t = s_{(k)}^{+} \text{ (the } k\text{-th highest positive score)}, \qquad
        \mathrm{FPR} = \frac{1}{N} \sum_{j \in \mathcal{N}} [s_j \ge t]

    Samples scoring :math:`\ge t` are accepted, so the TPR at :math:`t` is at least ``tpr``
    (more when positives tie at :math:`t`), and negatives tied with :math:`t` count as false
    positives. This is the first point of scikit-learn's ``roc_curve`` whose TPR reaches
    :math:`k/P`; implementations that interpolate the curve or take the nearest TPR differ
    slightly. :math:`k` is computed from the decimal value of ``tpr``
    (``Fraction(repr(tpr))``), so ``tpr=0.55`` with :math:`P=100` gives :math:`k=55`, not the
    :math:`56` that ``ceil(0.55 * 100)`` gives in floating point. Lower is better.

    Written by hand: torchmetrics has a ROC curve but no FPR at a TPR with this definition.

    Args:
        scores: ``[n]`` scores :math:`s`, higher = more likely positive; no NaN (±inf allowed).
        is_positive: ``[n]`` bool tensor (or integers in ``{0, 1}``) marking the positives (the
            known-class samples, for OOD detection).
        tpr: the true-positive rate to reach, in :math:`(0, 1]` (0.95 for FPR95).

    Returns:
        0-d tensor in :math:`[0, 1]`, in ``scores``' dtype promoted to at least float32.

    Raises:
        TypeError: if ``scores`` is not floating, ``is_positive`` is floating, or ``tpr`` is not
            a real number.
        ValueError: if ``tpr`` is outside :math:`(0, 1]`, the shapes differ, ``scores`` contains
            NaN, or there is no positive or no negative sample.

    Example:
        >>> scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.85, 0.75, 0.1])
        >>> is_known = torch.tensor([True, True, True, True, False, False, False])
        >>> fpr_at_tpr(scores, is_known, tpr=0.75)
        tensor(0.6667)

    References:
        Liang et al., "Enhancing the Reliability of Out-of-distribution Image Detection in Neural
        Networks", ICLR 2018. Code: https://github.com/facebookresearch/odin
    """
    fn = "fpr_at_tpr"
    rate = check_number(fn, "tpr", tpr, low=0.0, high=1.0, low_inclusive=False)
    pos, n_pos, n_neg = check_binary_targets(fn, scores, is_positive)
    k = math.ceil(Fraction(repr(rate)) * n_pos)  # 1 <= k <= n_pos since 0 < rate <= 1
    s = scores.detach().to(compute_dtype(scores))
    threshold = torch.topk(s[pos], k, sorted=True).values[-1]
    return (s[~pos] >= threshold).sum().to(s.dtype) / n_neg
