"""Threshold-free OOD detection metrics: AUROC, AUPR-in/out and the FPR at a fixed TPR.

Convention: ``scores`` are higher for samples believed positive, and for OOD detection the
*positives are the in-distribution (known-class) samples*, as with every score in
:mod:`robustft.scores`; FPR@95TPR is then the fraction of unknown samples still accepted when 95%
of known ones are. AUPR is not symmetric in the two classes, so it comes in two functions with the
same arguments: :func:`aupr_in` (known samples positive, the score as is) and :func:`aupr_out`
(unknown samples positive, the score negated).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor

from robustft._checks import check_number
from robustft._numerics import compute_dtype
from robustft.metrics._validate import check_binary_targets

__all__ = ["aupr_in", "aupr_out", "auroc", "average_precision", "fpr_at_tpr"]


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


def average_precision(scores: Tensor, is_positive: Tensor, positives: int) -> Tensor:
    """Average precision of bool ``is_positive`` ranked by ``scores`` (private kernel).

    Needs ``positives >= 1`` (the callers check it). One sort; tied scores form one threshold;
    true-positive counts are exact int64 cumulative sums.
    """
    s = scores.detach().to(compute_dtype(scores))
    order = torch.argsort(s, descending=True)
    ranked, hit = s[order], is_positive[order]
    true_pos = torch.cumsum(hit, dim=0)  # int64
    # the last position of each run of equal scores: the thresholds of the PR curve
    last = torch.ones_like(hit)
    last[:-1] = ranked[:-1] != ranked[1:]
    ends = last.nonzero().squeeze(1)
    tp = true_pos[ends]
    precision = tp.to(s.dtype) / (ends + 1).to(s.dtype)
    gained = torch.diff(tp, prepend=tp.new_zeros(1))  # positives recalled at this threshold
    return (gained.to(s.dtype) * precision).sum() / positives


def aupr_in(scores: Tensor, is_known: Tensor) -> Tensor:
    r"""AUPR-in: average precision with the known (in-distribution) samples as positives.

    .. math::
        \mathrm{AP} = \sum_{k} (R_k - R_{k-1})\, P_k, \qquad
        P_k = \frac{\#\{i \in \mathcal{K} : s_i \ge t_k\}}{\#\{i : s_i \ge t_k\}}, \qquad
        R_k = \frac{\#\{i \in \mathcal{K} : s_i \ge t_k\}}{|\mathcal{K}|}

    over the distinct scores :math:`t_1 > t_2 > \dots` (thresholds), with
    :math:`\mathcal{K}` the known samples and :math:`R_0 = 0`: the precision at each threshold,
    weighted by the recall it adds. No interpolation (the step-wise area, not the trapezoidal one,
    which is optimistic); tied scores form one threshold. This is exactly
    ``sklearn.metrics.average_precision_score(is_known, scores)`` (the tests check equality).

    **Conventions.** ``scores`` are those of :mod:`robustft.scores`: higher = more likely known,
    used as they are. A random score gives AUPR-in :math:`\approx |\mathcal{K}| / n`, the share
    of known samples, so AUPR-in and :func:`aupr_out` depend on the mix of the evaluation set
    (AUROC does not). :func:`aupr_out` is the same computation with the roles swapped.

    Args:
        scores: ``[n]`` OOD scores :math:`s`, higher = known; no NaN (±inf allowed).
        is_known: ``[n]`` bool tensor (or integers in ``{0, 1}``) marking the known-class
            samples :math:`\mathcal{K}` (e.g. ``(labels >= 0) & (labels < classes)``).

    Returns:
        0-d tensor in :math:`(0, 1]`, in ``scores``' dtype promoted to at least float32.

    Raises:
        TypeError: if ``scores`` is not floating or ``is_known`` is floating.
        ValueError: if the shapes differ, ``scores`` contains NaN, ``is_known`` holds values other
            than 0/1, or there is no known or no unknown sample (with no unknown sample the value
            is trivially 1; with no known sample it is 0/0).

    Example:
        >>> scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
        >>> is_known = torch.tensor([True, False, True, False])
        >>> aupr_in(scores, is_known)  # (1/1 + 2/3) / 2
        tensor(0.8333)

    References:
        Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution
        Examples in Neural Networks", ICLR 2017. Code: https://github.com/hendrycks/error-detection
    """
    fn = "aupr_in"
    known, n_known, _ = check_binary_targets(fn, scores, is_known, name="is_known")
    return average_precision(scores, known, n_known)


def aupr_out(scores: Tensor, is_known: Tensor) -> Tensor:
    r"""AUPR-out: average precision with the unknown (out-of-distribution) samples as positives.

    .. math::
        \mathrm{AUPR\text{-}out}(s, \mathcal{K}) = \mathrm{AP}(-s,\ \overline{\mathcal{K}})

    the average precision (:func:`aupr_in`'s formula) of detecting the unknown samples
    :math:`\overline{\mathcal{K}}` with the *negated* score: the score is higher = known, so
    the most unknown-looking sample ranks first. Takes the same arguments as :func:`aupr_in`:
    pass the known mask and the scores as they are, never negated or inverted yourself. Equals
    ``sklearn.metrics.average_precision_score(~is_known, -scores)`` (the tests check equality).
    A random score gives :math:`\approx |\overline{\mathcal{K}}| / n`.

    Args:
        scores: ``[n]`` OOD scores :math:`s`, higher = known; no NaN (±inf allowed).
        is_known: ``[n]`` bool tensor (or integers in ``{0, 1}``) marking the known-class
            samples :math:`\mathcal{K}`; the others are the positives here.

    Returns:
        0-d tensor in :math:`(0, 1]`, in ``scores``' dtype promoted to at least float32.

    Raises:
        TypeError: if ``scores`` is not floating or ``is_known`` is floating.
        ValueError: if the shapes differ, ``scores`` contains NaN, ``is_known`` holds values other
            than 0/1, or there is no known or no unknown sample.

    Example:
        >>> scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
        >>> is_known = torch.tensor([True, False, True, False])
        >>> aupr_out(scores, is_known)  # ranked by -s: 0.6 (unknown), 0.7, 0.8 (unknown), 0.9
        tensor(0.8333)
        >>> aupr_out(torch.tensor([0.9, 0.8, 0.1]), torch.tensor([True, True, False]))
        tensor(1.)

    References:
        Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution
        Examples in Neural Networks", ICLR 2017. Code: https://github.com/hendrycks/error-detection
    """
    fn = "aupr_out"
    known, _, n_unknown = check_binary_targets(fn, scores, is_known, name="is_known")
    return average_precision(-scores.detach(), ~known, n_unknown)
