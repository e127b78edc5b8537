"""The class- and group-balanced metrics of the standard suites: macro-F1, per-class and
worst-group accuracy.

Each is a per-sample step (the argmax prediction, or its correctness) followed by a reduction over
integer counts (:func:`reduce_macro_f1`, :func:`reduce_per_class_accuracy`,
:func:`reduce_worst_group`), the reductions :class:`Evaluation` applies to the per-sample scalars
it keeps. Counts are exact int64 (``bincount``); one division per class and one mean at the end.
Like :func:`accuracy`, they are closed-set metrics: a label outside ``[0, classes)`` raises.
"""

from __future__ import annotations

import torch
from torch import Tensor

from robustft._checks import check_choice, check_labels, describe
from robustft._numerics import compute_dtype
from robustft.metrics._validate import check_known_labels, check_logits_labels

__all__ = [
    "AVERAGE_OVER",
    "check_average_over",
    "macro_f1",
    "per_class_accuracy",
    "reduce_macro_f1",
    "reduce_per_class_accuracy",
    "reduce_worst_group",
    "worst_group_accuracy",
]

AVERAGE_OVER = ("union", "labels")


def check_average_over(fn: str, name: str, value: object) -> str:
    """``"union"`` (labels ∪ predictions, scikit-learn's default) or ``"labels"`` (WILDS)."""
    if not isinstance(value, str):
        raise TypeError(f"{fn}: {name} must be one of 'union', 'labels', got {describe(value)}")
    return str(check_choice(fn, name, value, AVERAGE_OVER))


def _hits(labels: Tensor, prediction: Tensor, classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """int64 ``[classes]`` counts: samples per label, predictions per class, correct per class."""
    support = torch.bincount(labels, minlength=classes)
    predicted = torch.bincount(prediction, minlength=classes)
    # the correct samples' labels; the others go to an overflow bin that is dropped (no mask sync)
    right = torch.where(prediction == labels, labels, torch.full_like(labels, classes))
    hits = torch.bincount(right, minlength=classes + 1)[:classes]
    return support, predicted, hits


def _mean_over(values: Tensor, include: Tensor) -> Tensor:
    """Mean of ``values`` where ``include`` (at least one entry included)."""
    total = torch.where(include, values, torch.zeros_like(values)).sum()
    return total / include.sum().to(values.dtype)


def reduce_macro_f1(
    labels: Tensor, prediction: Tensor, classes: int, dtype: torch.dtype, average_over: str
) -> Tensor:
    """Macro-F1 of int64 known labels and predictions ``[n]``, ``n >= 1`` (private kernel)."""
    support, predicted, hits = _hits(labels, prediction, classes)
    seen = support + predicted  # = 2TP + FP + FN per class
    include = seen > 0 if average_over == "union" else support > 0
    f1 = 2 * hits.to(dtype) / seen.clamp_min(1).to(dtype)
    return _mean_over(f1, include)


def reduce_per_class_accuracy(
    labels: Tensor, prediction: Tensor, classes: int, dtype: torch.dtype
) -> Tensor:
    """Mean per-class recall over the classes present in ``labels`` (private kernel)."""
    support, _, hits = _hits(labels, prediction, classes)
    recall = hits.to(dtype) / support.clamp_min(1).to(dtype)
    return _mean_over(recall, support > 0)


def reduce_worst_group(correct: Tensor, groups: Tensor, dtype: torch.dtype) -> Tensor:
    """Minimum over the distinct ids in ``groups`` ``[n]`` of the mean of bool ``correct``."""
    _, group = torch.unique(groups, return_inverse=True)
    count = torch.bincount(group)
    size = count.shape[0]
    right = torch.where(correct, group, torch.full_like(group, size))
    hits = torch.bincount(right, minlength=size + 1)[:size]
    return (hits.to(dtype) / count.to(dtype)).amin()


def _predictions(fn: str, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, int]:
    labels, _, classes = check_logits_labels(fn, logits, labels)
    check_known_labels(fn, labels, classes)
    return labels, logits.detach().argmax(dim=-1), classes


def macro_f1(logits: Tensor, labels: Tensor, *, average_over: str = "union") -> Tensor:
    r"""Macro-averaged F1: the unweighted mean over classes of each class's F1 score.

    .. math::
        \mathrm{F1}_c = \frac{2\,\mathrm{TP}_c}{2\,\mathrm{TP}_c + \mathrm{FP}_c + \mathrm{FN}_c},
        \qquad
        \text{macro-F1} = \frac{1}{|\mathcal{C}|} \sum_{c \in \mathcal{C}} \mathrm{F1}_c

    with the prediction :math:`\hat y_i = \arg\max_c z_{ic}` (ties to the lowest index),
    :math:`\mathrm{TP}_c = \#\{i : \hat y_i = y_i = c\}`, :math:`\mathrm{FP}_c = \#\{i : \hat y_i
    = c \ne y_i\}`, :math:`\mathrm{FN}_c = \#\{i : y_i = c \ne \hat y_i\}`. The classes averaged
    over, :math:`\mathcal{C}`, are set by ``average_over``:

    * ``"union"`` (default): the classes that occur in the labels *or* the predictions; a class
      absent from both has no F1 (0/0) and is left out. This is
      ``sklearn.metrics.f1_score(labels, predictions, average="macro")`` with its default
      ``labels=None`` (the tests check equality).
    * ``"labels"``: the classes that occur in the labels only, as WILDS computes iWildCam's
      macro-F1 (``f1_score(..., average="macro", labels=torch.unique(y_true))``); a prediction of
      an absent class still costs its true class a false negative.

    Unlike accuracy it weighs rare classes like frequent ones: the metric of long-tailed test
    sets such as iWildCam. Written by hand from integer counts (``bincount``): torchmetrics'
    ``multiclass_f1_score(average="macro")`` averages over all ``num_classes`` classes by default,
    counting a class absent from both labels and predictions as F1 = 0.

    Args:
        logits: ``[batch, classes]`` logits :math:`z` (or probabilities: only the argmax matters).
        labels: ``[batch]`` labels :math:`y` of any integer dtype, all in ``[0, classes)``.
        average_over: ``"union"`` or ``"labels"``, the classes :math:`\mathcal{C}`.

    Returns:
        0-d tensor in :math:`[0, 1]`, in ``logits``' dtype promoted to at least float32.

    Raises:
        TypeError: if ``logits`` is not floating, ``labels`` is not an integer tensor, or
            ``average_over`` is not a string.
        ValueError: if the shapes do not match, the batch or class axis is empty, a row of
            ``logits`` has no finite maximum, a label is outside ``[0, classes)``, or
            ``average_over`` is not ``"union"`` or ``"labels"``.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0]])
        >>> labels = torch.tensor([0, 1, 0])
        >>> macro_f1(logits, labels)  # F1 of class 0: 2/3, of class 1: 2/3
        tensor(0.6667)
        >>> macro_f1(logits, torch.tensor([2, 1, 1]))  # classes 0, 1, 2: F1 0, 1, 0
        tensor(0.3333)
        >>> macro_f1(logits, torch.tensor([2, 1, 1]), average_over="labels")  # classes 1, 2
        tensor(0.5000)

    References:
        Koh et al., "WILDS: A Benchmark of in-the-Wild Distribution Shifts", ICML 2021.
        Code: https://github.com/p-lambda/wilds
    """
    fn = "macro_f1"
    over = check_average_over(fn, "average_over", average_over)
    labels, prediction, classes = _predictions(fn, logits, labels)
    return reduce_macro_f1(labels, prediction, classes, compute_dtype(logits), over)


def per_class_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    r"""Per-class accuracy (mean per-class recall, "PACC"): accuracy with every class weighed equally.

    .. math::
        \mathrm{PACC} = \frac{1}{|\mathcal{C}|} \sum_{c \in \mathcal{C}}
        \frac{\#\{i : y_i = c,\ \arg\max_k z_{ik} = c\}}{\#\{i : y_i = c\}}

    over the classes :math:`\mathcal{C}` that occur in ``labels`` (a class without samples has no
    accuracy; with every class present this is the mean over all :math:`C`). Equals
    ``sklearn.metrics.balanced_accuracy_score(labels, predictions)`` (``adjusted=False``), which
    also averages over the classes present in the labels (it warns when a prediction names an
    absent class; the value is the same). UEO reports it as PACC on its class-imbalanced
    benchmarks. It is the open-set OS* of :func:`open_set` with no sample rejected.

    Args:
        logits: ``[batch, classes]`` logits :math:`z` (or probabilities: only the argmax matters).
        labels: ``[batch]`` labels :math:`y` of any integer dtype, all in ``[0, classes)``.

    Returns:
        0-d tensor in :math:`[0, 1]`, in ``logits``' dtype promoted to at least float32.

    Raises:
        TypeError: if ``logits`` is not floating or ``labels`` is not an integer tensor.
        ValueError: if the shapes do not match, the batch or class axis is empty, a row of
            ``logits`` has no finite maximum, or a label is outside ``[0, classes)``.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
        >>> per_class_accuracy(logits, torch.tensor([0, 0, 1, 1]))  # (2/2 + 1/2) / 2
        tensor(0.7500)

    References:
        Liang et al., "Realistic Unsupervised CLIP Fine-tuning with Universal Entropy
        Optimization", ICML 2024. Code: https://github.com/tim-learn/UEO
    """
    fn = "per_class_accuracy"
    labels, prediction, classes = _predictions(fn, logits, labels)
    return reduce_per_class_accuracy(labels, prediction, classes, compute_dtype(logits))


def worst_group_accuracy(logits: Tensor, labels: Tensor, *, groups: Tensor) -> Tensor:
    r"""Worst-group accuracy: the lowest accuracy over the groups present (e.g. WILDS regions).

    .. math::
        \mathrm{WGA} = \min_{g \in \mathcal{G}}
        \frac{\#\{i : G_i = g,\ \arg\max_c z_{ic} = y_i\}}{\#\{i : G_i = g\}}

    over the distinct group ids :math:`\mathcal{G}` that occur in ``groups`` (WILDS takes the
    minimum over the groups with at least one sample, as here). The group ids are arbitrary
    integers (a region, a domain, a (class, attribute) pair encoded as one integer); they need not
    be contiguous. Reported as FMoW's worst-region accuracy and Waterbirds' worst-group accuracy.

    Args:
        logits: ``[batch, classes]`` logits :math:`z` (or probabilities: only the argmax matters).
        labels: ``[batch]`` labels :math:`y` of any integer dtype, all in ``[0, classes)``.
        groups: ``[batch]`` group ids :math:`G` of any integer dtype.

    Returns:
        0-d tensor in :math:`[0, 1]`, in ``logits``' dtype promoted to at least float32.

    Raises:
        TypeError: if ``logits`` is not floating, or ``labels`` or ``groups`` is not an integer
            tensor.
        ValueError: if the shapes do not match, the batch or class axis is empty, a row of
            ``logits`` has no finite maximum, or a label is outside ``[0, classes)``.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]])
        >>> labels = torch.tensor([0, 1, 1, 0])
        >>> worst_group_accuracy(logits, labels, groups=torch.tensor([7, 7, 3, 3]))
        tensor(0.5000)

    References:
        Koh et al., "WILDS: A Benchmark of in-the-Wild Distribution Shifts", ICML 2021.
        Code: https://github.com/p-lambda/wilds. Sagawa et al., "Distributionally Robust Neural
        Networks", ICLR 2020. Code: https://github.com/kohpangwei/group_DRO
    """
    fn = "worst_group_accuracy"
    labels, prediction, _ = _predictions(fn, logits, labels)
    groups = check_labels(fn, "groups", groups, batch=labels.shape[0])
    return reduce_worst_group(prediction == labels, groups, compute_dtype(logits))
