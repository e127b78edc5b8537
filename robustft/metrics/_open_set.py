"""Open-set recognition metrics (OS*, UNK, HOS) and the base/new harmonic mean.

:func:`open_set` is a per-sample step (the prediction is correct or not) followed by
:func:`reduce_open_set` over labels, correctness and scores, the reduction :class:`Evaluation`
applies to the per-sample scalars it keeps.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from robustft._checks import check_number, describe
from robustft._numerics import compute_dtype
from robustft.metrics._validate import (
    check_logits_labels,
    check_no_nan,
    check_scores,
    check_threshold,
)
from robustft.typing import Scalar

__all__ = ["OpenSetResult", "harmonic_mean", "open_set", "reduce_open_set"]


class OpenSetResult(NamedTuple):
    """Open-set recognition scores returned by :func:`open_set`, each a 0-d tensor in [0, 1].

    Attributes:
        os_star: OS*, the mean over known classes of the fraction of that class's samples
            accepted and correctly classified.
        unk: UNK, the fraction of unknown-class samples rejected.
        hos: HOS, the harmonic mean of OS* and UNK.
    """

    os_star: Tensor
    unk: Tensor
    hos: Tensor


def _as_tensor(fn: str, name: str, value: Scalar | Tensor) -> Tensor | float:
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            raise TypeError(
                f"{fn}: {name} must be a real number or a floating tensor, got dtype {value.dtype}"
            )
        check_no_nan(fn, name, value)
        if bool((value < 0).any()):
            raise ValueError(
                f"{fn}: {name} must be >= 0 everywhere, got {describe(value)} with negative entries"
            )
        return value.detach()
    return check_number(fn, name, value, low=0.0, finite=False)


def harmonic_mean(a: Scalar | Tensor, b: Scalar | Tensor) -> Tensor:
    r"""Harmonic mean of two non-negative rates (base/new accuracy, OS*/UNK), 0 when either is 0.

    .. math::
        H(a, b) = \frac{2ab}{a + b} = \frac{2}{1/a + 1/b}, \qquad H(0, b) = 0, \qquad
        H(\infty, b) = 2b

    Used for the base-to-new generalisation score (H of base- and new-class accuracy, CoCoOp) and
    for HOS. Broadcasts like ``a * b``; pass percentages or fractions, consistently. Computed as
    :math:`\ell \cdot 2 / (1 + \ell / h)` with :math:`\ell = \min(a, b)`,
    :math:`h = \max(a, b)`: no intermediate overflows (``2ab`` would for :math:`a, b` near
    float32's maximum), every finite input gives the correctly rounded value up to a few ulps,
    and infinite inputs give their limits (:math:`H(\infty, \infty) = \infty`). Written with
    torch ops (torchmetrics has no such metric).

    Args:
        a: a non-negative real number (``inf`` allowed) or floating tensor.
        b: a non-negative real number or floating tensor, broadcastable with ``a``.

    Returns:
        The broadcast shape of ``a`` and ``b`` (0-d for two numbers), in the tensors' promoted
        dtype, at least float32; float64 for two Python numbers (which are doubles).

    Raises:
        TypeError: if an argument is neither a real number nor a floating tensor.
        ValueError: if an argument is negative or NaN.

    Example:
        >>> harmonic_mean(0.8, 0.6)
        tensor(0.6857, dtype=torch.float64)
        >>> harmonic_mean(torch.tensor([0.5, 0.0, 3e38]), torch.tensor([0.5, 0.0, 3e38]))
        tensor([5.0000e-01, 0.0000e+00, 3.0000e+38])

    References:
        Zhou et al., "Conditional Prompt Learning for Vision-Language Models", CVPR 2022.
        Code: https://github.com/KaiyangZhou/CoOp
    """
    fn = "harmonic_mean"
    a_, b_ = _as_tensor(fn, "a", a), _as_tensor(fn, "b", b)
    given = [t for t in (a_, b_) if isinstance(t, Tensor)]
    # Python numbers are doubles and do not promote tensors (like torch's wrapped scalars)
    dtype = compute_dtype(*given) if given else torch.float64
    device = given[0].device if given else None
    x, y = (torch.as_tensor(t, dtype=dtype, device=device) for t in (a_, b_))
    lo, hi = torch.minimum(x, y), torch.maximum(x, y)
    ratio = torch.where(hi > 0, lo / torch.where(hi > 0, hi, torch.ones_like(hi)), 0.0)
    ratio = torch.where(torch.isinf(lo), torch.ones_like(ratio), ratio)  # inf / inf: H = inf
    return lo * (2.0 / (1.0 + ratio))


def open_set(logits: Tensor, labels: Tensor, scores: Tensor, *, threshold: Scalar) -> OpenSetResult:
    r"""Open-set recognition: OS*, UNK and their harmonic mean HOS, at a score threshold.

    A sample is *accepted* as known when its score :math:`s_i \ge \tau`; its prediction is
    :math:`\hat y_i = \arg\max_c z_{ic}` over the :math:`C` known classes. Labels outside
    :math:`[0, C)` mark unknown-class samples (SPEC §0).

    .. math::
        \mathrm{OS}^* = \frac{1}{|\mathcal{K}|} \sum_{c \in \mathcal{K}}
        \frac{\#\{i : y_i = c,\ s_i \ge \tau,\ \hat y_i = c\}}{\#\{i : y_i = c\}}, \qquad
        \mathrm{UNK} = \frac{\#\{i : y_i \notin [0, C),\ s_i < \tau\}}{\#\{i : y_i \notin [0, C)\}}

    .. math:: \mathrm{HOS} = \frac{2 \cdot \mathrm{OS}^* \cdot \mathrm{UNK}}{\mathrm{OS}^* + \mathrm{UNK}}

    with :math:`\mathcal{K}` the known classes *present in* ``labels`` (a class without samples
    has no accuracy to average; when the set holds every known class this is all :math:`C`).
    HOS is 0 when both are 0. Written by hand (torchmetrics has no open-set metric).

    Args:
        logits: ``[batch, classes]`` logits over the :math:`C` known classes.
        labels: ``[batch]`` labels of any integer dtype; values outside ``[0, classes)`` (e.g.
            ``-1``) are unknown-class samples.
        scores: ``[batch]`` OOD scores (higher = known), e.g. :func:`robustft.scores.msp`.
        threshold: :math:`\tau`, a real number or 0-d floating tensor, on ``scores``' scale;
            ±inf allowed, NaN not.

    Returns:
        :class:`OpenSetResult` ``(os_star, unk, hos)`` of 0-d tensors in :math:`[0, 1]`, in
        ``logits``' dtype promoted to at least float32.

    Raises:
        TypeError: if a tensor has the wrong dtype, or ``threshold`` is not a real number.
        ValueError: if the shapes do not match, the batch or class axis is empty, a row of
            ``logits`` has no finite maximum (NaN, ``+inf``, all ``-inf``), ``scores`` or
            ``threshold`` is NaN, or ``labels`` has no known-class or no unknown-class sample.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
        >>> labels = torch.tensor([0, 0, 1, -1, -1])
        >>> scores = torch.tensor([0.9, 0.9, 0.2, 0.8, 0.1])
        >>> open_set(logits, labels, scores, threshold=0.5)
        OpenSetResult(os_star=tensor(0.2500), unk=tensor(0.5000), hos=tensor(0.3333))

    References:
        Bucci et al., "On the Effectiveness of Image Rotation for Open Set Domain Adaptation",
        ECCV 2020. Code: https://github.com/silvia1993/ROS. Liang et al., "Realistic
        Unsupervised CLIP Fine-tuning with Universal Entropy Optimization", ICML 2024.
        Code: https://github.com/tim-learn/UEO
    """
    fn = "open_set"
    labels, batch, classes = check_logits_labels(fn, logits, labels)
    check_scores(fn, scores, batch)
    check_threshold(fn, threshold)
    known = (labels >= 0) & (labels < classes)
    n_known = int(known.sum())
    n_unknown = batch - n_known
    if n_known == 0 or n_unknown == 0:
        raise ValueError(
            f"{fn}: labels must contain known-class samples (in [0, {classes})) and unknown-class "
            f"samples (outside it), got {n_known} known and {n_unknown} unknown"
        )
    correct = known & (logits.detach().argmax(dim=-1) == labels)
    return reduce_open_set(labels, correct, scores, threshold, classes, compute_dtype(logits))


def reduce_open_set(
    labels: Tensor,
    correct: Tensor,
    scores: Tensor,
    threshold: Scalar,
    classes: int,
    dtype: torch.dtype,
) -> OpenSetResult:
    """OS*, UNK, HOS from per-sample int64 labels, correctness and scores (private kernel).

    Needs at least one known- and one unknown-class sample (the callers check it).
    """
    known = (labels >= 0) & (labels < classes)
    accepted = scores.detach() >= threshold
    hit = accepted & correct
    cls = torch.where(known, labels, torch.zeros_like(labels))
    per_class = torch.zeros(classes, dtype=dtype, device=labels.device)
    count = per_class.index_add(0, cls, known.to(dtype))
    hits = per_class.index_add(0, cls, hit.to(dtype))
    present = count > 0
    os_star = (hits / count.clamp_min(1)).sum() / present.sum().to(dtype)
    n_unknown = (~known).sum()
    unk = ((~accepted) & ~known).sum().to(dtype) / n_unknown.to(dtype)
    return OpenSetResult(os_star, unk, harmonic_mean(os_star, unk))
